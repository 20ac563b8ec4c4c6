"""A pool behind a real PgBouncer (session mode): no startup parameter the proxy refuses.

PgBouncer answers ``FATAL: unsupported startup parameter: options`` to a
client that sends ``options``; the pool sets client_connection_check_interval
with a statement once connected instead, and leaves an application_name given
in the DSN alone.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import psycopg2
import pytest

from sharedpool import LocalPool, PoolConfig
from helpers_procs import close_and_check_no_leak, coordinator

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
pytestmark = pytest.mark.skipif(not os.path.exists(PGBOUNCER), reason="pgbouncer not installed (devtools/system-deps.sh)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def bouncer_dsn(pg) -> Iterator[str]:
    """Start PgBouncer in session mode on a loopback port of its own; yield a DSN through it."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="sharedpool-pgbouncer-")  # pytest's tmp_path is closed to other users
    tmp_path = pathlib.Path(workdir)
    password = f" password={pg.password}" if getattr(pg, "password", None) else ""
    ini = tmp_path / "pgbouncer.ini"
    log = tmp_path / "pgbouncer.log"
    ini.write_text(
        f"""[databases]
proxied = host={pg.host} port={pg.port} dbname={pg.dbname} user={pg.user}{password}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = any
pool_mode = session
default_pool_size = 20
logfile = {log}
pidfile =
"""
    )
    kwargs = {}
    if os.geteuid() == 0:  # pgbouncer refuses to run as root
        user = pwd.getpwnam("postgres")
        for path in (tmp_path, ini):
            os.chown(path, user.pw_uid, user.pw_gid)
        kwargs = dict(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
    proc = subprocess.Popen([PGBOUNCER, str(ini)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"pgbouncer did not start: {proc.communicate()[1]}")
            time.sleep(0.05)
        yield f"host=127.0.0.1 port={port} dbname=proxied user={pg.user}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()
        shutil.rmtree(workdir, ignore_errors=True)


def server_sessions(dsn: str, application_name: str) -> list[str]:
    """The application names of the server's sessions named ``application_name``, seen directly."""
    conn = psycopg2.connect(dsn, application_name="test-proxy-probe")
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT application_name FROM pg_stat_activity WHERE application_name = %s", (application_name,)
            )
            return [row[0] for row in cur.fetchall()]
    finally:
        conn.close()


@pytest.fixture
def pool_through(bouncer_dsn, unique_name):
    made = []
    with coordinator(unique_name, 2):

        def make(dsn_suffix: str = "", **options) -> LocalPool:
            pool = LocalPool(PoolConfig(name=unique_name, pool_size=2, **options), bouncer_dsn + dsn_suffix)
            made.append(pool)
            return pool

        yield make
        close_and_check_no_leak(made, unique_name)


def test_pool_connects_through_pgbouncer_and_sets_the_check_interval(pool_through, dsn, unique_name):
    pool = pool_through()
    conns = [pool.getconn(), pool.getconn()]
    try:
        for conn in conns:
            assert conn.info.transaction_status == 0  # idle: the SET committed
            with conn.cursor() as cur:
                cur.execute("SELECT current_setting('client_connection_check_interval'), current_setting('application_name')")
                assert cur.fetchone() == ("100ms", f"sharedpool/{unique_name}")
        # the server sees the pool's two sessions under its name, behind the proxy
        assert len(server_sessions(dsn, f"sharedpool/{unique_name}")) == 2
    finally:
        for conn in conns:
            pool.putconn(conn)


def test_application_name_in_the_dsn_is_kept(pool_through, dsn, unique_name):
    app = f"shop-{unique_name}"
    pool = pool_through(f" application_name={app}")
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT current_setting('application_name')")
        assert cur.fetchone() == (app,)
        assert server_sessions(dsn, app) == [app]


def test_no_check_interval_sends_no_set(pool_through):
    pool = pool_through(check_interval=None)
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT current_setting('client_connection_check_interval')")
        assert cur.fetchone() == ("0",)
