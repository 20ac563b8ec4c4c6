"""Wait for permits of the per-host budget; the accounting itself lives in account.py.

Runs in the worker. A waiting thread blocks on the semaphore in slices, so
it notices a recreated semaphore, a hold and its own deadline. While the
coordinator holds the pool (``header.hold``, raised to count exactly after
a worker died mid-operation) waiters poll instead of blocking: a thread
between two tries holds nothing, so the coordinator's count can be exact.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable

import posix_ipc

from .account import SlotAccount
from .errors import PoolTimeout
from .ledger import Ledger

log = logging.getLogger("sharedpool")

WAIT_SLICE = 0.5  # seconds per blocking wait: a hold takes effect within one slice
POLL_FIRST, POLL_MAX = 0.001, 0.05  # seconds between tries when polling, doubling up to the maximum


class PermitGate:
    """Take and give back permits for this process; one per (process, pool).

    A forked child never uses its parent's gate: it builds a new one, so it
    gets a fresh slot and nothing of the parent's carries over.
    """

    def __init__(self, ledger: Ledger, pid: int | None = None, on_pressure: Callable[[], None] | None = None) -> None:
        self.ledger = ledger
        self.name = ledger.name
        self.on_pressure = on_pressure
        self.account = SlotAccount(ledger, os.getpid() if pid is None else pid)
        self._header = ledger.header
        self._sem = ledger.sem
        self._epoch = ledger.header.epoch

    @property
    def slot_index(self) -> int:
        return self.account.index

    def deregister(self) -> int:
        """Give back every permit this process took and free the slot (normal exit)."""
        return self.account.deregister(self._current_sem())

    def _current_sem(self) -> posix_ipc.Semaphore:
        """The semaphore to use; after an epoch change (adoption, reload) it may have been recreated."""
        if self._header.epoch != self._epoch:
            self._epoch = self._header.epoch
            self._sem = self.ledger.reopen_semaphore()
        return self._sem

    def try_acquire(self) -> bool:
        """Take a permit if one is free right now."""
        return self.account.try_take(self._sem if self._header.epoch == self._epoch else self._current_sem())

    def release(self) -> bool:
        """Give one permit back; False if this process holds none (nothing is posted)."""
        return self.account.give(self._sem if self._header.epoch == self._epoch else self._current_sem())

    def acquire(
        self,
        timeout: float,
        *,
        reported_timeout: float | None = None,
        give_up: Callable[[], bool] | None = None,
        wait_slice: float = WAIT_SLICE,
    ) -> bool:
        """Take a permit, waiting at most ``timeout`` seconds, or raise PoolTimeout.

        ``reported_timeout`` is the wait the PoolTimeout message names (the
        caller's whole TIMEOUT when ``timeout`` is only what is left of it).
        ``give_up`` is asked every ``wait_slice`` seconds; when it says so the
        wait ends without a permit and without a timeout (returns False).
        """
        if self.try_acquire():
            return True
        account, header = self.account, self._header
        start = time.monotonic()
        deadline = start + timeout
        polling = _must_poll() or bool(header.hold)
        account.begin_wait(blocking=not polling)
        acquired = taken = gave_up = False
        delay = POLL_FIRST
        try:
            while True:
                if self.on_pressure is not None:
                    self.on_pressure()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                hold = bool(header.hold) or _must_poll()
                if hold != polling:
                    polling = hold
                    account.switch_wait(blocking=not polling)
                    delay = POLL_FIRST
                if polling:
                    if account.try_take(self._current_sem()):
                        taken = True  # recorded by try_take
                        break
                    _sleep(min(delay, remaining, wait_slice))
                    delay = min(delay * 2, POLL_MAX)
                elif _sem_wait(self._current_sem(), min(remaining, wait_slice)):
                    acquired = True  # recorded by end_wait below
                    break
                if give_up is not None and give_up():
                    gave_up = True
                    break
        finally:
            account.end_wait(not polling, acquired, not (acquired or taken or gave_up),
                             (time.monotonic() - start) * 1000.0)
        if acquired or taken:
            return True
        if gave_up:
            return False
        raise self.timeout_error(timeout if reported_timeout is None else reported_timeout)

    def timeout_error(self, timeout: float) -> PoolTimeout:
        snap = self.ledger.snapshot()
        holders = [s for s in snap.slots if s.held]
        message = (
            f"pool {self.name!r}: no permit after {timeout:.1f} s (budget {snap.budget}, "
            f"held by {len(holders)} workers: {snap.holders_text()}; {snap.waiting} waiting)"
        )
        log.info("sharedpool: %s", message)
        return PoolTimeout(message)


def _must_poll() -> bool:
    """Under gevent no OS thread may block on the semaphore for us: poll inside the greenlet.

    A greenlet killed or timed out while it sleeps has taken nothing, and the
    permit is taken only by a non-blocking call that is recorded at once.
    """
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and monkey.is_module_patched("threading")


def _sleep(seconds: float) -> None:
    if _must_poll():
        from gevent import sleep

        sleep(seconds)
    else:
        time.sleep(seconds)


def _sem_wait(sem: posix_ipc.Semaphore, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            sem.acquire(max(0.0, deadline - time.monotonic()))
        except posix_ipc.BusyError:
            return False
        except posix_ipc.SignalError:
            continue  # a server's signal (HUP, TERM to an old worker) ran its handler: wait on
        return True
