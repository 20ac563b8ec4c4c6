"""CLUSTER_BUDGET: one hard cap on the server for many hosts, shares that follow demand.

Three layers: the share decisions with plain values; the server's refusal
and the worker's retry against a real PostgreSQL; simulated hosts
(tests/hosts.py: network, PID and mount namespaces) under load, with the
pool's backends counted on the server every few milliseconds.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import time

import psycopg2
import pytest

from sharedpool.coordinator import cluster as agent_side
from sharedpool.coordinator.cluster_plan import FENCE_AFTER, HOLD, LEASE, SUSPECT, DemandTracker, HostRow, plan, water_fill
from helpers_procs import PYTHON, ROOT, sample_server, wait_until
from hosts import Host, HostServer, Network
from sharedpool import PoolConfig
from sharedpool import cluster as worker_side
from sharedpool.errors import ConfigError, PoolTimeout

BUDGET = 6  # CLUSTER_BUDGET in the host tests
POOL_SIZE = 4  # each host's ceiling
WORKERS = 4  # per host, one connection each: 12 wanted for 6


def row(host: str, *, wanted: int = 4, backends: tuple[int, ...] = (), age: float = 0.05, ceiling: int = 4) -> HostRow:
    return HostRow(host, ceiling, 0, len(backends), 0, wanted, backends, 0, age)


# -- decisions -------------------------------------------------------------------------------


def test_water_fill_is_max_min_fair_then_fills_to_ceilings():
    assert water_fill(6, {"a": 4, "b": 4, "c": 4}, dict.fromkeys("abc", 4), turn=0) == {"a": 2, "b": 2, "c": 2}
    assert water_fill(6, {"a": 1, "b": 4, "c": 4}, dict.fromkeys("abc", 4), turn=0) == {"a": 1, "b": 3, "c": 2}
    # demand met: the rest goes up to the ceilings, so a burst needs no round trip
    assert water_fill(6, {"a": 1, "b": 0}, {"a": 4, "b": 4}, turn=0) == {"a": 3, "b": 3}


def test_fewer_permits_than_hosts_take_turns():
    wants, ceilings = dict.fromkeys("abc", 2), dict.fromkeys("abc", 2)
    served = set()
    for turn in range(3):
        shares = water_fill(2, wants, ceilings, turn)
        assert sum(shares.values()) == 2
        served |= {h for h, s in shares.items() if s}
    assert served == {"a", "b", "c"}
    # when every host gets something, a remainder stays where it is
    assert {water_fill(7, dict.fromkeys("abc", 4), dict.fromkeys("abc", 4), turn)["a"] for turn in range(3)} == {3}


def test_gone_hosts_backends_keep_their_budget_until_gone_and_are_fenced_after_the_grace():
    alive = {101: 10.0, 102: 10.0, 201: 10.0}
    rows = [row("a", backends=(101, 102), age=LEASE + 0.1), row("b", backends=(201,))]
    decided = plan(6, rows, alive, now=0)
    assert decided.live == {"b"} and decided.reserved == 2 and decided.shares == {"a": 0, "b": 4}
    assert decided.fence == {}
    rows[0] = row("a", backends=(101, 102), age=LEASE + FENCE_AFTER + 0.1)
    assert plan(6, rows, alive, now=0).fence == {"a": (101, 102)}
    # once its backends are gone, the budget is re-granted
    assert plan(6, rows, {201: 10.0}, now=0).shares == {"a": 0, "b": 4}
    assert plan(6, [rows[0], row("b", backends=(201,)), row("c")], {201: 10.0}, now=0).shares["c"] == 3


def test_a_late_host_without_backends_is_gone_at_once_and_unlisted_old_backends_are_fenced():
    alive = {301: 0.05, 302: LEASE + FENCE_AFTER + 1}
    rows = [row("a", age=SUSPECT + 0.1), row("b", age=SUSPECT + 0.1, backends=(999,)), row("c")]
    decided = plan(6, rows, {**alive, 999: 5.0}, now=0)
    assert decided.live == {"b", "c"}
    assert decided.fence == {"": (302,)}  # nobody lists it and it is old: a cut host's last connection
    assert decided.reserved == 1  # 301 is fresh: a live host will list it at its next heartbeat


def test_demand_keeps_its_peak_for_the_hold_time():
    tracker = DemandTracker(hold=2.0)
    assert tracker.update(4, now=0.0) == 4
    assert tracker.update(1, now=1.0) == 4
    assert tracker.update(1, now=2.5) == 1
    assert tracker.update(3, now=2.6) == 3


# -- the server's refusal and the worker's retry -------------------------------------------------


@pytest.fixture(scope="module")
def world():
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare"):
        pytest.skip("simulated hosts need root, ip and unshare")
    network = Network(4)
    try:
        server = HostServer(network)
    except BaseException:
        network.close()
        raise
    try:
        yield network, server
    finally:
        server.close()
        network.close()


def admin(server: HostServer):
    conn = psycopg2.connect(server.dsn(), application_name="test-admin")
    conn.autocommit = True
    return conn


@pytest.fixture
def pool_role(world, unique_name):
    """A fresh pool NAME and its own role, CLUSTER_BUDGET set with `sharedpool cluster init`."""
    _, server = world
    role = f"r_{unique_name}"
    with contextlib.closing(admin(server)) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE ROLE {role} LOGIN")
    done = subprocess.run(
        [PYTHON, "-m", "sharedpool.coordinator", "cluster", "init", "--name", unique_name, "--budget", str(BUDGET),
         "--role", role, "--dsn", server.dsn()],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert done.returncode == 0, done.stderr
    yield unique_name, role
    with contextlib.closing(admin(server)) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
        cur.execute("DELETE FROM sharedpool.cluster_pools WHERE pool = %s", (unique_name,))
        wait_until(lambda: not _count(cur, "usename = %s", role), 5)
        cur.execute(f"DROP ROLE {role}")


def _count(cur, where: str, *params) -> int:
    cur.execute(f"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND {where}", params)
    return cur.fetchone()[0]


def test_the_server_refuses_the_connection_beyond_the_budget_before_anyone_sees_it(world, pool_role):
    _, server = world
    name, role = pool_role
    held = [psycopg2.connect(server.dsn(user=role), application_name=f"sharedpool/{name}") for _ in range(BUDGET)]
    try:
        with pytest.raises(psycopg2.OperationalError, match=worker_side.REFUSED):
            psycopg2.connect(server.dsn(user=role), application_name=f"sharedpool/{name}")
        config = PoolConfig(name=name, pool_size=2, cluster_budget=BUDGET, autostart=False)
        started = time.monotonic()
        with pytest.raises(PoolTimeout, match=f"CLUSTER_BUDGET {BUDGET} reached"):
            worker_side.connect(psycopg2.connect, config, time.monotonic() + 0.3, 0.3, server.dsn(user=role))
        assert time.monotonic() - started >= 0.3
        # a slot frees while the worker retries: it gets in
        held.pop().close()
        conn = worker_side.connect(psycopg2.connect, config, time.monotonic() + 5, 5, server.dsn(user=role))
        conn.close()
    finally:
        for conn in held:
            conn.close()


def test_a_pool_refuses_to_run_where_the_server_would_not_enforce_the_budget(world, pool_role, unique_name):
    _, server = world
    name, role = pool_role
    superuser = PoolConfig(name=name, pool_size=2, cluster_budget=BUDGET, autostart=False)
    with pytest.raises(ConfigError, match="superuser 'postgres' is exempt"):
        worker_side.connect(psycopg2.connect, superuser, time.monotonic() + 1, 1, server.dsn())
    other = PoolConfig(name=name + "x", pool_size=2, cluster_budget=BUDGET + 1, autostart=False)
    with pytest.raises(ConfigError, match=f"CLUSTER_BUDGET is {BUDGET + 1} but role '{role}' has CONNECTION LIMIT {BUDGET}"):
        worker_side.connect(psycopg2.connect, other, time.monotonic() + 1, 1, server.dsn(user=role))


# -- simulated hosts ---------------------------------------------------------------------------


class Run:
    """Hosts of one test, a sampler of the pool's backends on the server, the cluster status."""

    def __init__(self, world, name: str, role: str) -> None:
        self.network, self.server = world
        self.name, self.role = name, role
        self.out = tempfile.mkdtemp(prefix="sp-cluster-")
        os.chmod(self.out, 0o777)
        self.hosts: dict[int, Host] = {}
        ctx = multiprocessing.get_context("forkserver")
        self.stop, self.results = ctx.Event(), ctx.Queue()
        self.sampler = ctx.Process(target=sample_server, args=(self.server.dsn(), f"sharedpool/{name}", BUDGET,
                                                              self.stop, self.results), daemon=True)
        self.sampler.start()
        self.admin = admin(self.server)

    def add_host(self, n: int, pool_size: int = POOL_SIZE, workers: int = WORKERS, cluster_budget: int | None = BUDGET,
                 agent: bool = True) -> Host:
        self.hosts[n] = Host(self.network, self.server, n, name=self.name, role=self.role, pool_size=pool_size,
                             cluster_budget=cluster_budget, workers=workers, out=self.out, agent=agent)
        return self.hosts[n]

    def status(self) -> dict:
        return agent_side.cluster_status(self.admin, self.name)

    def shares(self) -> dict[str, int]:
        return {h["host"]: h["share"] for h in self.status()["hosts"] if h["live"]}

    def refusals(self) -> int:
        """Connections the server refused for the role's limit so far (its log: one FATAL line each)."""
        with open(self.server.cluster.logfile, errors="replace") as f:
            return f.read().count(f'too many connections for role "{self.role}"')

    def from_host(self, n: int) -> int:
        """Backends on the server whose client is host ``n``'s address (by the server's own view)."""
        with self.admin.cursor() as cur:
            return _count(cur, "usename = %s AND client_addr = %s", self.role, self.network.hosts[n - 1][3])

    def wait_all_served(self, hosts, timeout: float = 30.0) -> None:
        before = {n: self.hosts[n].served() for n in hosts}
        ok = wait_until(lambda: all(self.hosts[n].served() > before[n] for n in hosts), timeout, 0.1)
        assert ok, self.diagnose()

    def diagnose(self) -> str:
        return json.dumps({"status": self.status(), "counters": {n: h.counters() for n, h in self.hosts.items()},
                           "logs": {n: h.read_log()[-3000:] for n, h in self.hosts.items()}}, indent=1)

    def finish(self) -> dict:
        """Stop the sampler; return its figures (peak, samples, largest gap between samples)."""
        self.stop.set()
        result = self.results.get(timeout=10)
        self.sampler.join(5)
        return result

    def close(self) -> None:
        for host in self.hosts.values():
            host.close()
        if self.sampler.is_alive():
            self.stop.set()
            self.sampler.join(5)
            if self.sampler.is_alive():
                self.sampler.kill()
        self.admin.close()
        shutil.rmtree(self.out, ignore_errors=True)


