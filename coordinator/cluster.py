"""Share CLUSTER_BUDGET between hosts, through the protected PostgreSQL server itself.

Coordinator and CLI. The hard cap is not here: PostgreSQL refuses any
backend beyond the CONNECTION LIMIT of the pool's role, which
``sharedpool cluster init`` sets to CLUSTER_BUDGET (sharedpool/cluster.py
retries a refused connect). This module is the fairness layer that keeps
refusals rare: each coordinator started with ``--cluster-budget`` runs an
``Agent`` thread that, every TICK, in one short transaction serialized by a
transaction-level advisory lock, heartbeats its host's row (held, waiting,
wanted, backend pids) in ``sharedpool.cluster_hosts``, plans every host's
share, terminates the backends of hosts gone for good (fencing), and then
parks the host's permits beyond its share in a ledger slot of its own.

Schema (created by ``sharedpool cluster init`` or the first agent)::

    sharedpool.cluster_pools(pool, role, budget, fenced_unlisted)
    sharedpool.cluster_hosts(pool, host, ceiling, share, held, waiting,
                             wanted, backends int[], fenced, heartbeat)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

try:
    import psycopg2
    import psycopg2.errors
except ImportError:  # only the cluster agent and its commands need it; they say so
    psycopg2 = None

from sharedpool import channel
from sharedpool.errors import ConfigError, SharedPoolError
from sharedpool.ledger import Ledger
from sharedpool.names import PoolNames
from sharedpool.permits import PermitGate
from sharedpool.pressure import SHED, request_shed

from .arguments import setting_type
from .cluster_plan import TICK, DemandTracker, HostRow, is_live, plan

log = logging.getLogger("sharedpool.cluster")

LOCK_CLASS = 0x5350  # first key of the advisory lock that serializes plans ("SP")
AGENT_CONNECT = {  # the agent notices a cut link within seconds, and the server a cut agent's transaction
    "connect_timeout": 2, "keepalives": 1, "keepalives_idle": 1, "keepalives_interval": 1,
    "keepalives_count": 2, "tcp_user_timeout": 2000,
    "options": "-c idle_in_transaction_session_timeout=1000 -c statement_timeout=1500",
}

SCHEMA = """
CREATE SCHEMA IF NOT EXISTS sharedpool;
CREATE TABLE IF NOT EXISTS sharedpool.cluster_pools (
    pool text PRIMARY KEY, role name NOT NULL UNIQUE, budget integer NOT NULL CHECK (budget > 0),
    fenced_unlisted integer NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS sharedpool.cluster_hosts (
    pool text NOT NULL REFERENCES sharedpool.cluster_pools ON DELETE CASCADE,
    host text NOT NULL,
    ceiling integer NOT NULL, share integer NOT NULL DEFAULT 0,
    held integer NOT NULL DEFAULT 0, waiting integer NOT NULL DEFAULT 0, wanted integer NOT NULL DEFAULT 0,
    backends integer[] NOT NULL DEFAULT '{}', fenced integer NOT NULL DEFAULT 0,
    heartbeat timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pool, host));
"""


class ClusterError(SharedPoolError):
    """The cluster schema, role or budget is missing or disagrees with this host's settings."""


# -- the database side -------------------------------------------------------------------


def connect(dsn: str, name: str) -> Any:
    if psycopg2 is None:
        raise ClusterError(f"pool {name!r}: the cluster budget's store needs psycopg2 (pip install 'sharedpool[psycopg2]')")
    conn = psycopg2.connect(dsn, application_name=f"sharedpool-cluster/{name}", **AGENT_CONNECT)
    conn.autocommit = True
    return conn


