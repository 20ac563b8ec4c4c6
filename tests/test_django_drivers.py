"""The Django ENGINE on each driver, with django.contrib.postgres and with Django's own pool.

Each case runs in fresh interpreters (Django's postgresql backend binds to one
driver per process), against a real PostgreSQL and a real coordinator; the cap
is counted on the server.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from devtools.pgcluster import parse_dsn
from helpers_procs import (
    PeakSampler, PoolWorker, backends, coordinator, finish, read_line, sem_free, start_worker, wait_until)

pytest.importorskip("django")

HERE = os.path.dirname(os.path.abspath(__file__))

# A process with Django configured on the ENGINE; T_* variables say how.
DJANGO = """
    import json, os
    import sharedpool.integrations.django  # first, as a settings module would: SHAREDPOOL_DRIVER binds here
    import django
    from django.conf import settings
    target = json.loads(os.environ["T_TARGET"])
    settings.configure(
        INSTALLED_APPS=os.environ.get("T_APPS", "").split(",") if os.environ.get("T_APPS") else [],
        DATABASES={"default": {
            "ENGINE": "sharedpool.integrations.django", "NAME": target["dbname"],
            "HOST": target.get("host", ""), "PORT": target.get("port", ""),
            "USER": target.get("user", ""), "PASSWORD": target.get("password", ""),
            "POOL_SIZE": int(os.environ["T_BUDGET"]),
            "POOL_OPTIONS": {"NAME": os.environ["T_NAME"], "AUTOSTART": False, "TIMEOUT": 60},
            "OPTIONS": json.loads(os.environ.get("T_OPTIONS", "{}")),
        }},
        USE_TZ=True,
    )
    django.setup()
    from django.db import connection, connections
    from sharedpool.integrations.django.base import DRIVER
"""

CONTRIB_POSTGRES = DJANGO + """
    from django.db.backends.postgresql.psycopg_any import NumericRange
    with connection.cursor() as cursor:
        cursor.execute("SELECT %s::int4range", [NumericRange(1, 5)])
        value = cursor.fetchone()[0]
    assert (value.lower, value.upper) == (1, 5), value
    connection.close()
    print(DRIVER.name, type(connection.connection).__module__ if connection.connection else "returned", flush=True)
