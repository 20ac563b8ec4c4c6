"""Shared fixtures: a real PostgreSQL server and collision-free pool names.

- ``pg`` (session): ``.dsn`` (libpq keywords), ``.url``, ``.port``, ``.host``,
  ``.external``; ``.pg_ctl(*args)`` / ``.restart()`` / ``.datadir`` on a local
  TempCluster. With ``DATABASE_URL`` set no cluster is started and tests that
  need ``pg_ctl`` are skipped.
- ``dsn``: ``pg.dsn``.
- ``unique_name``: a short pool name unique to this test and this pytest process.
- ``shm_prefix`` (session): the prefix all ``unique_name`` values share; at the
  end of the session every /dev/shm entry containing it is a leak and fails the
  run (the leaked entries are then removed unless SHAREDPOOL_KEEP_LEAKS=1).
"""
from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import secrets
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from devtools.pgcluster import (  # noqa: E402
    TempCluster, dsn_to_url, parse_dsn, url_to_dsn)

SHM_DIR = "/dev/shm"


def _base36(n: int, width: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while n:
        n, r = divmod(n, 36)
        out = digits[r] + out
    return out.rjust(width, "0")[-width:]


# "t" + pid (5 base36 chars) + 4 random hex = 10 chars, fixed width so one
# session's prefix is never a prefix of another's by construction.
SESSION_PREFIX = "t" + _base36(os.getpid(), 5) + secrets.token_hex(2)
_counter = itertools.count(1)


class ExternalServer:
    """The server named by DATABASE_URL: no pg_ctl, no datadir."""

    external = True
    cluster = None

    def __init__(self, url: str):
        self.url = dsn_to_url(url)
        self.dsn = url_to_dsn(url)
        kw = parse_dsn(self.dsn)
        self.host = kw.get("host")
        self.port = int(kw["port"]) if kw.get("port") else None

    def _unavailable(self, *a, **k):
        pytest.skip("needs a local TempCluster (DATABASE_URL is set)")

    pg_ctl = restart = _unavailable

    @property
    def datadir(self):
        self._unavailable()

    def __repr__(self):
        return f"<ExternalServer {self.url}>"


class LocalServer:
    """A TempCluster seen through the same interface as ExternalServer."""

    external = False

    def __init__(self, cluster: TempCluster):
        self.cluster = cluster

    def __getattr__(self, name):
        return getattr(self.cluster, name)

    def __repr__(self):
        return repr(self.cluster)


@pytest.fixture(scope="session")
def pg():
    url = os.environ.get("DATABASE_URL")
    if url:
        yield ExternalServer(url)
        return
    cluster = TempCluster()
    cluster.start()
    try:
        yield LocalServer(cluster)
    finally:
        cluster.stop()


@pytest.fixture
def dsn(pg) -> str:
    return pg.dsn


@pytest.fixture(scope="session")
def shm_prefix() -> str:
    return SESSION_PREFIX


@pytest.fixture
def unique_name() -> str:
    """e.g. 't00b2ka9f3001c4': [a-z0-9], 15 chars, unique per test and process."""
    return f"{SESSION_PREFIX}{_base36(next(_counter), 3)}{secrets.token_hex(1)}"


def shm_leftovers(prefix: str = SESSION_PREFIX) -> list[str]:
    """/dev/shm entries (segments ``sharedpool.<name>...``, semaphores
    ``sem.sharedpool.<name>...``) whose name contains ``prefix``."""
    try:
        return sorted(e for e in os.listdir(SHM_DIR) if prefix in e)
    except FileNotFoundError:
        return []


def pytest_sessionfinish(session, exitstatus):
    # Only the process that owned the names checks (xdist workers have their own pid
    # and so their own prefix).
    leaks = shm_leftovers()
    if not leaks:
        return
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    msg = (f"POSIX IPC objects left behind in {SHM_DIR} by this session "
           f"(prefix {SESSION_PREFIX}): " + ", ".join(leaks))
    if tr is not None:
        tr.write_sep("=", "LEAKED SHARED MEMORY / SEMAPHORES", red=True, bold=True)
        tr.write_line(msg)
    else:
        print(msg, file=sys.stderr)
    if os.environ.get("SHAREDPOOL_KEEP_LEAKS") != "1":
        for e in leaks:
            path = os.path.join(SHM_DIR, e)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(path)
    if session.exitstatus in (0, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def make_ledger(unique_name):
    """Create this test's ledger (no coordinator) with a given budget; remove it after."""
    from helpers_procs import remove_pool_objects
    from sharedpool.ledger import Ledger

    made = []

    def make(budget: int, nslots: int = 8) -> Ledger:
        made.append(Ledger.create(unique_name, budget, nslots=nslots))
        return made[-1]

    yield make
    for ledger in made:
        ledger.close()
    remove_pool_objects(unique_name)