def init(conn: Any, name: str, budget: int, role: str) -> None:
    """Create the schema, record the pool's role and budget, and set the role's CONNECTION LIMIT.

    Needs CREATE on the database (first time) and the right to ALTER ROLE
    (superuser, or CREATEROLE with ADMIN OPTION on the role).
    """
    with conn.cursor() as cur:
        cur.execute(SCHEMA)
        cur.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,))
        found = cur.fetchone()
        if found is None:
            raise ClusterError(f"pool {name!r}: role {role!r} does not exist")
        if found[0]:
            raise ClusterError(f"pool {name!r}: role {role!r} is a superuser, exempt from CONNECTION LIMIT")
        cur.execute(
            "INSERT INTO sharedpool.cluster_pools (pool, role, budget) VALUES (%s, %s, %s) "
            "ON CONFLICT (pool) DO UPDATE SET role = excluded.role, budget = excluded.budget",
            (name, role, budget),
        )
        cur.execute(f"ALTER ROLE {quote_ident(conn, role)} CONNECTION LIMIT {int(budget)}")


def quote_ident(conn: Any, ident: str) -> str:
    from psycopg2.extensions import quote_ident as quote

    return quote(ident, conn)


def pool_role(conn: Any, name: str) -> tuple[str, int]:
    """Return the pool's (role, budget) as ``cluster init`` recorded them."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('sharedpool.cluster_pools') IS NOT NULL")
        if cur.fetchone()[0]:
            cur.execute("SELECT role, budget FROM sharedpool.cluster_pools WHERE pool = %s", (name,))
            found = cur.fetchone()
            if found is not None:
                return found[0], found[1]
    raise ClusterError(
        f"pool {name!r} has no cluster budget on this server: run "
        f"`sharedpool cluster init --name {name} --budget N --role ROLE --dsn ADMIN_DSN` first"
    )


def read_hosts(cur: Any, name: str) -> list[HostRow]:
    cur.execute(
        "SELECT host, ceiling, share, held, waiting, wanted, backends, fenced, "
        "extract(epoch FROM clock_timestamp() - heartbeat)::float8 "
        "FROM sharedpool.cluster_hosts WHERE pool = %s ORDER BY host",
        (name,),
    )
    return [HostRow(r[0], r[1], r[2], r[3], r[4], r[5], tuple(r[6]), r[7], max(r[8], 0.0)) for r in cur.fetchall()]


def role_backends(cur: Any, role: str) -> dict[int, float]:
    cur.execute(
        "SELECT pid, extract(epoch FROM clock_timestamp() - backend_start)::float8 FROM pg_stat_activity "
        "WHERE usename = %s AND backend_type = 'client backend'",
        (role,),
    )
    return dict(cur.fetchall())


# -- the agent (a thread of the coordinator) ---------------------------------------------


class Agent:
    """Heartbeat this host, plan shares, fence gone hosts, park permits beyond this host's share.

    Coordinator only: two daemon threads beside the coordinator's loop. The
    parked permits sit in a ledger slot of the coordinator's pid; shed
    requests that workers address to that slot are passed on to the next
    holder (the slot is not a real holder). If the coordinator dies, its
    successor reclaims the slot, and the host may briefly try beyond its
    share: the server's limit still holds, only refusals become likelier.
    """

    def __init__(self, name: str, dsn: str, budget: int, running: Callable[[], bool], host: str | None = None) -> None:
        self.name = name
        self.dsn = dsn
        self.budget = budget
        self.running = running
        self.host = host or socket.gethostname()
        self.demand = DemandTracker()
        self.conn: Any = None
        self.role = ""
        self.share: int | None = None
        self.target: int | None = None  # permits to park; None until the first plan
        self.stopping = threading.Event()
        self.outage_logged = False

    def check(self) -> None:
        """Before the coordinator starts: refuse a cluster that is not set up, or set up otherwise.

        An unreachable server is not an error here (workers could not connect
        either): the agent keeps trying every TICK and checks then.
        """
        try:
            self.conn = connect(self.dsn, self.name)
            self._check_records()
        except psycopg2.OperationalError as exc:
            log.warning("pool %r: cluster store unreachable, will retry: %s", self.name, exc)
            self.outage_logged = True
            if self.conn is not None:
                self.conn.close()
            self.conn = None

    def _check_records(self) -> None:
        try:
            self.role, budget = pool_role(self.conn, self.name)
        except psycopg2.errors.InsufficientPrivilege as exc:
            raise ClusterError(
                f"pool {self.name!r}: the coordinator's --dsn role cannot read the cluster tables ({exc}".strip()
                + "); use a role other than the pool's, with SELECT, INSERT, UPDATE, DELETE on "
                "sharedpool.cluster_pools and sharedpool.cluster_hosts"
            ) from None
        if budget != self.budget:
            raise ClusterError(
                f"pool {self.name!r}: --cluster-budget {self.budget} disagrees with CLUSTER_BUDGET {budget} recorded "
                f"on the server; change it for all hosts with `sharedpool cluster init`"
            )
        with self.conn.cursor() as cur:
            cur.execute("SELECT session_user")
            if cur.fetchone()[0] == self.role:
                raise ClusterError(
                    f"pool {self.name!r}: the coordinator's --dsn must use another role than the pool's "
                    f"({self.role!r}): its session would take one of the budget's connections"
                )

    def start(self, ledger: Ledger) -> None:
        """Register the parking slot and start the threads (after the coordinator created or adopted the ledger).

        The slot lives in a mapping of its own: the coordinator's ledger is read through the file.
        """
        self.ledger = Ledger.attach(ledger.name, group=ledger.group)
        self.gate = PermitGate(self.ledger)
        self.inbox = channel.Inbox(self.ledger.names, PoolNames.worker_socket(self.gate.slot_index), ledger.group,
                                   os.fstat(self.ledger.dir_fd).st_uid)
        self.parker = threading.Thread(target=self._park_loop, name=f"sharedpool-{self.name}-park", daemon=True)
        self.loop = threading.Thread(target=self._run, name=f"sharedpool-{self.name}-cluster", daemon=True)
        self.parker.start()
        self.loop.start()
        log.info("pool %r: cluster agent for host %r, CLUSTER_BUDGET %d", self.name, self.host, self.budget)

    def stop(self) -> None:
        """Give the parked permits back (the coordinator drains only once every slot is free)."""
        self.stopping.set()
        self.loop.join()

    def _run(self) -> None:
        next_sync = 0.0
        try:
            while self.running() and not self.stopping.is_set():
                now = time.monotonic()
                if now >= next_sync:
                    next_sync = now + TICK
                    self.sync()
                    if self.target is not None and self.gate.account.held < self.target:
                        request_shed(self.ledger, self.gate.slot_index)
                if select.select([self.inbox], [], [], max(next_sync - time.monotonic(), 0.001))[0]:
                    for message in self.inbox.receive():
                        if message == SHED:
                            request_shed(self.ledger, self.gate.slot_index)  # not a real holder: pass it on
        except Exception:
            log.exception("pool %r: the cluster agent stopped; this host's share is no longer kept", self.name)
        finally:
            self.stopping.set()
            self.parker.join()
            self.gate.deregister()
            self.inbox.close()
            self.ledger.close()
            if self.conn is not None:
                self.conn.close()

    def _park_loop(self) -> None:
        """Hold exactly ``target`` permits: take them as workers free them, give back the excess."""
        gate = self.gate
        while not self.stopping.is_set():
            target = self.target
            held = gate.account.held
            if target is None or held == target:
                self.stopping.wait(TICK / 4)
            elif held > target:
                gate.release()
            elif not gate.try_acquire():
                # keep our place in the semaphore's queue; the loop's shed requests free a permit
                gate.acquire(3600.0, give_up=lambda: self.stopping.is_set() or (self.target or 0) <= gate.account.held,
                             wait_slice=0.5)

    def sync(self) -> None:
        """One tick: heartbeat, plan, fence, and set the parking target from our share."""
        snap = self.ledger.snapshot()
        workers = [s for s in snap.slots if s.index != self.gate.slot_index]
        ceiling = snap.budget
        waiting = sum(s.waiting for s in workers)
        wanted = self.demand.update(min(sum(s.in_use for s in workers) + waiting, ceiling), time.monotonic())
        backends = sorted(pid for s in workers for pid in s.backends)
        try:
            if self.conn is None or self.conn.closed:
                self.conn = connect(self.dsn, self.name)
                self._check_records()
            share = self._plan(ceiling, sum(s.held for s in workers), waiting, wanted, backends)
        except (psycopg2.Error, ClusterError) as exc:
            if not self.outage_logged:
                log.warning("pool %r: cluster store unreachable or refusing, keeping share %s: %s", self.name, self.share, exc)
                self.outage_logged = True
            if self.conn is not None:
                self.conn.close()
            self.conn = None
            return
        if self.outage_logged:
            log.info("pool %r: cluster store reachable again", self.name)
            self.outage_logged = False
        if share != self.share:
            log.debug("pool %r: host %r share %s -> %d", self.name, self.host, self.share, share)
        self.share = share
        self.target = max(ceiling - min(share, ceiling), 0)

    def _plan(self, ceiling: int, held: int, waiting: int, wanted: int, backends: list[int]) -> int:
        with self.conn.cursor() as cur:
            # the heartbeat commits on its own: it never waits for another host's plan
            cur.execute(
                "INSERT INTO sharedpool.cluster_hosts AS h (pool, host, ceiling, held, waiting, wanted, backends, heartbeat) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, clock_timestamp()) ON CONFLICT (pool, host) DO UPDATE SET "
                "ceiling = excluded.ceiling, held = excluded.held, waiting = excluded.waiting, "
                "wanted = excluded.wanted, backends = excluded.backends, heartbeat = excluded.heartbeat "
                "RETURNING share, (SELECT budget FROM sharedpool.cluster_pools WHERE pool = h.pool)",
                (self.name, self.host, ceiling, held, waiting, wanted, backends),
            )
            share, budget = cur.fetchone()
            if budget is None:
                raise ClusterError(f"pool {self.name!r}: the cluster budget was removed from the server")
            cur.execute("BEGIN")
            try:
                # never wait: a planner cut off mid-plan holds the lock until the server ends its
                # transaction (idle_in_transaction_session_timeout), and any host's plan covers every host
                cur.execute("SELECT pg_try_advisory_xact_lock(%s, hashtext(%s))", (LOCK_CLASS, self.name))
                if not cur.fetchone()[0]:
                    cur.execute("COMMIT")
                    return share
                decided = plan(budget, read_hosts(cur, self.name), role_backends(cur, self.role), time.time())
                fenced = self._fence(cur, decided.fence)
                cur.execute(
                    "UPDATE sharedpool.cluster_hosts h SET share = v.share, fenced = h.fenced + v.fenced "
                    "FROM unnest(%s::text[], %s::int[], %s::int[]) AS v(host, share, fenced) "
                    "WHERE h.pool = %s AND h.host = v.host",
                    (list(decided.shares), list(decided.shares.values()),
                     [fenced.get(h, 0) for h in decided.shares], self.name),
                )
                if fenced.get(""):
                    cur.execute("UPDATE sharedpool.cluster_pools SET fenced_unlisted = fenced_unlisted + %s "
                                "WHERE pool = %s", (fenced[""], self.name))
                if decided.prune:
                    cur.execute("DELETE FROM sharedpool.cluster_hosts WHERE pool = %s AND host = ANY(%s)",
                                (self.name, list(decided.prune)))
                cur.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(psycopg2.Error):
                    cur.execute("ROLLBACK")
                raise
        return decided.shares[self.host]

    def _fence(self, cur: Any, fence: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
        """Terminate gone hosts' backends; return how many were terminated per host ('' for unlisted ones)."""
        pids = [pid for group in fence.values() for pid in group]
        if not pids:
            return {}
        try:
            cur.execute("SAVEPOINT fence")
            cur.execute("SELECT pid FROM unnest(%s::int[]) AS pid WHERE pg_terminate_backend(pid)", (pids,))
            done = {row[0] for row in cur.fetchall()}
        except psycopg2.errors.InsufficientPrivilege as exc:
            cur.execute("ROLLBACK TO SAVEPOINT fence")
            done, refused = set(), exc
        else:
            refused = None
        if done:
            log.warning("pool %r: terminated backends %s of gone hosts %s", self.name, sorted(done), sorted(fence))
        if refused is not None or len(done) < len(pids):
            log.warning("pool %r: could not terminate backends %s (the --dsn role needs membership in %r or in "
                        "pg_signal_backend): %s", self.name, sorted(set(pids) - done), self.role, refused or "")
        return {host: sum(pid in done for pid in group) for host, group in fence.items()}


