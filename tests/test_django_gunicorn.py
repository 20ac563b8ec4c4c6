"""Django under a real gunicorn with a DATABASES entry copied from the guides (only the ENGINE changed).

8 sync workers share a budget of 4 with ``CONN_MAX_AGE: 300`` and
``ATOMIC_REQUESTS: True``: every request must succeed (each gives its
connection back to the shared pool at its end) and the server must never see
more than 4 of the pool's connections. Without DJANGO_SETTINGS_MODULE in the
arbiter's environment the hooks must say so.
"""
from __future__ import annotations

import os
import subprocess
import sys

import psycopg2
import pytest

from apps.loadtools import Load, stop_server, wait_http
from devtools.pgcluster import free_port, parse_dsn
from helpers_procs import PeakSampler, wait_until
from sharedpool.integrations.django.config import default_name
from sharedpool.ledger import Ledger

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = os.path.join(ROOT, "tests", "django_project")
NO_CONTROL_SOCKET = ["--no-control-socket"] if "control_socket_disable" in {
    setting.name for setting in __import__("gunicorn.config").config.KNOWN_SETTINGS} else []
APP = "django.core.wsgi:get_wsgi_application()"


def admin(pg, sql: str) -> None:
    conn = psycopg2.connect(pg.dsn, application_name="test-django-gunicorn")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def project_env(pg, **extra: str) -> dict[str, str]:
    target = parse_dsn(pg.dsn)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SHAREDPOOL_", "DJANGO_"))}
    env.update(
        PGHOST=target.get("host", ""), PGPORT=str(target.get("port", "")), PGUSER=target.get("user", ""),
        PGPASSWORD=target.get("password", ""),
        PYTHONPATH=os.pathsep.join(filter(None, [PROJECT, ROOT, env.get("PYTHONPATH")])),
        **extra,
    )
    return env


def gunicorn(port: int, env: dict[str, str], log, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "python:sharedpool.integrations.gunicorn",
         "--bind", f"127.0.0.1:{port}", *NO_CONTROL_SOCKET, "--graceful-timeout", "10", "--timeout", "60", *args, APP],
        cwd=PROJECT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )


@pytest.fixture
def database(pg, unique_name):
    """A database named after the test: the default pool NAME (its hash) is then this test's own."""
    admin(pg, f"CREATE DATABASE {unique_name}")
    yield unique_name
    admin(pg, f"DROP DATABASE {unique_name} WITH (FORCE)")


def test_guide_settings_8_sync_workers_on_a_budget_of_4(pg, database, tmp_path, request):
    env = project_env(pg, DJANGO_SETTINGS_MODULE="project.guide_settings", DJPROJ_DB=database)
    name = default_name({"NAME": database}, "default", env)
    assert not Ledger.exists(name)
    port = free_port()
    with open(tmp_path / "gunicorn.log", "wb") as log:
        server = gunicorn(port, env, log, "--workers", "8")
        try:
            wait_http(port, "/health", process=server)
            with PeakSampler(pg.dsn, name) as sampler:
                load = Load(port, "/query?s=0.02", clients=16, total=800).start()
                load.join()
                peak = sampler.stop()
        finally:
            stop_server(server)
    log_text = (tmp_path / "gunicorn.log").read_text(errors="replace")[-4000:]
    assert load.statuses == {200: 800}, f"{load.summary()}\n{log_text}"
    assert 1 <= peak <= 4, f"server-side peak {peak} > budget 4"
    assert wait_until(lambda: not Ledger.exists(name), timeout=10), "the embedded coordinator left its ledger"
    latencies = sorted(load.latencies)
    print(f"\n{request.node.name}: 800 requests, server-side peak {peak} (budget 4), "
          f"p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, p99 {latencies[int(len(latencies) * 0.99)] * 1000:.0f} ms")


def test_hooks_say_when_the_arbiter_has_no_django_settings_module(pg, tmp_path):
    port = free_port()
    with open(tmp_path / "gunicorn.log", "wb") as log:
        server = gunicorn(port, project_env(pg), log, "--workers", "1")
        try:
            server.wait(30)  # the worker cannot load Django without settings: gunicorn gives up
        finally:
            stop_server(server)
    text = (tmp_path / "gunicorn.log").read_text(errors="replace")
    assert ("sharedpool: no pool found: DJANGO_SETTINGS_MODULE is not set in this (the arbiter's) environment, "
            "so DATABASES cannot be read; set it where the server starts (export it, or gunicorn "
            "--env DJANGO_SETTINGS_MODULE=mysite.settings), or set SHAREDPOOL_NAME and SHAREDPOOL_POOL_SIZE; "
            "the hooks do nothing") in text, text
