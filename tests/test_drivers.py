"""LocalPool on both drivers (psycopg 3 and psycopg2) against a real PostgreSQL and coordinator.

Each test runs once per driver: checkout with the server options, backend pid
recording, reset on return, synchronous close, fork safety with a real
fork, the cap across processes; and what DRIVER=auto picks.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sharedpool import LocalPool, PoolConfig, PoolTimeout
from sharedpool import drivers
from devtools.pgcluster import _connect as admin_connect
from helpers_procs import ROOT, PeakSampler, backends, close_and_check_no_leak, coordinator, finish, start_worker, wait_until

DRIVERS = ("psycopg", "psycopg2")


@pytest.fixture(params=DRIVERS)
def driver(request) -> str:
    pytest.importorskip(request.param)
    return request.param


@pytest.fixture
def make_pool(dsn, unique_name, driver):
    """Pools of ``driver`` on a fresh coordinator (budget 4); closed after, every permit back."""
    made = []
    with coordinator(unique_name, 4) as coord:

        def make(**options):
            config = PoolConfig(name=unique_name, pool_size=4, driver=driver, **options)
            made.append(LocalPool(config, dsn))
            return made[-1]

        make.coordinator = coord
        yield make
        close_and_check_no_leak(made, unique_name)


def server_pids(dsn: str, name: str) -> set[int]:
    """Backend pids the server shows for pool ``name`` right now."""
    conn = admin_connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", (f"sharedpool/{name}",))
            return {pid for (pid,) in cur.fetchall()}
    finally:
        conn.close()


def terminate(dsn: str, pid: int) -> None:
    conn = admin_connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
    finally:
        conn.close()


def query(conn, sql: str):
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()[0]


def test_auto_is_psycopg3_when_importable():
    pytest.importorskip("psycopg")
    assert drivers.resolve("auto") == "psycopg"
    assert drivers.get("auto") is drivers.get("psycopg")


@pytest.mark.parametrize(("hidden", "setting", "expected"), [
    ("psycopg", "auto", "psycopg2"),
    ("psycopg2", "auto", "psycopg"),
    ("psycopg2", "psycopg2", "ConfigError: DRIVER='psycopg2' needs psycopg2"),
    ("psycopg", "psycopg", "ConfigError: DRIVER='psycopg' needs psycopg"),
])
def test_driver_choice_when_one_is_missing(hidden, setting, expected):
    # A fresh interpreter where one driver cannot be imported: errors.py must still import.
    code = (
        f"import sys; sys.modules[{hidden!r}] = None\n"
        "from sharedpool import drivers, errors\n"
        f"try: print(drivers.get({setting!r}).name)\n"
        "except errors.ConfigError as err: print('ConfigError:', err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.startswith(expected), out


def test_pool_errors_are_operational_errors_of_both_drivers():
    for name in DRIVERS:
        module = pytest.importorskip(name)
        assert issubclass(PoolTimeout, module.OperationalError)


def test_checkout_uses_the_driver_and_the_server_options(make_pool, dsn, driver):
    pool = make_pool()
    conn = pool.getconn()
    assert type(conn).__module__.split(".")[0] == driver
    assert query(conn, "SHOW client_connection_check_interval") == "100ms"
    pid = conn.info.backend_pid
    assert pid in list(pool.budget.gate.account.backends)  # recorded for the coordinator's reclaim
    assert server_pids(dsn, pool.config.name) == {pid}
    pool.putconn(conn)


def test_return_rolls_back_and_a_lost_connection_is_replaced(make_pool, dsn, driver):
    pool = make_pool(pre_ping=0)
    conn = pool.getconn()
    with pytest.raises(drivers.get(driver).Error):
        query(conn, "SELECT 1/0")
    pool.putconn(conn)  # in a failed transaction: rolled back, kept
    assert pool.getconn() is conn
    assert drivers.get(driver).transaction_status(conn) == drivers.IDLE
    old = conn.info.backend_pid
    pool.putconn(conn)
    terminate(dsn, old)
    again = pool.getconn()  # the ping finds it lost: closed, its permit back, a new one opened
    assert again.info.backend_pid != old and query(again, "SELECT 1") == 1
    assert pool.get_stats()["connections_lost"] == 1
    assert pool.budget.ledger.sem.value == 3
    pool.putconn(again)


def test_close_is_synchronous(make_pool, dsn):
    pool = make_pool()
    conns = [pool.getconn() for _ in range(3)]
    pids = [conn.info.backend_pid for conn in conns]
    pool.putconn(conns[0], discard=True)
    pool.putconn(conns[1])
    pool.close()  # the idle one
    # No sleep: when the permits are back, the server has already let the backends go.
    assert pool.budget.ledger.sem.value == 3
    assert server_pids(dsn, pool.config.name) == {pids[2]}
    pool.putconn(conns[2], discard=True)
    assert pool.budget.ledger.sem.value == 4
    assert server_pids(dsn, pool.config.name) == set()


def test_forked_child_drops_the_parents_connections_without_io(make_pool, dsn):
    pool = make_pool()
    busy, idle = pool.getconn(), pool.getconn()
    pool.putconn(idle)
    parent_pids = {busy.info.backend_pid, idle.info.backend_pid}
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # the child: report, never return into pytest
        status = 1
        try:
            os.close(reader)
            report = {"inherited": len(pool._idle) + len(pool._out)}
            conn = pool.getconn()
            report["own"] = conn.info.backend_pid
            report["works"] = query(conn, "SELECT 1")
            pool.putconn(conn)
            pool.budget.close()
            os.write(writer, json.dumps(report).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(writer)
    _, status = os.waitpid(child, 0)
    with os.fdopen(reader) as f:
        report = json.loads(f.read() or "{}")
    assert os.waitstatus_to_exitcode(status) == 0, report
    assert report["inherited"] == 0 and report["works"] == 1
    assert report["own"] not in parent_pids
    # The parent's sessions survived the child: both still answer, on the same backends.
    assert query(busy, "SELECT pg_backend_pid()") == busy.info.backend_pid
    assert pool.getconn() is idle and query(idle, "SELECT 1") == 1
    assert server_pids(dsn, pool.config.name) == parent_pids
    assert pool.budget.ledger.sem.value == 2  # the child's permit came back with its close
    pool.putconn(busy)
    pool.putconn(idle)


WORKER = """
    import os, random, threading
    from sharedpool import LocalPool, PoolConfig
    name, dsn, driver = os.environ["T_NAME"], os.environ["T_DSN"], os.environ["T_DRIVER"]
    pool = LocalPool(PoolConfig(name=name, pool_size=2, driver=driver, autostart=False, timeout=30), dsn)
    def loop(seed):
        rng = random.Random(seed)
        for _ in range(25):
            conn = pool.getconn()
            with conn.cursor() as cur:
                cur.execute("SELECT pg_sleep(0.005)")
            pool.putconn(conn, discard=rng.random() < 0.3)
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    pool.budget.close()
"""


def test_cap_holds_on_the_server_across_processes(dsn, unique_name, driver):
    with coordinator(unique_name, 2), PeakSampler(dsn, unique_name) as sampler:
        procs = [start_worker(WORKER, T_NAME=unique_name, T_DSN=dsn, T_DRIVER=driver) for _ in range(4)]
        for proc in procs:
            finish(proc, timeout=120)
        peak = sampler.stop()
        assert 1 <= peak <= 2
        assert wait_until(lambda: backends(dsn, unique_name) == 0)


def test_without_any_driver_the_error_says_what_to_install():
    code = (
        "import sys; sys.modules['psycopg'] = sys.modules['psycopg2'] = None\n"
        "import sharedpool\n"
        "try: sharedpool.LocalPool(sharedpool.PoolConfig(name='nodriver', pool_size=1))\n"
        "except sharedpool.ConfigError as err: print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.startswith("DRIVER='auto' needs psycopg 3 or psycopg2, which cannot be imported")
    assert out.strip().endswith("install the extra sharedpool[psycopg] or sharedpool[psycopg2]")
