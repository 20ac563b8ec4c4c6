"""The Django ENGINE sharedpool.integrations.django against a real PostgreSQL.

Most tests drive the ORM in this process (tests/django_project/harness.py
configures Django once and gives each test a DATABASES entry of its own pool
NAME, served by a coordinator the test starts). ``manage.py test`` and the
embedded coordinator run in subprocesses.
"""
from __future__ import annotations

import contextlib
import gc
import os
import secrets
import subprocess
import sys
import threading
import time

import psycopg2
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.join(HERE, "django_project")
sys.path.insert(0, PROJECT)
pytest.importorskip("django")

import harness  # noqa: E402

harness.setup()

from django.core.signals import request_finished, request_started  # noqa: E402
from django.db import DatabaseError, OperationalError, connection, connections, transaction  # noqa: E402
from django.test import Client  # noqa: E402
from pooltest.models import Item  # noqa: E402

import sharedpool  # noqa: E402
from devtools.pgcluster import parse_dsn  # noqa: E402
from sharedpool.integrations.django.base import DRIVER, close_pools  # noqa: E402
from django.db.backends.postgresql.psycopg_any import IsolationLevel  # noqa: E402  (bound by the ENGINE first)
from helpers_procs import coordinator  # noqa: E402

TABLE = "CREATE TABLE pooltest_item (id serial PRIMARY KEY, name varchar(50) NOT NULL, n integer NOT NULL)"


def shm_leftovers(name):
    """/dev/shm entries of pool ``name`` (its segment and semaphore)."""
    return sorted(entry for entry in os.listdir("/dev/shm") if name in entry)


def admin(pg, sql, params=None, dbname=None):
    """Run one statement on its own short-lived connection; return the rows, if any."""
    kwargs = {"dbname": dbname} if dbname else {}
    conn = psycopg2.connect(pg.dsn, **kwargs)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else None
    finally:
        conn.close()


