"""LocalPool against a real PostgreSQL and a real coordinator: checkout, limits, health, threads, fork."""
from __future__ import annotations

import os
import time
import traceback

import psycopg2
import pytest

from sharedpool import LocalPool, PoolClosed, PoolConfig, PoolTimeout
from sharedpool.ledger import Ledger
from helpers_procs import PeakSampler, backends, close_and_check_no_leak, coordinator, finish, read_line, run_in_threads, start_worker, wait_until


@pytest.fixture
def make_pool(dsn, unique_name):
    """Build pools on a fresh coordinator; close them and check no permit leaked."""
    made = []
    with coordinator(unique_name, 4) as coord:

        def make(**options):
            options.setdefault("driver", "psycopg2")  # the psycopg2 errors asserted below; both drivers: test_drivers.py
            config = PoolConfig(name=unique_name, pool_size=options.pop("pool_size", 4), **options)
            pool = LocalPool(config, dsn)
            made.append(pool)
            return pool

        make.coordinator = coord
        yield make
        close_and_check_no_leak(made, unique_name)


def hold_connections(name: str, dsn: str, count: int):
    """Another worker process that checks ``count`` connections out of the 4-permit pool and keeps them."""
    holder = start_worker(
        f"""
        import sys
        from sharedpool import LocalPool, PoolConfig
        pool = LocalPool(PoolConfig(name={name!r}, pool_size=4), {dsn!r})
        conns = [pool.getconn() for _ in range({count})]
        print("held", flush=True)
        sys.stdin.read()
        """
    )
    assert read_line(holder) == "held"
    return holder


def backend_pid(conn) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        return cur.fetchone()[0]


def test_checkout_reuses_the_warmest_connection_first(make_pool):
    pool = make_pool()
    a, b = pool.getconn(), pool.getconn()
    pid_a, pid_b = backend_pid(a), backend_pid(b)
    pool.putconn(a)
    pool.putconn(b)
    warmest = pool.getconn()
    assert backend_pid(warmest) == pid_b  # LIFO: last returned, first out
    pool.putconn(warmest)
    assert pool.get_stats()["connections_num"] == 2
    assert pid_a != pid_b


def test_connection_context_rolls_back_on_error(make_pool):
    pool = make_pool()
    with pytest.raises(ZeroDivisionError):
        with pool.connection() as conn:
            with conn.cursor() as cur:
                cur.execute("CREATE TEMP TABLE t (x int)")
            1 / 0
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('pg_temp.t')")
        assert cur.fetchone()[0] is None  # rolled back, same session
    assert pool.get_stats()["connections_num"] == 1


def test_failed_transaction_is_rolled_back_on_return(make_pool):
    pool = make_pool()
    conn = pool.getconn()
    with pytest.raises(psycopg2.errors.DivisionByZero):
        conn.cursor().execute("SELECT 1/0")
    pool.putconn(conn)
    again = pool.getconn()
    assert again is conn
    assert again.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    pool.putconn(again)


def test_max_per_process_and_timeout_message(make_pool):
    pool = make_pool(max_per_process=2, timeout=0.2)
    held = [pool.getconn(), pool.getconn()]
    with pytest.raises(PoolTimeout, match=r"MAX_PER_PROCESS 2 reached .*2 in use, 0 idle"):
        pool.getconn()
    for conn in held:
        pool.putconn(conn)


def test_budget_timeout_names_the_holders(make_pool, dsn, unique_name):
    pool = make_pool(pool_size=4, timeout=0.3)
    holder = hold_connections(unique_name, dsn, 4)
    started = time.monotonic()
    with pytest.raises(PoolTimeout) as info:
        pool.getconn()
    assert time.monotonic() - started < 5  # bounded wait
    text = str(info.value)
    assert f"pool {unique_name!r}: no permit after 0.3 s (budget 4" in text
    assert f"pid {holder.pid} held 4 (idle 0, in use 4)" in text
    finish(holder)


def test_recycle_replaces_old_connections(make_pool):
    pool = make_pool(recycle=0.2)
    conn = pool.getconn()
    first = backend_pid(conn)
    pool.putconn(conn)
    time.sleep(0.3)
    conn = pool.getconn()
    assert backend_pid(conn) != first
    pool.putconn(conn)


def test_idle_connections_expire_after_max_idle(make_pool, dsn, unique_name):
    pool = make_pool(max_idle=0.4, min_idle=1)
    conns = [pool.getconn() for _ in range(3)]
    for conn in conns:
        pool.putconn(conn)
    assert backends(dsn, unique_name) == 3
    # the listener thread expires them; MIN_IDLE keeps one
    assert wait_until(lambda: backends(dsn, unique_name) == 1, timeout=5)
    assert pool.get_stats()["pool_available"] == 1


def test_pre_ping_replaces_a_terminated_backend(make_pool, dsn):
    pool = make_pool(pre_ping=0)
    conn = pool.getconn()
    victim = backend_pid(conn)
    pool.putconn(conn)
    admin = psycopg2.connect(dsn)
    admin.autocommit = True
    admin.cursor().execute("SELECT pg_terminate_backend(%s)", (victim,))
    admin.close()
    conn = pool.getconn()
    assert backend_pid(conn) != victim
    assert pool.get_stats()["connections_lost"] == 1
    pool.putconn(conn)


