"""Find the pool's ledger, starting a coordinator on demand (AUTOSTART).

Runs in the worker (or in a server's master process). The coordinator is
always a separate process, never a thread of the caller: it must outlive any
one worker and never be forked along with one.
"""
from __future__ import annotations

import logging
import subprocess
import sys
import time

from .config import PoolConfig
from .errors import LedgerError, PoolUnavailable
from .ledger import Ledger, is_alive

log = logging.getLogger("sharedpool")

START_TIMEOUT = 10.0


def coordinator_command(config: PoolConfig, *extra: str) -> list[str]:
    command = [
        sys.executable, "-m", "sharedpool.coordinator", "coordinator",
        "--name", config.name, "--budget", str(config.pool_size),
        "--reclaim-grace", str(config.reclaim_grace),
    ]
    if config.group:
        command += ["--group", config.group]
    return command + list(extra)


def start_coordinator(config: PoolConfig, *extra: str, detach: bool = True) -> subprocess.Popen:
    """Start a coordinator process for ``config`` and wait until its ledger is there."""
    process = subprocess.Popen(
        coordinator_command(config, *extra),
        stdin=subprocess.DEVNULL,
        start_new_session=detach,
        close_fds=True,
    )
    deadline = time.monotonic() + START_TIMEOUT
    while not Ledger.exists(config.name):
        if process.poll() is not None and not Ledger.exists(config.name):
            raise PoolUnavailable(
                f"pool {config.name!r}: the coordinator exited with code {process.returncode} before creating the ledger"
            )
        if time.monotonic() > deadline:
            process.kill()
            raise PoolUnavailable(f"pool {config.name!r}: the coordinator did not create the ledger within {START_TIMEOUT:.0f} s")
        time.sleep(0.01)
    return process


def attach_or_start(config: PoolConfig) -> Ledger:
    """Attach to the pool's ledger; start an embedded coordinator when AUTOSTART allows."""
    for _ in range(3):
        try:
            ledger = Ledger.attach(config.name, group=config.group)
        except LedgerError:
            if Ledger.exists(config.name):
                raise
            if not config.autostart:
                raise PoolUnavailable(
                    f"pool {config.name!r}: no coordinator is running; start one with "
                    f"`sharedpool coordinator --name {config.name} --budget {config.pool_size}` "
                    "or set AUTOSTART"
                ) from None
            process = start_coordinator(config, "--exit-when-idle", "2", "--remove-on-exit")
            log.warning(
                "sharedpool: started an embedded coordinator for pool %r (pid %d, budget %d); "
                "it exits 2 s after the last worker",
                config.name, process.pid, config.pool_size,
            )
            continue
        check_budget(ledger, config)
        header = ledger.header
        if config.autostart and not (header.coordinator_pid and is_alive(header.coordinator_pid, header.coordinator_start)):
            log.warning("sharedpool: pool %r has no live coordinator; starting one to resume reclaim", config.name)
            start_coordinator(config, "--exit-when-idle", "2", "--remove-on-exit")
        return ledger
    raise PoolUnavailable(f"pool {config.name!r}: the ledger vanished while attaching (a coordinator was exiting)")


def check_budget(ledger: Ledger, config: PoolConfig) -> None:
    """Refuse a POOL_SIZE that disagrees with the ledger, unless a reload changed it."""
    budget = ledger.header.budget
    if budget != config.pool_size and not ledger.header.reloads:
        ledger.close()
        raise LedgerError(
            f"pool {config.name!r}: POOL_SIZE is {config.pool_size} here but the running ledger's budget is "
            f"{budget}; use the same POOL_SIZE everywhere or `sharedpool reload --name {config.name} --budget N`"
        )