@pytest.fixture(scope="module")
def database(pg):
    """A database of this module with the pooltest_item table."""
    name = f"djeng_{secrets.token_hex(4)}"
    admin(pg, f"CREATE DATABASE {name}")
    admin(pg, TABLE, dbname=name)
    yield name
    admin(pg, f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def start_coordinator():
    """Start a real coordinator for a pool name; stop it and remove its IPC objects at teardown."""
    with contextlib.ExitStack() as stack:
        yield lambda name, budget: stack.enter_context(coordinator(name, budget))


@pytest.fixture
def use_django(pg, database, unique_name, start_coordinator):
    """Point Django's "default" at the module database, on pool ``unique_name``; undo at teardown."""
    target = parse_dsn(pg.dsn)
    started = set()

    def configure(pool_size=4, pool_options=None, **extra):
        if pool_size not in started:
            assert not started, "one budget per test"
            start_coordinator(unique_name, pool_size)
            started.add(pool_size)
        entry = {
            "ENGINE": "sharedpool.integrations.django",
            "NAME": database,
            "HOST": target.get("host", ""),
            "PORT": target.get("port", ""),
            "USER": target.get("user", ""),
            "PASSWORD": target.get("password", ""),
            "POOL_SIZE": pool_size,
            "POOL_OPTIONS": {"NAME": unique_name, "AUTOSTART": False, **(pool_options or {})},
            **extra,
        }
        harness.use_databases(default=entry)
        return unique_name

    yield configure
    connections.close_all()
    close_pools(unique_name)
    harness.use_databases()
    admin(pg, "TRUNCATE pooltest_item", dbname=database)


def backends(pg, name):
    """Backend pids the server shows for pool ``name``."""
    rows = admin(pg, "SELECT pid FROM pg_stat_activity WHERE application_name = %s", [f"sharedpool/{name}"])
    return sorted(pid for (pid,) in rows)


def backend_pid():
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def pool_stats(name):
    return sharedpool.stats()[name]


def in_thread(func):
    """Run func in a new thread (its own Django connection), closing that connection after."""
    result = {}

    def run():
        try:
            result["value"] = func()
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            result["error"] = err
        finally:
            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


# -- the ORM through the pool --------------------------------------------------------


def test_orm_basics_through_the_pool(use_django, pg):
    name = use_django()
    Item.objects.create(name="a", n=1)
    Item.objects.bulk_create([Item(name="b", n=2), Item(name="c", n=3)])
    assert list(Item.objects.order_by("n").values_list("name", flat=True)) == ["a", "b", "c"]
    assert Item.objects.filter(n__gte=2).update(n=0) == 2
    assert connection.vendor == "postgresql"
    raw = connection.connection
    assert type(raw).__module__.split(".")[0] == DRIVER.name  # the raw driver connection (psycopg 3 when installed)
    assert raw.info.backend_pid in backends(pg, name)
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('TimeZone'), current_setting('client_connection_check_interval')")
        assert cursor.fetchone() == ("UTC", "100ms")


def test_connection_reused_across_close(use_django, pg):
    name = use_django(CONN_MAX_AGE=0)
    pid = backend_pid()
    connection.close()
    assert connection.connection is None
    assert pool_stats(name)["pool_available"] == 1
    assert backend_pid() == pid
    # Request cycles (the test Client keeps connections open, so send the signals):
    # request_finished gives the connection back at CONN_MAX_AGE=0.
    for _ in range(2):
        request_started.send(sender=None)
        assert backend_pid() == pid
        request_finished.send(sender=None)
        assert connection.connection is None
    assert backends(pg, name) == [pid]
    stats = pool_stats(name)
    assert (stats["connections_num"], stats["pool_in_use"], stats["pool_available"]) == (1, 0, 1)


@pytest.mark.parametrize("max_age", [0, 60, None])
def test_conn_max_age(use_django, max_age):
    """Whatever CONN_MAX_AGE says, a request gives its connection back to the shared pool; the next reuses it."""
    name = use_django(CONN_MAX_AGE=max_age)
    request_started.send(sender=None)
    pid = backend_pid()
    request_finished.send(sender=None)
    assert connection.connection is None
    assert pool_stats(name)["pool_in_use"] == 0
    request_started.send(sender=None)
    assert backend_pid() == pid
    request_finished.send(sender=None)


def test_transactions_savepoints_and_on_commit(use_django):
    use_django()
    ran = []
    with transaction.atomic():
        Item.objects.create(name="outer")
        transaction.on_commit(lambda: ran.append("outer"))
        try:
            with transaction.atomic():
                Item.objects.create(name="inner")
                transaction.on_commit(lambda: ran.append("inner"))
                raise ValueError
        except ValueError:
            pass
        with transaction.atomic():
            Item.objects.create(name="kept")
            transaction.on_commit(lambda: ran.append("kept"))
        assert ran == []
    assert ran == ["outer", "kept"]
    assert sorted(Item.objects.values_list("name", flat=True)) == ["kept", "outer"]

    with pytest.raises(RuntimeError):
        with transaction.atomic():
            Item.objects.create(name="lost")
            transaction.on_commit(lambda: ran.append("lost"))
            raise RuntimeError
    assert ran == ["outer", "kept"]
    assert not Item.objects.filter(name="lost").exists()


def test_close_inside_atomic_discards(use_django, pg):
    from django.db import Error as DatabaseError

    name = use_django()
    with pytest.raises(DatabaseError):  # a closed connection, as the driver words it
        with transaction.atomic():
            Item.objects.create(name="half")
            pid = backend_pid()
            connection.close()  # e.g. close_if_unusable_or_obsolete after an error
            Item.objects.count()
    stats = pool_stats(name)
    assert (stats["pool_size"], stats["pool_in_use"]) == (0, 0)  # closed for real, permit back
    assert pid not in backends(pg, name)
    assert backend_pid() != pid
    assert not Item.objects.filter(name="half").exists()


def test_server_side_cursor_iterator(use_django, pg):
    use_django()
    Item.objects.bulk_create(Item(name=f"i{i}", n=i) for i in range(10))
    iterator = Item.objects.order_by("n").iterator(chunk_size=3)
    assert next(iterator).n == 0
    pinned = connection.connection
    with connection.cursor() as cursor:
        cursor.execute("SELECT name, is_holdable FROM pg_cursors")
        ((cursor_name, holdable),) = cursor.fetchall()
    assert cursor_name.startswith("_django_curs_") and holdable  # autocommit: WITH HOLD
    assert [item.n for item in iterator] == list(range(1, 10))
    assert connection.connection is pinned

    # Abandoned half-way: the holdable cursor must not outlive the checkout,
    # and the iterator's own late close must not reach the next user's session.
    iterator = Item.objects.iterator(chunk_size=2)
    next(iterator)
    pid = backend_pid()
    connection.close()
    with transaction.atomic():
        assert backend_pid() == pid
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_cursors")
            assert cursor.fetchone()[0] == 0
        del iterator
        gc.collect()
        assert Item.objects.count() == 10  # the transaction is not aborted

    with transaction.atomic():  # inside a transaction: an ordinary (non-holdable) cursor
        assert [i.n for i in Item.objects.filter(n__lt=3).order_by("n").iterator(chunk_size=1)] == [0, 1, 2]


def test_select_for_update(use_django):
    use_django()
    item = Item.objects.create(name="row")
    locked = threading.Event()
    release = threading.Event()

    def hold_lock():
        with transaction.atomic():
            Item.objects.select_for_update().get(pk=item.pk)
            locked.set()
            release.wait(10)

    holder, holder_result = in_thread(hold_lock)
    try:
        assert locked.wait(10)

        def try_lock():
            with transaction.atomic():
                return list(Item.objects.select_for_update(nowait=True).filter(pk=item.pk))

        contender, result = in_thread(try_lock)
        contender.join(10)
        assert isinstance(result.get("error"), DatabaseError)
        skipped = in_thread(lambda: transaction.atomic()(
            lambda: list(Item.objects.select_for_update(skip_locked=True)))())
        skipped[0].join(10)
        assert skipped[1] == {"value": []}
    finally:
        release.set()
        holder.join(10)
    assert "error" not in holder_result
    with transaction.atomic():
        assert Item.objects.select_for_update().get(pk=item.pk).name == "row"


def test_atomic_requests_with_test_client(use_django):
    name = use_django(ATOMIC_REQUESTS=True)
    client = Client(raise_request_exception=False)
    assert client.get("/create/kept/").status_code == 200
    assert client.get("/create-then-fail/gone/").status_code == 500
    assert list(Item.objects.values_list("name", flat=True)) == ["kept"]
    connection.close()
    stats = pool_stats(name)
    assert (stats["pool_in_use"], stats["returns_bad"]) == (0, 0)


def test_budget_caps_connections(use_django, pg):
    name = use_django(pool_size=2, pool_options={"TIMEOUT": 0.5})
    entered, release = threading.Barrier(3), threading.Event()

    def hold():
        pid = backend_pid()
        entered.wait(10)
        release.wait(10)
        return pid

    holders = [in_thread(hold) for _ in range(2)]
    entered.wait(10)
    try:
        assert len(backends(pg, name)) == 2
        started = time.monotonic()
        with pytest.raises(OperationalError, match=name):
            backend_pid()
        assert time.monotonic() - started >= 0.4
    finally:
        release.set()
        for thread, _ in holders:
            thread.join(10)
    assert backend_pid() in [result["value"] for _, result in holders]  # reused, not a third
    assert len(backends(pg, name)) <= 2


def test_failed_health_check_discards_connection(use_django, pg):
    """CONN_HEALTH_CHECKS: the pool pings a connection before a request reuses it (PRE_PING 0)."""
    name = use_django(CONN_MAX_AGE=None, CONN_HEALTH_CHECKS=True)
    pid = backend_pid()
    connection.close_if_unusable_or_obsolete()  # request boundary: back to the shared pool
    admin(pg, "SELECT pg_terminate_backend(%s)", [pid])
    deadline = time.monotonic() + 5
    while pid in backends(pg, name) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert backend_pid() != pid  # the dead one was found by the ping and replaced
    assert pid not in backends(pg, name)
    assert pool_stats(name)["pool_size"] == 1


def test_session_options_get_their_own_connections(use_django):
    use_django()
    assert connection.cursor() and connection.connection.isolation_level is None
    default_pid = backend_pid()
    connection.close()
    connection.settings_dict["OPTIONS"]["isolation_level"] = IsolationLevel.SERIALIZABLE
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SHOW transaction_isolation")
            assert cursor.fetchone()[0] == "serializable"
        serializable_pid = backend_pid()
    assert serializable_pid != default_pid
    connection.close()
    del connection.settings_dict["OPTIONS"]["isolation_level"]
    assert backend_pid() == default_pid
    assert connection.connection.isolation_level is None


def test_raw_api(use_django, pg):
    name = use_django()
    with sharedpool.connection("default") as raw:
        assert raw.autocommit is False
        with raw.cursor() as cur:
            cur.execute("INSERT INTO pooltest_item (name, n) VALUES ('raw', 1)")
        raw.commit()
        assert raw.info.backend_pid in backends(pg, name)
    assert Item.objects.get().name == "raw"
    connection.close()
    proxy = sharedpool.ConnectionProxy("default")
    cur = proxy.cursor()
    cur.execute("SELECT count(*) FROM pooltest_item")
    assert cur.fetchone() == (1,)
    proxy.close()
    assert pool_stats(name)["pool_in_use"] == 0


# -- subprocesses: manage.py test, the embedded coordinator -----------------------------


def project_env(pg, **extra):
    target = parse_dsn(pg.dsn)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SHAREDPOOL_", "DJANGO_"))}
    env.update(
        PGHOST=target.get("host", ""), PGPORT=target.get("port", ""), PGUSER=target.get("user", ""),
        PGPASSWORD=target.get("password", ""),
        PYTHONPATH=os.pathsep.join(filter(None, [PROJECT, os.path.dirname(HERE), env.get("PYTHONPATH")])),
        **extra,
    )
    return env


def test_manage_py_test_creates_and_drops_test_db(pg, unique_name, start_coordinator):
    start_coordinator(unique_name, 3)
    db = f"djproj_{secrets.token_hex(3)}"
    proc = subprocess.run(
        [sys.executable, "manage.py", "test", "pooltest", "-v", "2", "--noinput"],
        cwd=PROJECT, env=project_env(pg, DJPROJ_DB=db, DJPROJ_POOL=unique_name, DJPROJ_POOL_SIZE="3"),
        capture_output=True, text=True, timeout=120,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert f"Creating test database for alias 'default' ('test_{db}')" in output
    assert f"Destroying test database for alias 'default' ('test_{db}')" in output
    assert "Ran 5 tests" in output and "OK" in output
    assert admin(pg, "SELECT datname FROM pg_database WHERE datname LIKE %s", [f"%{db}%"]) == []
    assert backends(pg, unique_name) == []


SCRIPT = """
import logging.config
import sharedpool  # imported before Django configures logging, as a server hook module would be
import django
from django.conf import settings
settings.LOGGING = {"version": 1}  # dictConfig's default: disable_existing_loggers=True
django.setup()
from django.db import connection
with connection.cursor() as cursor:
    cursor.execute("SELECT 1")
    print("result", cursor.fetchone()[0])
"""


def test_embedded_coordinator_starts_and_says_so(pg, unique_name, tmp_path):
    """No coordinator: the first checkout starts one, logs a warning, and it cleans up after."""
    stderr = tmp_path / "stderr"
    with open(stderr, "w") as err:  # a file, not a pipe: the coordinator outlives the script
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT], cwd=PROJECT, stdout=subprocess.PIPE, stderr=err, text=True,
            env=project_env(pg, DJANGO_SETTINGS_MODULE="project.settings", DJPROJ_DB="postgres",
                            DJPROJ_POOL=unique_name),
            timeout=60,
        )
    log = stderr.read_text()
    assert proc.returncode == 0, log
    assert "result 1" in proc.stdout
    assert f"sharedpool: started an embedded coordinator for pool '{unique_name}'" in log
    deadline = time.monotonic() + 10
    while shm_leftovers(unique_name) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert shm_leftovers(unique_name) == []