def test_server_restart_loses_no_permit(make_pool, pg, unique_name):
    pool = make_pool(pre_ping=None)
    conns = [pool.getconn() for _ in range(3)]
    pool.putconn(conns[0])
    pg.restart()
    # a checked-out connection breaks in use; returning it discards it and frees its permit
    with pytest.raises(psycopg2.OperationalError):
        conns[1].cursor().execute("SELECT 1")
    pool.putconn(conns[1])
    pool.putconn(conns[2])
    ledger = Ledger.attach(unique_name)
    try:
        slot = ledger.slots[pool.budget.gate.slot_index]
        assert slot.held == pool.budget.open == 2  # the idle ones still count until noticed
        pool.close()
        assert ledger.sem.value == 4
    finally:
        ledger.close()
    with pool.connection() as conn, conn.cursor() as cur:  # and the pool serves again
        cur.execute("SELECT 1")


def test_sixteen_threads_share_four_connections(make_pool, dsn, unique_name):
    pool = make_pool(pool_size=4, max_per_process=4, timeout=30)
    done = []

    def work():
        for _ in range(15):
            with pool.connection() as conn, conn.cursor() as cur:
                cur.execute("SELECT pg_sleep(0.005)")
        done.append(1)

    with PeakSampler(dsn, unique_name) as sampler:
        errors = run_in_threads(work, 16)
    assert not errors
    assert len(done) == 16
    assert 0 < sampler.peak <= 4
    assert pool.get_stats()["connections_num"] <= 4


def test_fork_child_uses_its_own_connections_and_permits(make_pool, unique_name):
    pool = make_pool(pool_size=4)
    kept = pool.getconn()
    idle = pool.getconn()
    parent_pids = {backend_pid(kept), backend_pid(idle)}
    pool.putconn(idle)
    read_fd, write_fd = os.pipe()
    children = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which never returns into pytest
            code = 1
            try:
                os.close(read_fd)
                ledger = pool.budget.ledger
                assert pool.get_stats()["pool_available"] == 0  # nothing inherited
                with pool.connection() as conn:
                    child_backend = backend_pid(conn)
                    slot = ledger.slots[pool.budget.gate.slot_index]
                    assert slot.pid == os.getpid() and slot.held == 1
                    os.write(write_fd, f"{child_backend}\n".encode())
                pool.budget.close()
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        children.append(pid)
    os.close(write_fd)
    for pid in children:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    child_backends = {int(line) for line in os.fdopen(read_fd).read().split()}
    assert len(child_backends) == 2 and not child_backends & parent_pids
    # the parent's sessions survived the children's exits
    assert backend_pid(kept) in parent_pids
    again = pool.getconn()
    assert backend_pid(again) in parent_pids
    pool.putconn(again)
    pool.putconn(kept)
    ledger = pool.budget.ledger
    assert wait_until(lambda: ledger.sem.value == 4 - pool.budget.open)


def test_closing_keeps_the_permits_of_connections_still_checked_out(make_pool, unique_name):
    pool = make_pool(pool_size=4)
    busy = pool.getconn()
    pool.putconn(pool.getconn())
    ledger = pool.budget.ledger
    pool.budget.close()  # e.g. worker_exit while a gthread request is still running
    assert ledger.sem.value == 3  # the idle one went back; the busy one still counts
    assert backend_pid(busy)
    pool.putconn(busy)  # returned after close: closed for real, permit back, slot freed
    assert ledger.sem.value == 4
    assert busy.closed


def test_a_killed_child_returns_its_permits(make_pool, unique_name):
    pool = make_pool(pool_size=4)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        for _ in range(3):
            pool.getconn()  # kept checked out until the SIGKILL
        time.sleep(60)
        os._exit(0)
    ledger = pool.budget.ledger if pool.budget.ledger else Ledger.attach(unique_name)
    assert wait_until(lambda: ledger.sem.value == 1, timeout=10)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    assert wait_until(lambda: ledger.sem.value == 4, timeout=2)


def test_a_closed_pool_refuses_checkouts(make_pool):
    pool = make_pool()
    pool.putconn(pool.getconn())
    pool.budget.close()
    with pytest.raises(PoolClosed, match="is closed"):
        pool.getconn()


def test_synchronous_close_waits_for_the_backend_even_with_unread_notifications(dsn):
    from sharedpool.closing import close_synchronously

    listener = psycopg2.connect(dsn)
    listener.autocommit = True
    listener.cursor().execute("LISTEN sharedpool_test")
    pid = backend_pid(listener)
    notifier = psycopg2.connect(dsn)
    notifier.autocommit = True
    for _ in range(3):
        notifier.cursor().execute("NOTIFY sharedpool_test, 'unread'")
    time.sleep(0.1)  # the notifications now sit unread in the listener's socket
    close_synchronously(listener)
    with notifier.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
        assert cur.fetchone()[0] == 0  # gone from the server when close returned
    notifier.close()


def test_threads_share_connections_without_reconnecting_when_the_budget_is_short(make_pool, dsn, unique_name):
    """Another process holds half the budget: our 8 threads pass 2 connections around, no churn."""
    pool = make_pool(pool_size=4, max_per_process=4, timeout=30)
    holder = hold_connections(unique_name, dsn, 2)

    def work():
        for _ in range(20):
            with pool.connection() as conn, conn.cursor() as cur:
                cur.execute("SELECT pg_sleep(0.002)")

    with PeakSampler(dsn, unique_name) as sampler:
        errors = run_in_threads(work, 8)
    finish(holder)
    assert not errors
    assert sampler.peak <= 4
    # on the server: the holder's 2 backends and our 2, handed between threads, never reopened
    assert len(sampler.seen) == 4, sampler.seen