# -- the command line --------------------------------------------------------------------


def add_coordinator_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cluster-budget", type=setting_type("CLUSTER_BUDGET", "--cluster-budget"), metavar="N",
                        help="share CLUSTER_BUDGET N with the other hosts of this pool NAME (needs --dsn and "
                        "`sharedpool cluster init`); this host's --budget stays its ceiling")
    parser.add_argument("--dsn", help="libpq connection string of the cluster store, the protected server itself, "
                          "as a role other than the pool's (needs pg_signal_backend or membership in the pool's role "
                          "to fence the backends of gone hosts)")
    parser.add_argument("--cluster-host", metavar="HOST", help="this host's name in the cluster (default: the hostname)")


def make_agent(args: argparse.Namespace, running: Callable[[], bool]) -> Agent | None:
    """Check the cluster set-up if the coordinator was asked to share a cluster budget (else None)."""
    if args.cluster_budget is None:
        return None
    if not args.dsn:
        raise ConfigError("--cluster-budget needs --dsn (the PostgreSQL server the hosts share)")
    if args.exit_when_idle is not None or args.exit_with is not None:
        raise ConfigError("--cluster-budget cannot be combined with --exit-when-idle or --exit-with: the agent's "
                          "parking slot keeps the pool registered, so the coordinator would never exit on its own")
    agent = Agent(args.name, args.dsn, args.cluster_budget, running, host=args.cluster_host)
    agent.check()
    return agent


