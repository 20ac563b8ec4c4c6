"""sharedpool.integrations.sqlalchemy: Engines under the host budget, on a real server.

Workers are separate interpreters with their own Engine; the cap is counted
on the server (pg_stat_activity), the permits in the semaphore.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psycopg2
import pytest

sqlalchemy = pytest.importorskip("sqlalchemy")
from sqlalchemy import create_engine, event, text  # noqa: E402

from apps.loadtools import Load, stop_server, wait_http  # noqa: E402
from devtools.pgcluster import free_port  # noqa: E402
from sharedpool.errors import ConfigError, PoolTimeout  # noqa: E402
from sharedpool.integrations.sqlalchemy import SharedPool  # noqa: E402
from sharedpool.ledger import Ledger  # noqa: E402
from sharedpool.pool import close_all  # noqa: E402
from helpers_procs import (  # noqa: E402
    ROOT, PeakSampler, backends, coordinator, finish, kill_all, on_server, read_line, sem_free, start_worker,
    wait_until)

ENGINE_SETUP = """
import os, sys
from sqlalchemy import create_engine, text
from sharedpool.integrations.sqlalchemy import SharedPool
engine = create_engine(
    os.environ["SA_URL"], poolclass=SharedPool, pool_pre_ping=os.environ.get("SA_PRE_PING") == "1",
    sharedpool={"NAME": os.environ["SA_NAME"], "POOL_SIZE": int(os.environ["SA_BUDGET"]),
                "AUTOSTART": False, "TIMEOUT": 120},
)
"""

# Every checkout path: Connection, begin(), raw_connection(), hard and soft invalidation.
CHECKOUT_WORKER = ENGINE_SETUP + """
for i in range(int(os.environ["SA_CHECKOUTS"])):
    kind = i % 4
    if kind == 0:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    elif kind == 1:
        with engine.begin() as conn:
            conn.execute(text("SELECT pg_backend_pid()"))
    elif kind == 2:
        raw = engine.raw_connection()
        cur = raw.cursor()
        cur.execute("SELECT 1")
        cur.close()
        raw.close()
    else:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            if i % 100 == 3:
                conn.invalidate()
            elif i % 100 == 51:
                conn.connection.invalidate(soft=True)
engine.dispose()
print("done", flush=True)
"""

HOLDING_WORKER = ENGINE_SETUP + """
import threading
held = [engine.connect() for _ in range(2)]
held[0].execute(text("SELECT 1"))
pid = held[1].execute(text("SELECT pg_backend_pid()")).scalar()
threading.Thread(target=lambda: held[1].execute(text("SELECT pg_sleep(60)")), daemon=True).start()
print("held", pid, flush=True)
sys.stdin.read()
"""

FORK_WORKER = ENGINE_SETUP + """
import traceback
from sharedpool.pool import close_all

def backend_pid(conn):
    return conn.execute(text("SELECT pg_backend_pid()")).scalar()

held = engine.connect()
held_pid = backend_pid(held)
held.commit()
with engine.connect() as conn:
    idle_pid = backend_pid(conn)  # back in the LocalPool, idle
for close in (True, False):
    child = os.fork()
    if child == 0:
        try:
            engine.dispose(close=close)
            with engine.connect() as conn:
                assert backend_pid(conn) not in (held_pid, idle_pid)
            held.close()  # the parent's checked-out connection: forgotten, not closed
            engine.dispose()
            close_all()
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"child (dispose close={close}) failed"
    assert backend_pid(held) == held_pid
    held.commit()
    with engine.connect() as conn:
        assert backend_pid(conn) == idle_pid