@pytest.fixture
def run(world, pool_role):
    r = Run(world, *pool_role)
    try:
        yield r
    finally:
        r.close()


def _assert_cap(run: Run, figures: dict) -> None:
    assert figures["samples"] > 100, figures
    assert figures["peak"] <= BUDGET, f"server saw {figures['peak']} > CLUSTER_BUDGET {BUDGET}: {figures['over'][:3]}"
    print(f"\nsampler: {figures['samples']} samples, largest gap {figures['max_gap'] * 1000:.1f} ms, "
          f"{figures['late']} gaps over 20 ms", flush=True)  # a figure: no timing pass/fail


def test_steady_overload_coordinator_restart_new_host_and_idle_host(run, record_property):
    """Three hosts want 12 connections for 6: cap held, each served; then churn under the same load."""
    for n in (1, 2, 3):
        run.add_host(n)
    run.wait_all_served((1, 2, 3))
    window, refused = {n: run.hosts[n].served() for n in (1, 2, 3)}, run.refusals()
    time.sleep(10)
    served = {n: run.hosts[n].served() - window[n] for n in (1, 2, 3)}
    refused = run.refusals() - refused
    assert all(served.values()), (served, run.diagnose())
    assert wait_until(lambda: run.shares() == {"h1": 2, "h2": 2, "h3": 2}, 5, 0.05), run.diagnose()
    record_property("served_per_host_10s", served)
    record_property("served_min_over_max", round(min(served.values()) / max(served.values()), 2))

    # kill and restart one host's coordinator: its workers keep going, the cap holds
    run.hosts[2].command("coordinator-kill")
    time.sleep(1.0)
    run.hosts[2].command("coordinator-start")
    run.wait_all_served((1, 2, 3))
    assert wait_until(lambda: run.shares() == {"h1": 2, "h2": 2, "h3": 2}, 10, 0.05), run.diagnose()

    # a new host under load gets a share, and the others hand it over
    run.add_host(4)
    assert wait_until(lambda: any(h["host"] == "h4" and h["wanted"] for h in run.status()["hosts"]), 30, 0.01), \
        run.diagnose()
    t0 = time.monotonic()  # its first heartbeat that reports demand
    assert wait_until(lambda: run.shares().get("h4", 0) > 0, 5, 0.01), run.diagnose()
    new_host_share_s = time.monotonic() - t0
    share = run.shares()["h4"]
    t1 = time.monotonic()
    assert wait_until(lambda: run.from_host(4) >= share, 10, 0.005), run.diagnose()
    handoff_s = time.monotonic() - t1
    run.wait_all_served((1, 2, 3, 4))
    listed = subprocess.run(
        [PYTHON, "-m", "sharedpool.coordinator", "status", "--cluster", "--json", "--name", run.name,
         "--dsn", run.server.dsn()], capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert listed.returncode == 0, listed.stderr
    hosts = {h["host"]: h for h in json.loads(listed.stdout)["hosts"]}
    assert set(hosts) == {"h1", "h2", "h3", "h4"} and all(h["live"] for h in hosts.values())
    assert sum(h["share"] for h in hosts.values()) == BUDGET
    assert {"held", "waiting", "heartbeat_age_s", "fenced"} <= set(hosts["h4"])
    table = subprocess.run(
        [PYTHON, "-m", "sharedpool.coordinator", "status", "--cluster", "--name", run.name, "--dsn", run.server.dsn()],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert table.returncode == 0 and f"CLUSTER_BUDGET {BUDGET}" in table.stdout, table.stderr
    print("\n" + table.stdout, flush=True)

    # an idle host's share drains to the others
    run.hosts[1].set_idle(True)
    t0 = time.monotonic()
    assert wait_until(lambda: run.shares().get("h1", 1) == 0, 15, 0.02), run.diagnose()
    drain_s = time.monotonic() - t0
    assert wait_until(lambda: sum(run.shares().values()) == BUDGET, 5, 0.05)
    run.wait_all_served((2, 3, 4))
    figures = run.finish()
    _assert_cap(run, figures)
    record_property("peak_server_backends", figures["peak"])
    record_property("new_host_share_s", round(new_host_share_s, 3))
    record_property("share_handoff_s", round(handoff_s, 3))
    record_property("idle_host_share_drained_s", round(drain_s, 2))
    record_property("server_refusals_10s", refused)
    print(f"\nsteady: served/10 s {served}, refused by the server {refused}, peak {figures['peak']}, samples {figures['samples']}, "
          f"max gap {figures['max_gap'] * 1000:.1f} ms, late {figures['late']}; new host share "
          f"{share} after {new_host_share_s:.3f} s from its first demand, handed over (its backends on the server) "
          f"{handoff_s:.3f} s later; idle host drained in {drain_s:.2f} s "
          f"(hold {HOLD} s)", flush=True)


def test_the_cap_holds_without_any_coordinator_sharing(run, record_property):
    """No agent at all (never given --cluster-budget): the server alone keeps the cap; hosts may starve."""
    for n in (1, 2, 3):
        run.add_host(n, agent=False)
    assert wait_until(lambda: sum(run.hosts[n].served() for n in (1, 2, 3)), 30, 0.1), run.diagnose()
    time.sleep(2)
    before, refused = {n: run.hosts[n].served() for n in (1, 2, 3)}, run.refusals()
    time.sleep(5)
    served = {n: run.hosts[n].served() - before[n] for n in (1, 2, 3)}
    refused = run.refusals() - refused
    figures = run.finish()
    _assert_cap(run, figures)
    record_property("served_per_host_5s_without_agents", served)
    print(f"\nwithout agents: served/5 s {served}, refused by the server {refused}, peak {figures['peak']}", flush=True)


def test_sigkill_of_a_whole_host_regrants_only_after_its_backends_are_gone(run, record_property):
    for n in (1, 2, 3):
        run.add_host(n)
    run.wait_all_served((1, 2, 3))
    assert wait_until(lambda: run.shares() == {"h1": 2, "h2": 2, "h3": 2}, 10, 0.05), run.diagnose()
    assert wait_until(lambda: run.from_host(1) == 2, 5, 0.01)
    t0 = time.monotonic()
    run.hosts[1].kill()
    gone_at = regrant_at = None
    while time.monotonic() - t0 < 15 and regrant_at is None:
        if gone_at is None and run.from_host(1) == 0:
            gone_at = time.monotonic()
        shares = run.shares()
        if "h1" not in shares and sum(shares.values()) == BUDGET:
            regrant_at = time.monotonic()
            assert gone_at is not None and run.from_host(1) == 0, "re-granted while the dead host's backends lived"
        time.sleep(0.01)
    assert regrant_at is not None, run.diagnose()
    run.wait_all_served((2, 3))
    figures = run.finish()
    _assert_cap(run, figures)
    record_property("host_death_backends_gone_s", round(gone_at - t0, 3))
    record_property("host_death_regrant_s", round(regrant_at - t0, 3))
    print(f"\nhost SIGKILL: its backends gone after {gone_at - t0:.3f} s, share re-granted after "
          f"{regrant_at - t0:.3f} s; peak {figures['peak']}", flush=True)


def test_cut_link_longer_than_the_lease_then_heal(run, record_property):
    for n in (1, 2, 3):
        run.add_host(n)
    run.wait_all_served((1, 2, 3))
    assert wait_until(lambda: run.shares() == {"h1": 2, "h2": 2, "h3": 2}, 10, 0.05), run.diagnose()
    assert wait_until(lambda: run.from_host(1) == 2, 5, 0.01)
    t0 = time.monotonic()
    run.network.cut(1)
    try:
        assert wait_until(lambda: "h1" not in run.shares() and sum(run.shares().values()) == BUDGET, 15, 0.02), \
            run.diagnose()
        regrant_s = time.monotonic() - t0
        assert run.from_host(1) == 0  # fenced: the cut host's backends were terminated first
        status = run.status()
        fenced = {h["host"]: h["fenced"] for h in status["hosts"]}
        fenced["unlisted"] = status["fenced_unlisted"]  # opened after the cut host's last heartbeat
        assert fenced["h1"] + fenced["unlisted"] >= 1 and fenced["h2"] == fenced["h3"] == 0, fenced
        run.wait_all_served((2, 3))
        time.sleep(max(0.0, LEASE + FENCE_AFTER + 2 - (time.monotonic() - t0)))
    finally:
        run.network.heal(1)
    t1 = time.monotonic()
    assert wait_until(lambda: run.shares().get("h1", 0) > 0, 30, 0.02), run.diagnose()
    rejoin_s = time.monotonic() - t1
    run.wait_all_served((1, 2, 3), timeout=60)
    figures = run.finish()
    _assert_cap(run, figures)
    record_property("partition_regrant_s", round(regrant_s, 3))
    record_property("partition_rejoin_s", round(rejoin_s, 3))
    print(f"\npartition: share re-granted after {regrant_s:.3f} s (lease {LEASE} s + fence grace {FENCE_AFTER} s), "
          f"fenced {fenced}; healed host has a share again after {rejoin_s:.3f} s; peak {figures['peak']}", flush=True)


def test_throughput_of_three_hosts_against_one_host_with_the_same_total(run, record_property):
    """A figure, not a pass/fail: 3 hosts x 4 workers sharing 6, then 1 host x 12 workers with POOL_SIZE 6."""

    def served_in(hosts: tuple[int, ...], seconds: float = 6.0) -> int:
        run.wait_all_served(hosts)
        before = sum(run.hosts[n].served() for n in hosts)
        time.sleep(seconds)
        return sum(run.hosts[n].served() for n in hosts) - before

    for n in (1, 2, 3):
        run.add_host(n)
    three = served_in((1, 2, 3))
    for n in (1, 2, 3):
        run.hosts.pop(n).close()
    run.add_host(4, pool_size=BUDGET, workers=3 * WORKERS, cluster_budget=None)
    one = served_in((4,))
    figures = run.finish()
    _assert_cap(run, figures)
    record_property("three_hosts_served_6s", three)
    record_property("one_host_served_6s", one)
    print(f"\nthroughput, pg_sleep(0.05) per request, 12 workers, 6 connections: 3 hosts {three}, 1 host {one}, "
          f"ratio {three / one:.2f}", flush=True)


def test_coordinator_refuses_a_cluster_not_set_up_and_stops_promptly_with_its_agent(world, pool_role, unique_name):
    from helpers_procs import CoordinatorProc, coordinator

    _, server = world
    name, role = pool_role
    for argv, message in (
        ([], "needs --dsn"),
        (["--dsn", server.dsn(), "--exit-when-idle", "5"], "cannot be combined with --exit-when-idle"),
        (["--dsn", server.dsn()], f"disagrees with CLUSTER_BUDGET {BUDGET}"),
        (["--dsn", server.dsn(user=role)], "cannot read the cluster tables"),
    ):
        budget = BUDGET + 1 if "disagrees" in message else BUDGET
        coord = CoordinatorProc(name, 2, "--cluster-budget", str(budget), *argv, wait=False)
        try:
            assert coord.proc.wait(30) == 1 and message in coord.log(), coord.log()
        finally:
            coord.close()
    other = unique_name[:-2] + "zz"
    coord = CoordinatorProc(other, 2, "--cluster-budget", str(BUDGET), "--dsn", server.dsn(), wait=False)
    try:
        assert coord.proc.wait(30) == 1 and "sharedpool cluster init" in coord.log(), coord.log()
    finally:
        coord.close()
    with coordinator(name, 2, "--cluster-budget", str(BUDGET), "--dsn", server.dsn()) as coord:
        with contextlib.closing(admin(server)) as conn:
            assert wait_until(lambda: any(h["host"] for h in agent_side.cluster_status(conn, name)["hosts"]), 10)
        started = time.monotonic()
        assert coord.stop() == 0
        # functional, not a latency bound: the parked slot was freed, so the drain did not run to its 10 s end
        assert time.monotonic() - started < 9.0, coord.log()


def test_metrics_list_every_host(world, pool_role):
    from prometheus_client import CollectorRegistry, generate_latest

    _, server = world
    name, _ = pool_role
    with contextlib.closing(admin(server)) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO sharedpool.cluster_hosts (pool, host, ceiling, share, held, fenced) "
                    "VALUES (%s, 'h9', 4, 2, 1, 3)", (name,))
    registry = CollectorRegistry()
    registry.register(agent_side.collector(server.dsn(), [name]))
    text = generate_latest(registry).decode()
    assert f'sharedpool_cluster_budget{{pool="{name}"}} {float(BUDGET)}' in text
    assert f'sharedpool_cluster_host_share{{host="h9",pool="{name}"}} 2.0' in text
    assert f'sharedpool_cluster_host_fenced_total{{host="h9",pool="{name}"}} 3.0' in text
    assert f'sharedpool_cluster_host_heartbeat_age_seconds{{host="h9",pool="{name}"}}' in text