def start_agent(agent: Agent | None, ledger: Ledger) -> None:
    """Start the agent once the coordinator owns the ledger; SIGTERM/SIGINT stop it first."""
    if agent is None:
        return
    agent.start(ledger)
    for signum in (signal.SIGTERM, signal.SIGINT):  # free the parked slot first: the coordinator drains until all are
        previous = signal.getsignal(signum)
        if callable(previous):
            signal.signal(signum, _chained(agent.stopping.set, previous))


def _chained(first: Callable[[], object], then: Callable[[int, Any], object]) -> Callable[[int, Any], None]:
    def handler(signum: int, frame: Any) -> None:
        first()
        then(signum, frame)

    return handler


def register(sub: Any, pool_name: Callable[[str], str]) -> None:
    """Add ``sharedpool cluster init``."""
    cluster = sub.add_parser("cluster", help="set up the cluster budget on the PostgreSQL server")
    verbs = cluster.add_subparsers(dest="cluster_command", required=True, metavar="VERB")
    init_ = verbs.add_parser(
        "init", help="create the schema, record the pool's role and budget, set the role's CONNECTION LIMIT",
        description="Idempotent; run again to change the budget. The server then refuses any connection of ROLE "
        "beyond N: that is the hard cap. Needs a role that may ALTER ROLE (superuser, or CREATEROLE with ADMIN "
        "OPTION on ROLE) and CREATE on the database the first time.",
    )
    init_.add_argument("--name", type=pool_name, default="default", help="pool name (default: %(default)s)")
    init_.add_argument("--budget", type=setting_type("CLUSTER_BUDGET", "--budget"), required=True, help="CLUSTER_BUDGET: server connections of all hosts together")
    init_.add_argument("--role", required=True, help="the role the pool's workers connect as, used by this pool only, not a superuser")
    init_.add_argument("--dsn", required=True, help="libpq connection string of the server, as an administrator")


