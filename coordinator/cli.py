"""The ``sharedpool`` command: run the coordinator, show status, reload, clean up."""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import signal
import sys
import time
from typing import Any

from sharedpool import channel
from sharedpool.config import ENV_PREFIX, SETTINGS, PoolConfig, integer, seconds
from sharedpool.errors import SharedPoolError
from sharedpool.ledger import DEFAULT_SLOTS, Ledger, Snapshot
from sharedpool.names import CONTROL_SOCKET, PoolNames

from . import cluster, unit
from .arguments import setting_type
from .daemon import Coordinator, Options
from .lifecycle import remove_pool
from .status import (
    Follower,
    backends_report,
    format_backends,
    format_pools,
    format_table,
    pool_names,
    server_sessions,
    snapshot_dict,
)

METRICS_PORT = 10187  # outside 9100-9999 (fully allocated on the Prometheus port wiki); not postgres_exporter's 9187


def _pool_name(value: str) -> str:
    try:
        return PoolConfig(name=value, pool_size=1).name
    except SharedPoolError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("NAME", "--name")) from None


_SECONDS = seconds(0.0, optional=False)
_RECLAIM_GRACE = PoolConfig.__dataclass_fields__["reclaim_grace"].default

def _group_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--group", type=setting_type(SETTINGS["GROUP"][0], "--group"),
                        default=os.environ.get(f"{ENV_PREFIX}GROUP") or None,
                        help=f"OS group sharing the pool (default: ${ENV_PREFIX}GROUP, else none)")


