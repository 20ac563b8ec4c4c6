"""Find the pool's ledger, starting a coordinator on demand (AUTOSTART).

Runs in the worker (or in a server's master process). The coordinator is
always a separate process, never a thread of the caller: it must outlive any
one worker and never be forked along with one. It is detached (its own
session, no stdin, its output in ``coordinator.log`` in the pool directory),
so a pipe the caller writes to (``manage.py migrate | cat``) closes when the
caller is done.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

from .config import PoolConfig
from .errors import LedgerError, PoolPermissionError, PoolUnavailable
from .ledger import Ledger
from .names import PoolNames, open_directory, open_entry

LOG_FILE = "coordinator.log"

log = logging.getLogger("sharedpool")

START_TIMEOUT = 10.0
ATTACH_PATIENCE = 2.0  # seconds a half-written ledger may take to become valid
EMBEDDED_ARGS = ("--exit-when-idle", "2", "--remove-on-exit")
_started: list[subprocess.Popen] = []


def coordinator_command(config: PoolConfig, *extra: str) -> list[str]:
    command = [
        sys.executable, "-m", "sharedpool.coordinator", "coordinator",
        "--name", config.name, "--budget", str(config.pool_size),
        "--reclaim-grace", str(config.reclaim_grace),
    ]
    if config.group:
        command += ["--group", config.group]
    return command + list(extra)


def start_coordinator(config: PoolConfig, *extra: str) -> subprocess.Popen:
    """Start a coordinator process for ``config`` and wait until it serves its ledger."""
    names = PoolNames(config.name)
    dir_fd = open_directory(names, config.group, create=True)
    try:
        log_fd = open_entry(names, dir_fd, LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, config.group,
                            owner=os.fstat(dir_fd).st_uid)
    finally:
        os.close(dir_fd)
    try:
        process = subprocess.Popen(
            coordinator_command(config, *extra),
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(log_fd)
    _started.append(process)  # reaped later; dropping a running Popen warns
    deadline = time.monotonic() + START_TIMEOUT
    while not coordinator_ready(config.name, config.group):
        if process.poll() is not None:
            if coordinator_ready(config.name, config.group):
                break  # another coordinator won the race to create the ledger
            raise PoolUnavailable(
                f"pool {config.name!r}: the coordinator exited with code {process.returncode} before creating the "
                f"ledger; see {names.path(LOG_FILE)}"
            )
        if time.monotonic() > deadline:
            process.kill()
            raise PoolUnavailable(f"pool {config.name!r}: the coordinator did not create the ledger within {START_TIMEOUT:.0f} s")
        time.sleep(0.01)
    return process


def attach_or_start(config: PoolConfig) -> Ledger:
    """Attach to the pool's ledger; start an embedded coordinator when AUTOSTART allows."""
    _reap()
    deadline = time.monotonic() + ATTACH_PATIENCE
    while True:
        try:
            ledger = Ledger.attach(config.name, group=config.group)
            break
        except PoolPermissionError:
            raise
        except LedgerError:
            if Ledger.exists(config.name):
                if time.monotonic() < deadline:
                    time.sleep(0.01)  # a coordinator may be writing the header right now
                    continue
                raise
            if not config.autostart:
                raise PoolUnavailable(
                    f"pool {config.name!r}: no coordinator is running; start one with "
                    f"`sharedpool coordinator --name {config.name} --budget {config.pool_size}` "
                    "or set AUTOSTART"
                ) from None
            process = start_coordinator(config, *EMBEDDED_ARGS)
            log.warning(
                "sharedpool: started an embedded coordinator for pool %r (pid %d, budget %d); "
                "it exits 2 s after the last worker",
                config.name, process.pid, config.pool_size,
            )
    check_budget(ledger, config)
    if config.autostart and not coordinator_ready(config.name, config.group):
        log.warning("sharedpool: pool %r has no live coordinator; starting one to resume reclaim", config.name)
        start_coordinator(config, *EMBEDDED_ARGS)
    return ledger


def coordinator_ready(name: str, group: str | None = None) -> bool:
    """Tell whether a valid ledger exists and a live coordinator holds the pool's lock."""
    try:
        ledger = Ledger.attach(name, group=group, mapped=False)
    except LedgerError:
        return False
    try:
        return ledger.coordinator_alive()
    finally:
        ledger.close()


def _reap() -> None:
    _started[:] = [process for process in _started if process.poll() is None]


def check_budget(ledger: Ledger, config: PoolConfig) -> None:
    """Refuse a POOL_SIZE that disagrees with the ledger, unless a reload changed it."""
    budget = ledger.header.budget
    if budget != config.pool_size and not ledger.header.reloads:
        ledger.close()
        raise LedgerError(
            f"pool {config.name!r}: POOL_SIZE is {config.pool_size} here but the running ledger's budget is "
            f"{budget}; use the same POOL_SIZE everywhere or `sharedpool reload --name {config.name} --budget N`"
        )
