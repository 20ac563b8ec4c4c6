"""Helpers the server integrations share: find the pools, run their coordinator, clean up a worker.

Runs in a server's master process (gunicorn arbiter, uWSGI master) and in its
workers. Imports neither gunicorn nor uWSGI, and opens nothing at import.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping

from sharedpool import channel
from sharedpool.config import ENV_PREFIX, PoolConfig
from sharedpool.ledger import proc_stat
from sharedpool.names import CONTROL_SOCKET, PoolNames

log = logging.getLogger("sharedpool.integrations")

DJANGO_ENGINE = "sharedpool.integrations.django"
STOP_TIMEOUT = 15.0  # seconds a stopped coordinator gets before SIGKILL: more than its 10 s drain of exiting workers


# -- which pools ---------------------------------------------------------------------------------


def django_pool_configs(databases: Mapping[str, Mapping]) -> list[PoolConfig]:
    """Return the pools of the DATABASES entries that use the sharedpool ENGINE (one per NAME).

    Each entry is read by the ENGINE's own ``pool_config`` (NAME defaults to the alias).
    """
    from sharedpool.integrations.django.config import pool_config

    configs: dict[str, PoolConfig] = {}
    for alias, entry in databases.items():
        if entry.get("ENGINE") == DJANGO_ENGINE:
            config = pool_config(entry, alias)
            configs.setdefault(config.name, config)
    return list(configs.values())


def pool_configs(environ: Mapping[str, str] | None = None) -> list[PoolConfig]:
    """Find the pools this server's workers will use.

    From Django settings when DJANGO_SETTINGS_MODULE is set (every DATABASES
    entry whose ENGINE is sharedpool's; there may be several pools), else from
    ``SHAREDPOOL_NAME`` / ``SHAREDPOOL_POOL_SIZE`` in the environment, else none.
    """
    env = os.environ if environ is None else environ
    if env.get("DJANGO_SETTINGS_MODULE"):
        try:
            from django.conf import settings

            databases = settings.DATABASES
        except Exception as exc:  # noqa: BLE001 - the server must still start; the workers will say more
            log.warning("sharedpool: cannot read Django's DATABASES (%s: %s); using the environment",
                        type(exc).__name__, exc)
        else:
            configs = django_pool_configs(databases)
            if configs:
                return configs
    if env.get(ENV_PREFIX + "POOL_SIZE"):
        return [PoolConfig.from_mapping({}, env=env, source="the environment")]
    return []


def no_pool_found(environ: Mapping[str, str] | None = None) -> str:
    """Say why pool_configs() found no pool, in words that tell the operator what to set."""
    env = os.environ if environ is None else environ
    if not env.get("DJANGO_SETTINGS_MODULE"):
        return (
            "no pool found: DJANGO_SETTINGS_MODULE is not set in this (the arbiter's) environment, so "
            "DATABASES cannot be read; set it where the server starts (export it, or gunicorn "
            "--env DJANGO_SETTINGS_MODULE=mysite.settings), or set SHAREDPOOL_NAME and SHAREDPOOL_POOL_SIZE"
        )
    return (
        f"no pool found: no DATABASES entry of {env['DJANGO_SETTINGS_MODULE']} uses ENGINE "
        f"{DJANGO_ENGINE!r}, and SHAREDPOOL_POOL_SIZE is not set"
    )


# -- the coordinator -------------------------------------------------------------------------------


def running_coordinator(config: PoolConfig) -> int | None:
    """Return the pid of the live coordinator of ``config``'s pool, or None.

    Raises LedgerError when the ledger is foreign or its budget disagrees with POOL_SIZE.
    """
    from sharedpool.embedded import check_budget
    from sharedpool.ledger import Ledger

    if not Ledger.exists(config.name):
        return None
    ledger = Ledger.attach(config.name, group=config.group, mapped=False)
    check_budget(ledger, config)  # closes the ledger and raises on a mismatch
    try:
        header = ledger.header
        if header.coordinator_pid and ledger.coordinator_alive():
            return header.coordinator_pid
        return None
    finally:
        ledger.close()


def start_embedded(config: PoolConfig, server_pid: int) -> subprocess.Popen:
    """Start a coordinator that exits with process ``server_pid`` and removes its IPC objects."""
    from sharedpool.embedded import start_coordinator

    return start_coordinator(config, "--exit-with", str(server_pid), "--remove-on-exit")


def parent_of(pid: int) -> int | None:
    fields = proc_stat(pid)
    return None if fields is None else int(fields[1])


def stop_process(pid: int, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM ``pid`` (our child), wait, then SIGKILL; reap it if it is our child."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child, or already reaped by the server
            done = pid if not os.path.exists(f"/proc/{pid}") else 0
        if done:
            return
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def notify_exit(names: list[str], pid: int) -> None:
    """Tell each pool's coordinator that worker ``pid`` exited, so its permits come back at once."""
    message = f"exit {pid}".encode()
    for name in names:
        channel.send(PoolNames(name), CONTROL_SOCKET, message)


# -- the worker ------------------------------------------------------------------------------------

def close_worker_pools() -> None:
    """Give back this process's connections and permits and free its ledger slot (worker exit)."""
    django_db = sys.modules.get("django.db")
    if django_db is not None:
        with contextlib.suppress(Exception):
            django_db.connections.close_all()
    pool = sys.modules.get("sharedpool.pool")
    if pool is not None:
        try:
            pool.close_all()
        except Exception as exc:  # noqa: BLE001 - a worker on its way out must still exit
            log.warning("sharedpool: closing the pools of process %d: %s", os.getpid(), exc)


# -- gevent ------------------------------------------------------------------------------------


def make_psycopg2_green() -> None:
    """Let other greenlets run while psycopg2 waits for the server (what psycogreen does).

    psycopg 3 needs nothing: it notices gevent's monkey-patching by itself.
    """
    try:
        import psycopg2.extensions
    except ImportError:
        return  # psycopg 3 only

    if psycopg2.extensions.get_wait_callback() is None:
        psycopg2.extensions.set_wait_callback(gevent_wait_callback)


def gevent_wait_callback(conn, timeout: float | None = None) -> None:
    """Wait for a psycopg2 connection on the gevent hub instead of blocking the process."""
    from gevent.socket import wait_read, wait_write
    from psycopg2 import OperationalError
    from psycopg2.extensions import POLL_OK, POLL_READ, POLL_WRITE

    while True:
        state = conn.poll()
        if state == POLL_OK:
            return
        if state == POLL_READ:
            wait_read(conn.fileno(), timeout=timeout)
        elif state == POLL_WRITE:
            wait_write(conn.fileno(), timeout=timeout)
        else:
            raise OperationalError(f"bad state from poll: {state}")