def add_status_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cluster", action="store_true", help="show the hosts sharing the pool's CLUSTER_BUDGET, read from the server (needs --dsn; --json and --watch apply, --rate-window does not)")


def cmd_cluster(args: argparse.Namespace) -> int:
    conn = connect(args.dsn, args.name)
    try:
        init(conn, args.name, args.budget, args.role)
    finally:
        conn.close()
    print(f"pool {args.name!r}: CLUSTER_BUDGET {args.budget}, role {args.role!r} CONNECTION LIMIT {args.budget}")
    return 0


def cluster_status(conn: Any, name: str) -> dict[str, Any]:
    """Every host sharing the pool's budget, as the server sees them now."""
    role, budget = pool_role(conn, name)
    with conn.cursor() as cur:
        rows = read_hosts(cur, name)
        alive = role_backends(cur, role)
        cur.execute("SELECT fenced_unlisted FROM sharedpool.cluster_pools WHERE pool = %s", (name,))
        unlisted = cur.fetchone()[0]
    hosts = [
        {"host": r.host, "live": is_live(r, alive), "share": r.share, "ceiling": r.ceiling, "held": r.held,
         "waiting": r.waiting, "wanted": r.wanted, "heartbeat_age_s": round(r.age, 3),
         "backends": sum(1 for p in r.backends if p in alive), "fenced": r.fenced}
        for r in rows
    ]
    return {"pool": name, "role": role, "budget": budget, "server_backends": len(alive),
            "fenced_unlisted": unlisted, "hosts": hosts}