held.close()
engine.dispose()
print("ok", flush=True)
"""


def sa_url(pg) -> str:
    return pg.url.replace("postgresql://", "postgresql+psycopg2://", 1)


def worker_env(pg, name: str, budget: int, **extra: str) -> dict[str, str]:
    return {"SA_URL": sa_url(pg), "SA_NAME": name, "SA_BUDGET": str(budget), **extra}


@pytest.mark.slow
def test_eight_processes_budget_three_every_checkout_path(pg, dsn, unique_name, record_property):
    budget, checkouts = 3, 1000
    with coordinator(unique_name, budget), PeakSampler(dsn, unique_name) as sampler:
        started = time.monotonic()
        workers = [
            start_worker(CHECKOUT_WORKER, **worker_env(pg, unique_name, budget, SA_CHECKOUTS=str(checkouts),
                                                       SA_PRE_PING="1" if i == 0 else "0"))
            for i in range(8)
        ]
        try:
            outputs = [finish(worker, timeout=300) for worker in workers]
        finally:
            kill_all(workers)
        elapsed = time.monotonic() - started
        peak = sampler.stop()
        assert all(out.strip() == "done" for out in outputs), outputs
        assert 1 <= peak <= budget, f"server peak {peak} over budget {budget}"
        assert wait_until(lambda: sem_free(unique_name) == budget, 5.0), sem_free(unique_name)
        assert backends(dsn, unique_name) == 0
    record_property("server_peak", peak)
    record_property("samples", sampler.samples)
    record_property("checkouts_per_s", round(8 * checkouts / elapsed))


@pytest.mark.timing
def test_sigkilled_process_permits_come_back(pg, dsn, unique_name, record_property):
    budget = 3
    with coordinator(unique_name, budget):
        worker = start_worker(HOLDING_WORKER, **worker_env(pg, unique_name, budget))
        try:
            line = read_line(worker)
            assert line.startswith("held"), line
            assert sem_free(unique_name) == budget - 2
            os.kill(worker.pid, signal.SIGKILL)
            killed = time.monotonic()
            assert wait_until(lambda: sem_free(unique_name) == budget, 5.0), sem_free(unique_name)
            back_in = time.monotonic() - killed
        finally:
            kill_all([worker])
        assert backends(dsn, unique_name) == 0  # the backend in pg_sleep(60) went with it
    record_property("permits_back_ms", round(back_in * 1000))
    assert back_in < 1.0, f"permits back after {back_in:.3f} s"


def test_dispose_in_forked_child_keeps_the_parents_connections(pg, dsn, unique_name):
    budget = 4
    with coordinator(unique_name, budget):
        worker = start_worker(FORK_WORKER, **worker_env(pg, unique_name, budget))
        try:
            assert finish(worker, timeout=60).strip() == "ok"
        finally:
            kill_all([worker])
        assert wait_until(lambda: sem_free(unique_name) == budget, 5.0), sem_free(unique_name)
        assert backends(dsn, unique_name) == 0


@pytest.fixture
def engine(pg, unique_name):
    """An Engine in this process on a budget of 2, with its coordinator; everything closed after."""
    with coordinator(unique_name, 2):
        engine = create_engine(sa_url(pg), poolclass=SharedPool,
                               sharedpool={"NAME": unique_name, "POOL_SIZE": 2, "AUTOSTART": False, "TIMEOUT": 10})
        try:
            yield engine
        finally:
            engine.dispose()
            close_all(unique_name)


def backend_pid(conn) -> int:
    return conn.execute(text("SELECT pg_backend_pid()")).scalar()


def test_server_options_and_status(engine, unique_name):
    with engine.connect() as conn:
        assert conn.execute(text("SHOW application_name")).scalar() == f"sharedpool/{unique_name}"
        assert conn.execute(text("SHOW client_connection_check_interval")).scalar() == "100ms"
        assert "1 checked out" in engine.pool.status()
    assert "0 checked out, 1 idle" in engine.pool.status()


def test_invalidate_paths_give_permits_back(engine, dsn, unique_name):
    # hard invalidation: the backend is closed at once, its permit posted
    with engine.connect() as conn:
        first = backend_pid(conn)
        conn.invalidate()
        assert not on_server(dsn, first)
        assert sem_free(unique_name) == 2
        conn.rollback()
        assert backend_pid(conn) != first  # reconnected, with a new permit
        assert sem_free(unique_name) == 1
    assert sem_free(unique_name) == 1  # back in the LocalPool, idle: it keeps its permit

    # the server drops a connection: SQLAlchemy invalidates it and the pool's older connections
    with engine.connect() as idle_one, engine.connect() as doomed:
        idle_pid, doomed_pid = backend_pid(idle_one), backend_pid(doomed)
        idle_one.commit()
    admin = psycopg2.connect(dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", (doomed_pid,))
    admin.close()
    assert wait_until(lambda: not on_server(dsn, doomed_pid))
    with engine.connect() as one, engine.connect() as two:
        seen = []
        for conn in (one, two):
            try:
                seen.append(backend_pid(conn))
            except sqlalchemy.exc.DBAPIError as exc:
                assert exc.connection_invalidated
        assert seen == [idle_pid]
    assert sem_free(unique_name) == 1  # the dropped one's permit is back; idle_pid is idle
    with engine.connect() as one, engine.connect() as two:
        pids = {backend_pid(one), backend_pid(two)}
        assert idle_pid not in pids  # recycled: opened before the pool's invalidation
        assert sem_free(unique_name) == 0 and backends(dsn, unique_name) == 2
    assert not on_server(dsn, idle_pid)

    # soft invalidation: returned and kept, then closed at its next checkout
    with engine.connect() as conn:
        soft = backend_pid(conn)
        conn.connection.invalidate(soft=True)
    assert on_server(dsn, soft) and sem_free(unique_name) == 0
    with engine.connect() as conn:
        assert backend_pid(conn) != soft  # the other idle connection
        assert not on_server(dsn, soft) and sem_free(unique_name) == 1

    # a connect event that fails: the new connection is closed, its permit posted
    engine.dispose()
    failures = [RuntimeError("connect event failed")]

    @event.listens_for(engine, "connect")
    def fail_once(dbapi_connection, record):
        if failures:
            raise failures.pop()

    with pytest.raises(RuntimeError, match="connect event failed"):
        engine.connect()
    assert sem_free(unique_name) == 2 and backends(dsn, unique_name) == 0

    # detach: the connection leaves the pool and still holds its permit until closed
    raw = engine.raw_connection()
    raw.detach()
    assert sem_free(unique_name) == 1
    raw.close()
    assert sem_free(unique_name) == 2 and backends(dsn, unique_name) == 0


def test_settings_errors_are_clear(pg, unique_name):
    with pytest.raises(TypeError, match="pool_size"):
        create_engine(sa_url(pg), poolclass=SharedPool, pool_size=5,
                      sharedpool={"NAME": unique_name, "POOL_SIZE": 2})
    with pytest.raises(ConfigError, match="POOL_SIZ'"):
        create_engine(sa_url(pg), poolclass=SharedPool, sharedpool={"NAME": unique_name, "POOL_SIZ": 2})
    with pytest.raises(ConfigError, match="POOL_SIZE is required"):
        create_engine(sa_url(pg), poolclass=SharedPool)


def test_timeout_names_the_budget_and_leaks_nothing(pg, dsn, unique_name):
    with coordinator(unique_name, 1):
        engine = create_engine(sa_url(pg), poolclass=SharedPool,
                               sharedpool={"NAME": unique_name, "POOL_SIZE": 1, "AUTOSTART": False, "TIMEOUT": 0.2})
        try:
            with engine.connect() as held:
                backend_pid(held)
                with pytest.raises(sqlalchemy.exc.OperationalError) as caught:
                    engine.connect()
                assert isinstance(caught.value.orig, PoolTimeout)
                assert f"pool {unique_name!r}" in str(caught.value) and "after 0.2 s" in str(caught.value)
            with engine.connect() as conn:
                backend_pid(conn)
        finally:
            engine.dispose()
            close_all(unique_name)
        assert sem_free(unique_name) == 1 and backends(dsn, unique_name) == 0


def test_custom_creator_is_refused_without_leaking(pg, dsn, unique_name):
    with coordinator(unique_name, 1):
        engine = create_engine("postgresql+psycopg2://", creator=lambda: psycopg2.connect(dsn), poolclass=SharedPool,
                               sharedpool={"NAME": unique_name, "POOL_SIZE": 1, "AUTOSTART": False})
        try:
            with pytest.raises(ConfigError, match="creator="):
                engine.connect()
        finally:
            engine.dispose()
            close_all(unique_name)
        assert sem_free(unique_name) == 1


@pytest.mark.slow
def test_gunicorn_preload_app_on_an_engine(pg, dsn, unique_name, tmp_path, record_property):
    """gunicorn with sharedpool's hooks, --preload, 6 sync workers on a budget of 2, an Engine per process."""
    budget, port = 2, free_port()
    apps = os.path.join(ROOT, "tests", "apps")
    env = {**os.environ, "TEST_URL": sa_url(pg), "SHAREDPOOL_NAME": unique_name, "SHAREDPOOL_POOL_SIZE": str(budget),
           "SHAREDPOOL_TIMEOUT": "30", "PYTHONPATH": os.pathsep.join([apps, ROOT])}
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "python:sharedpool.integrations.gunicorn", "--preload",
             "--workers", "6", "--bind", f"127.0.0.1:{port}", "--max-requests", "40", "sqlalchemy_app:application"],
            cwd=apps, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_http(port, "/sleep?ms=0", process=process)
        with PeakSampler(dsn, unique_name) as sampler:
            load = Load(port, "/sleep?ms=20", clients=12, total=300).start()
            load.join()
            peak = sampler.stop()
        assert load.statuses == {200: 300}, load.summary() + log_path.read_text()[-3000:]
        assert 1 <= peak <= budget, f"server peak {peak} over budget {budget}"
    finally:
        stop_server(process)
    assert wait_until(lambda: not Ledger.exists(unique_name), 15.0), log_path.read_text()[-3000:]
    assert backends(dsn, unique_name) == 0
    record_property("gunicorn_server_peak", peak)
