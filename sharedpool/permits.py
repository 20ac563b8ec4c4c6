"""Take and give back permits of the per-host budget, recorded in the caller's slot.

Runs in the worker. The order makes a crash leak, never over-grant: a permit
is counted in ``inflight`` before the semaphore moves and in ``held`` only
after; ``held`` drops before the semaphore is posted. The coordinator returns
``held`` of a dead worker; its ``inflight`` operations are left to the audit,
which counts each one as holding a permit.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

import posix_ipc

from .errors import PoolTimeout
from .ledger import Ledger, Slot, process_start_time

WAIT_SLICE = 2.0  # seconds per blocking wait: a long wait keeps our place in the kernel queue
POLL_FIRST, POLL_MAX = 0.001, 0.05  # gevent: seconds between tries, doubling up to the maximum


class PermitGate:
    """Take and give back permits for this process.

    Runs in the worker; one per (process, pool), registered once. A forked
    child never uses its parent's gate: it builds and registers a new one, so
    it gets a fresh slot and nothing of the parent's carries over.
    """

    def __init__(self, ledger: Ledger, on_pressure: Callable[[], None] | None = None) -> None:
        self.ledger = ledger
        self.name = ledger.name
        self.on_pressure = on_pressure
        self._sem = ledger.sem
        self._header = ledger.header
        self._epoch = ledger.header.epoch
        self._lock = threading.Lock()
        self.slot: Slot | None = None
        self.slot_index = -1
        self.pid = 0

    def register(self) -> None:
        """Claim a slot for this process."""
        self.pid = os.getpid()
        self.slot_index = self.ledger.claim_slot(self.pid, process_start_time(self.pid) or 0)
        self.slot = self.ledger.slots[self.slot_index]

    def deregister(self) -> None:
        """Give back every recorded permit and free the slot (normal exit)."""
        slot = self.slot
        if slot is None or self.pid != os.getpid():
            return
        with self._lock:
            count = slot.held
            slot.inflight += count
            slot.held = 0
            slot.releases += count
        sem = self._current_sem()
        for _ in range(count):
            sem.release()
        with self._lock:
            slot.inflight -= count
        self.ledger.free_slot(self.slot_index)
        self.slot = None

    def _current_sem(self) -> posix_ipc.Semaphore:
        """The semaphore to use; after an epoch change (adoption, reload) it may have been recreated."""
        epoch = self._header.epoch
        if epoch != self._epoch:
            self._epoch = epoch
            ledger = self.ledger
            self._sem = ledger.sem if ledger.sem is not self._sem else ledger.reopen_semaphore()
        return self._sem

    def try_acquire(self) -> bool:
        """Take a permit if one is free right now.

        The lock is held across the non-blocking semaphore call: one lock
        round trip instead of two, and the crash order is unchanged
        (``inflight`` is written before the semaphore moves).
        """
        slot = self.slot
        sem = self._sem if self._header.epoch == self._epoch else self._current_sem()
        with self._lock:
            slot.inflight += 1
            try:
                sem.acquire(0)
            except posix_ipc.BusyError:
                slot.inflight -= 1
                return False
            slot.held += 1
            slot.grants += 1
            slot.inflight -= 1
        return True

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
        slot = self.slot
        start = time.monotonic()
        deadline = start + timeout
        with self._lock:
            slot.inflight += 1
            if slot.waiting == 0:
                slot.wait_since = time.time()
            slot.waiting += 1
        acquired = gave_up = False
        try:
            while True:
                if self.on_pressure is not None:
                    self.on_pressure()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if wait_for_permit(self._current_sem(), min(remaining, wait_slice)):
                    acquired = True
                    break
                if give_up is not None and give_up():
                    gave_up = True
                    break
        finally:
            waited_ms = (time.monotonic() - start) * 1000.0
            with self._lock:
                slot.waiting -= 1
                if slot.waiting == 0:
                    slot.wait_since = 0.0
                slot.waits += 1
                slot.wait_ms += waited_ms
                if acquired:
                    slot.held += 1
                    slot.grants += 1
                elif not gave_up:
                    slot.timeouts += 1
                slot.inflight -= 1
        if acquired or gave_up:
            return acquired
        raise self.timeout_error(timeout if reported_timeout is None else reported_timeout)

    def release(self) -> None:
        """Give one permit back: unrecord it, then post (a crash in between leaks, never duplicates)."""
        slot = self.slot
        sem = self._sem if self._header.epoch == self._epoch else self._current_sem()
        with self._lock:
            slot.inflight += 1
            slot.held -= 1
            slot.releases += 1
            sem.release()
            slot.inflight -= 1

    def timeout_error(self, timeout: float) -> PoolTimeout:
        snap = self.ledger.snapshot()
        holders = [s for s in snap.slots if s.held]
        return PoolTimeout(
            f"pool {self.name!r}: no permit after {timeout:.1f} s (budget {snap.budget}, "
            f"held by {len(holders)} workers: {snap.holders_text()}; {snap.waiting} waiting)"
        )


def wait_for_permit(sem: posix_ipc.Semaphore, timeout: float) -> bool:
    """Block this thread, or under gevent only this greenlet, until a permit or the timeout."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("threading"):
        return _poll_wait(sem, timeout)
    return _sem_wait(sem, timeout)


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


def _poll_wait(sem: posix_ipc.Semaphore, timeout: float) -> bool:
    """Poll inside the greenlet, sleeping on the hub between tries (gevent).

    No OS thread ever blocks on the semaphore for us: a greenlet killed or
    timed out while it sleeps has taken nothing, and the permit is taken only
    by a non-blocking call whose result the caller records before it yields.
    """
    from gevent import sleep

    deadline = time.monotonic() + timeout
    delay = POLL_FIRST
    while True:
        try:
            sem.acquire(0)
            return True
        except posix_ipc.BusyError:
            pass
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        sleep(min(delay, remaining))
        delay = min(delay * 2, POLL_MAX)