def format_status(status: Mapping[str, Any]) -> str:
    lines = [f"pool {status['pool']!r}: CLUSTER_BUDGET {status['budget']} (role {status['role']!r}), "
             f"{status['server_backends']} backends on the server, {status['fenced_unlisted']} terminated that no "
             f"host listed"]
    columns = ("host", "live", "share", "ceiling", "held", "waiting", "wanted", "heartbeat_age_s", "backends", "fenced")
    table = [columns] + [tuple(str(h[c]) for c in columns) for h in status["hosts"]]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    if not args.dsn:
        print("sharedpool status: --cluster needs --dsn", file=sys.stderr)
        return 2
    conn = connect(args.dsn, args.name)
    try:
        while True:
            status = cluster_status(conn, args.name)
            print(json.dumps(status) if args.json else format_status(status), flush=True)
            if args.watch is None:
                return 0
            time.sleep(args.watch)
            if not args.json:
                print()
    finally:
        conn.close()


def collector(dsn: str, names: list[str]) -> Any:
    """A Prometheus collector of the hosts sharing each pool's CLUSTER_BUDGET (``sharedpool metrics --cluster-dsn``).

    Runs in the metrics process; one short connection per scrape, so a
    scrape never holds a session between scrapes.
    """
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.registry import Collector

    per_host = {
        "share": "Permits this host may hold under CLUSTER_BUDGET",
        "held": "Permits the host's workers hold (last heartbeat)",
        "waiting": "Threads of the host waiting for a permit (last heartbeat)",
        "wanted": "The host's demand, its peak over the hold time",
        "heartbeat_age_s": "Seconds since the host's last heartbeat, by the server's clock",
        "live": "1 while the host counts as live",
        "backends": "The host's backends on the server",
    }

    class ClusterCollector(Collector):
        def collect(self) -> Any:
            budget = GaugeMetricFamily("sharedpool_cluster_budget", "CLUSTER_BUDGET of the pool", labels=["pool"])
            backends = GaugeMetricFamily("sharedpool_cluster_server_backends", "The pool role's backends on the server", labels=["pool"])
            hosts = {key: GaugeMetricFamily(f"sharedpool_cluster_host_{key.removesuffix('_s')}" + ("_seconds" if key.endswith("_s") else ""),
                                            help_text, labels=["pool", "host"]) for key, help_text in per_host.items()}
            fenced = CounterMetricFamily("sharedpool_cluster_host_fenced", "Backends of the host terminated after it was gone", labels=["pool", "host"])
            unlisted = CounterMetricFamily("sharedpool_cluster_fenced_unlisted", "Backends no live host listed, terminated", labels=["pool"])
            conn = connect(dsn, names[0])
            try:
                for name in names:
                    status = cluster_status(conn, name)
                    budget.add_metric([name], status["budget"])
                    backends.add_metric([name], status["server_backends"])
                    unlisted.add_metric([name], status["fenced_unlisted"])
                    for host in status["hosts"]:
                        for key, family in hosts.items():
                            family.add_metric([name, host["host"]], float(host[key]))
                        fenced.add_metric([name, host["host"]], host["fenced"])
            finally:
                conn.close()
            yield budget
            yield backends
            yield from hosts.values()
            yield fenced
            yield unlisted

    return ClusterCollector()