"""

DJANGO_POOL = DJANGO + """
    import threading
    from django.db import close_old_connections
    assert connection.pool is not None, "no Django pool"
    def work():
        for _ in range(8):
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_sleep(0.01)")
            connection.close()  # back to Django's pool
    threads = [threading.Thread(target=work) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    stats = connection.pool.get_stats()
    from sharedpool.integrations.django.base import close_pools
    close_pools()  # as a worker-exit hook does: Django's pool closed, every permit back
    assert not connection._connection_pools
    print(DRIVER.name, stats.get("connections_num", 0), flush=True)
"""

DJANGO_POOL_FORK = DJANGO + """
    import traceback
    def backend_pid():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            return cursor.fetchone()[0]
    parent_backend = backend_pid()
    connection.close()  # idle in Django's pool, still open
    inherited = connection.pool
    child = os.fork()
    if child == 0:
        status = 1
        try:
            fresh = connection.pool is not inherited
            own = backend_pid()
            connection.close()
            connection.close_pool()
            status = 0 if fresh and own != parent_backend else 3
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    _, status = os.waitpid(child, 0)
    same = backend_pid() == parent_backend  # the parent's session survived the child
    connection.close()
    connection.close_pool()
    print(os.waitstatus_to_exitcode(status), same, flush=True)
"""

DJANGO_POOL_WAITS = DJANGO + """
    import sys
    from django.db import OperationalError
    def query():
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        connection.close()
    try:
        query()
        print("no wait", flush=True)
    except OperationalError as err:
        print("timeout", type(err.__cause__).__module__, flush=True)
    sys.stdin.readline()  # the other process gave its permit back
    query()
    print("ok", flush=True)
    from sharedpool.integrations.django.base import close_pools
    close_pools()
"""


def worker_env(pg, name: str, budget: int, **extra: str) -> dict[str, str]:
    """Environment of a DJANGO worker: the server of ``pg`` (none: never connects), pool name and budget."""
    return {
        "T_TARGET": json.dumps({**(parse_dsn(pg.dsn) if pg else {}), "dbname": "postgres"}),
        "T_NAME": name,
        "T_BUDGET": str(budget),
        **extra,
    }


@pytest.mark.parametrize(("setting", "expected"), [("", "psycopg"), ("psycopg2", "psycopg2")])
def test_contrib_postgres_on_each_driver(pg, unique_name, setting, expected):
    pytest.importorskip(expected)
    env = worker_env(pg, unique_name, 2, T_APPS="django.contrib.postgres", SHAREDPOOL_DRIVER=setting)
    with coordinator(unique_name, 2):
        out = finish(start_worker(CONTRIB_POSTGRES, **env))
    assert out.split()[0] == expected
    assert backends(pg.dsn, unique_name) == 0


def test_a_forced_driver_after_django_loaded_the_other_is_a_clear_error(pg, unique_name):
    pytest.importorskip("psycopg")
    # contrib.postgres loads Django's backend (on psycopg 3) during setup; POOL_OPTIONS asks for psycopg2.
    code = DJANGO.replace('"AUTOSTART": False', '"AUTOSTART": False, "DRIVER": "psycopg2"') + "    connection.cursor()\n"
    proc = start_worker(code, **worker_env(pg, unique_name, 2, T_APPS="django.contrib.postgres"))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "ImproperlyConfigured: ENGINE 'sharedpool.integrations.django' is set to DRIVER psycopg2" in err
    assert "SHAREDPOOL_DRIVER=psycopg2" in err


def test_django_pool_option_holds_the_host_budget(pg, unique_name):
    """4 processes, each with Django's pool (max_size 5) over a budget of 3: the server never sees 4."""
    pytest.importorskip("psycopg_pool")
    options = json.dumps({"pool": {"min_size": 0, "max_size": 5, "timeout": 60}})
    env = worker_env(pg, unique_name, 3, T_OPTIONS=options)
    with coordinator(unique_name, 3), PeakSampler(pg.dsn, unique_name) as sampler:
        procs = [start_worker(DJANGO_POOL, **env) for _ in range(4)]
        outs = [finish(proc, timeout=180) for proc in procs]
        peak = sampler.stop()
        assert all(out.split()[0] == "psycopg" for out in outs), outs
        assert 1 <= peak <= 3, peak
        assert wait_until(lambda: backends(pg.dsn, unique_name) == 0)
        assert sem_free(unique_name) == 3  # given back by the workers themselves, not reclaimed


def test_django_pool_in_a_forked_child(pg, unique_name):
    """A child forks with Django's pool holding an idle connection: it builds its own, the parent's lives on."""
    pytest.importorskip("psycopg_pool")
    env = worker_env(pg, unique_name, 3, T_OPTIONS='{"pool": {"min_size": 1, "max_size": 1}}')
    with coordinator(unique_name, 3):
        out = finish(start_worker(DJANGO_POOL_FORK, **env))
        assert out.split() == ["0", "True"]
        assert backends(pg.dsn, unique_name) == 0
        assert sem_free(unique_name) == 3


def test_django_pool_waits_for_a_permit_within_its_own_timeout(pg, unique_name):
    """No permit on the host: Django's pool times out as Django's would; a permit back, it connects."""
    pytest.importorskip("psycopg_pool")
    env = worker_env(pg, unique_name, 1, T_OPTIONS='{"pool": {"min_size": 0, "max_size": 2, "timeout": 1}}')
    with coordinator(unique_name, 1):
        holder = PoolWorker(unique_name, 1, pg.dsn)
        try:
            holder.get(1)
            proc = start_worker(DJANGO_POOL_WAITS, **env)
            assert read_line(proc) == "timeout psycopg_pool"  # psycopg_pool's PoolTimeout, wrapped by Django
            holder.do("put 1")
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert read_line(proc) == "ok"
            finish(proc)
        finally:
            holder.exit()
        assert sem_free(unique_name) == 1


def test_engine_tests_pass_on_psycopg2_too():
    """tests/test_django_engine.py runs on psycopg 3 here; run it once more with DRIVER=psycopg2."""
    pytest.importorskip("psycopg2")
    pytest.importorskip("psycopg")  # without psycopg 3 the module above already ran on psycopg2
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(HERE, "test_django_engine.py")],
        capture_output=True, text=True, cwd=os.path.dirname(HERE), timeout=600,
        env={**os.environ, "SHAREDPOOL_DRIVER": "psycopg2", "PYTEST_ADDOPTS": ""},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_an_entry_asking_for_the_other_driver_is_refused():
    """Django's backend runs on one driver per process: an entry asking for the other one is an error."""
    pytest.importorskip("psycopg")
    code = DJANGO + """
    from django.core.exceptions import ImproperlyConfigured
    from sharedpool.integrations.django.base import DatabaseWrapper
    entry = {**connection.settings_dict, "POOL_OPTIONS": {"NAME": "x", "DRIVER": "psycopg2"}}
    try:
        DatabaseWrapper(entry, "other")
    except ImproperlyConfigured as err:
        print(err, flush=True)
    """
    out = finish(start_worker(code, **worker_env(None, "unused", 2)))
    assert out.strip() == (
        "DATABASES['other']: DRIVER 'psycopg2', but Django's postgresql backend runs on psycopg "
        "in this process (one driver per process: see DRIVER in the README)"
    )


def test_entries_asking_for_different_drivers_are_refused():
    pytest.importorskip("psycopg")
    code = """
    import django
    from django.conf import settings
    entry = {"ENGINE": "sharedpool.integrations.django", "NAME": "db", "POOL_SIZE": 2}
    settings.configure(DATABASES={
        "default": {**entry, "POOL_OPTIONS": {"DRIVER": "psycopg2"}},
        "other": {**entry, "POOL_OPTIONS": {"DRIVER": "auto"}},
    })
    django.setup()
    from django.core.exceptions import ImproperlyConfigured
    try:
        import sharedpool.integrations.django
    except ImproperlyConfigured as err:
        print(err, flush=True)
    """
    out = finish(start_worker(code))
    assert "ask for different drivers ('default': psycopg2, 'other': psycopg)" in out