def _version() -> str:
    try:
        return importlib.metadata.version("sharedpool")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sharedpool",
        description="Per-host PostgreSQL connection budget shared by all worker processes.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "coordinator",
        aliases=["run"],
        help="run the coordinator in the foreground (logs to stderr)",
        description="Create or adopt the pool's ledger and semaphore, return the permits of dead "
        "workers, audit drift, and keep a heartbeat. SIGTERM/SIGINT stop it; SIGHUP reconciles.",
    )
    run.add_argument("--name", type=_pool_name, default="default", help="pool name (default: %(default)s)")
    run.add_argument("--budget", type=setting_type(SETTINGS["POOL_SIZE"][0], "--budget"), required=True, help="server connections allowed for all workers of the pool on this host")
    run.add_argument("--slots", type=setting_type(integer(1, 65536), "--slots"), default=DEFAULT_SLOTS, help="worker processes the ledger can hold (default: %(default)s)")
    run.add_argument("--group", type=setting_type(SETTINGS["GROUP"][0], "--group"),
                     default=os.environ.get(f"{ENV_PREFIX}GROUP") or None,
                     help=f"OS group sharing the pool: objects get mode 0660 and the directory 2770 instead of "
                     f"0600/0700 (default: ${ENV_PREFIX}GROUP, else none)")
    run.add_argument("--reclaim-grace", type=setting_type(SETTINGS["RECLAIM_GRACE"][0], "--reclaim-grace"), default=_RECLAIM_GRACE, help="seconds to wait before returning a dead worker's permits when its backends cannot be seen on this host (default: %(default)s)")
    run.add_argument("--remove-on-exit", action="store_true", help="remove the ledger and semaphore when stopping (default: leave them for running workers)")
    run.add_argument("--exit-when-idle", type=setting_type(_SECONDS, "--exit-when-idle"), metavar="SECONDS", help="exit once no worker has been registered for SECONDS")
    run.add_argument("--exit-with", type=setting_type(integer(1, 2**22), "--exit-with"), metavar="PID", help="exit (after its workers are gone) when process PID exits")
    run.add_argument("-v", "--verbose", action="store_true", help="also log every worker registration (DEBUG)")
    cluster.add_coordinator_options(run)

    status = sub.add_parser(
        "status",
        help="show every pool of the host, or one pool in detail (budget, free, held, waits, workers)",
        description="Without --name, one row per pool on this host (like PgBouncer's SHOW POOLS): WAIT counts "
        "threads waiting for a permit across processes, QUEUED threads queued inside their process "
        "(MAX_PER_PROCESS), MAXWAIT the longest current permit wait, OPEN/S the churn. With --name, that "
        "pool in detail with one row per worker process.",
    )
    status.add_argument("--name", type=_pool_name, help="show this pool in detail (default: list every pool)")
    _group_option(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument("--backends", action="store_true",
                        help="list each recorded server connection: backend pid, worker pid, worker state")
    status.add_argument("--dsn", help="also read pg_stat_activity through this connection string (implies "
                        "--backends): server state of each backend, orphan backends, ledger/server disagreement; "
                        "with --cluster: the server holding the cluster budget")
    status.add_argument("--watch", type=setting_type(_SECONDS, "--watch"), metavar="SECONDS", help="repeat every SECONDS until interrupted")
    cluster.add_status_options(status)
    status.add_argument("--rate-window", type=setting_type(_SECONDS, "--rate-window"), default=1.0, metavar="SECONDS",
                        help="measure rates (connections opened per second, sheds, waits) over SECONDS before the "
                        "first report; 0: no rates (default: %(default)s)")

    metrics = sub.add_parser(
        "metrics",
        help="serve Prometheus metrics of one or more pools over HTTP",
        description="Serve /metrics; each scrape takes a fresh snapshot of each pool's ledger and re-attaches "
        "a pool that was recreated. A pool named with --name that does not exist (yet) is reported with "
        "sharedpool_up 0. Labels: pool only.",
    )
    metrics.add_argument("--name", type=_pool_name, action="append",
                         help="pool name (repeat for several; default: every pool on the host at each scrape)")
    metrics.add_argument("--port", type=setting_type(integer(1, 65535), "--port"), default=METRICS_PORT, help="TCP port (default: %(default)s)")
    metrics.add_argument("--addr", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    _group_option(metrics)
    metrics.add_argument("--cluster-dsn", metavar="DSN", help="also export the hosts sharing each pool's CLUSTER_BUDGET, read from this server")

    reload = sub.add_parser(
        "reload", help="change the budget of a running pool",
        description="Ask the coordinator for a new budget. Raising takes effect at once; a cut retires "
        "permits as connections come back (idle ones are closed at once, busy ones when returned): the "
        "command waits until the pool is within the new budget and says who still holds if it is not.",
    )
    reload.add_argument("--name", type=_pool_name, default="default", help="pool name (default: %(default)s)")
    reload.add_argument("--budget", type=setting_type(SETTINGS["POOL_SIZE"][0], "--budget"), required=True, help="the new budget")
    reload.add_argument("--wait", type=setting_type(_SECONDS, "--wait"), default=30.0, metavar="SECONDS",
                        help="how long to wait for a cut to converge (default: %(default)s)")
    _group_option(reload)

    cluster.register(sub, _pool_name)

    cleanup = sub.add_parser(
        "cleanup", help="remove a pool's directory, ledger and semaphore",
        description="Remove a pool nobody uses any more (also a corrupt or foreign one). Refuses while a "
        "coordinator runs or a live worker is registered, naming them.",
    )
    cleanup.add_argument("--name", type=_pool_name, required=True, help="pool name")
    cleanup.add_argument("--force", action="store_true",
                         help="remove even while live workers are registered: they keep their connections "
                         "outside any budget until they exit (never while a coordinator runs)")
    _group_option(cleanup)
    unit.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except SharedPoolError as exc:
        print(f"sharedpool {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def cmd_coordinator(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    coordinator = Coordinator(
        Options(
            name=args.name,
            budget=args.budget,
            nslots=args.slots,
            group=args.group,
            reclaim_grace=args.reclaim_grace,
            remove_on_exit=args.remove_on_exit,
            exit_when_idle=args.exit_when_idle,
            exit_with_pid=args.exit_with,
        )
    )
    agent = cluster.make_agent(args, lambda: coordinator.running)
    coordinator.start()
    cluster.start_agent(agent, coordinator.ledger)
    try:
        return coordinator.run()
    finally:
        if agent is not None:
            agent.stop()


def cmd_status(args: argparse.Namespace) -> int:
    if args.cluster:
        return cluster.cmd_status(args)
    follower = Follower(args.group)
    backends = args.backends or args.dsn is not None
    try:
        previous, taken = {}, time.monotonic()
        if args.rate_window:
            previous = _read_pools(follower, args.name)
            time.sleep(args.rate_window)
        while True:
            now = time.monotonic()
            snaps = _read_pools(follower, args.name)
            statuses = []
            for name, (snap, same) in snaps.items():
                if isinstance(snap, str):
                    statuses.append({"name": name, "error": snap})
                    continue
                earlier = previous.get(name, (None, False))[0] if same else None
                status = snapshot_dict(snap, previous=earlier if not isinstance(earlier, str) else None, elapsed=now - taken)
                if backends:
                    server = server_sessions(args.dsn, name, [b for w in status["workers"] for b in w["backends"]]) if args.dsn else None
                    status["backends"] = backends_report(status, server)
                statuses.append(status)
            print(_render(statuses, args.name is not None, args.json), flush=True)
            if args.watch is None:
                return 0
            previous, taken = snaps, now
            time.sleep(args.watch)
            if not args.json:
                print()
    finally:
        follower.close()


def _read_pools(follower: Follower, name: str | None) -> dict[str, tuple[Snapshot | str, bool]]:
    """Snapshot pool NAME (its errors raise) or every pool of the host (an error becomes its text)."""
    if name is not None:
        ledger, same = follower.get(name)
        return {name: (ledger.snapshot(), same)}
    snaps: dict[str, tuple[Snapshot | str, bool]] = {}
    names = pool_names()
    for gone in set(follower.ledgers) - set(names):
        follower.drop(gone)
    for pool in names:
        try:
            ledger, same = follower.get(pool)
            snaps[pool] = (ledger.snapshot(), same)
        except SharedPoolError as exc:
            snaps[pool] = (str(exc), False)
    return snaps


def _render(statuses: list[dict[str, Any]], one: bool, as_json: bool) -> str:
    if as_json:
        return json.dumps(statuses[0] if one else statuses)
    parts = [format_table(statuses[0]) if one else format_pools(statuses)]
    for status in statuses:
        if "backends" in status:
            parts.append(f"backends of pool {status['name']!r}:\n{format_backends(status['backends'])}")
    return "\n\n".join(parts)


def cmd_metrics(args: argparse.Namespace) -> int:
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        print("sharedpool metrics: needs prometheus-client (pip install 'sharedpool[metrics]')", file=sys.stderr)
        return 1
    from .metrics import LedgerCollector

    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # before the server thread starts: it inherits the mask
    registry = CollectorRegistry()
    collector = LedgerCollector(args.name, group=args.group)
    registry.register(collector)
    if args.cluster_dsn:
        registry.register(cluster.collector(args.cluster_dsn, args.name))
    start_http_server(args.port, addr=args.addr, registry=registry)
    pools = ", ".join(args.name) if args.name else "every pool on this host"
    print(f"serving metrics of {pools} on http://{args.addr}:{args.port}/metrics", file=sys.stderr, flush=True)
    signal.sigwait(stop)
    collector.close()
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    ledger = Ledger.attach(args.name, group=args.group, mapped=False)
    try:
        if not ledger.coordinator_alive():
            print(f"sharedpool reload: no coordinator is running for pool {args.name!r}", file=sys.stderr)
            return 1
        if not channel.send(PoolNames(args.name), CONTROL_SOCKET, f"budget {args.budget}".encode(), wait=5.0):
            print(f"sharedpool reload: pool {args.name!r}: the coordinator (pid {ledger.header.coordinator_pid}) "
                  f"did not take the request within 5 s (is something flooding {PoolNames(args.name).path(CONTROL_SOCKET)}?)",
                  file=sys.stderr)
            return 1
        started = time.monotonic()
        header = ledger.header
        while header.budget != args.budget:
            if time.monotonic() - started > 5.0:
                print(f"sharedpool reload: the coordinator did not apply budget {args.budget} within 5 s",
                      file=sys.stderr)
                return 1
            time.sleep(0.01)
        next_report = started + 1.0
        while header.retire_debt:
            now = time.monotonic()
            if now - started > args.wait:
                snap = ledger.snapshot()
                print(f"sharedpool reload: pool {args.name!r}: budget {args.budget} applied, but "
                      f"{snap.retire_debt} permit(s) above it are still held after {args.wait:.0f} s: "
                      f"{snap.holders_text()}", file=sys.stderr)
                return 1
            if now >= next_report:
                next_report = now + 1.0
                print(f"pool {args.name!r}: retiring, {header.retire_debt} permit(s) above budget {args.budget} "
                      "still held", file=sys.stderr, flush=True)
            time.sleep(0.01)
        print(f"pool {args.name!r}: budget {args.budget} (within it after {time.monotonic() - started:.2f} s)")
        return 0
    finally:
        ledger.close()


def cmd_cleanup(args: argparse.Namespace) -> int:
    removed, warnings = remove_pool(PoolNames(args.name), args.group, force=args.force)
    for warning in warnings:
        print(f"sharedpool cleanup: warning: {warning}", file=sys.stderr)
    print("\n".join(f"removed {path}" for path in removed) or f"nothing to remove for pool {args.name!r}")
    return 0


COMMANDS = {
    "coordinator": cmd_coordinator,
    "run": cmd_coordinator,
    "status": cmd_status,
    "reload": cmd_reload,
    "cleanup": cmd_cleanup,
    "metrics": cmd_metrics,
    "systemd-unit": unit.cmd_systemd_unit,
    "cluster": cluster.cmd_cluster,
}
