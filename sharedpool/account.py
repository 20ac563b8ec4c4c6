"""Keep this process's ledger slot: the one writer of it, and the truth about our permits.

Runs in the worker. Every write to this process's slot goes through its
``SlotAccount``, under its one lock. The account keeps the real numbers in
process memory and writes them into the slot as absolute values with a keyed
check value, so a slot that someone scribbled over is detected by the
coordinator and healed by the next write (or ``republish``). Permits are
taken and posted here too, because the order is the invariant: ``inflight``
is recorded before the semaphore moves and ``held`` only after it moved on
acquire; ``held`` drops before the post on release. A release never posts a
permit this process did not take, so no counter ever goes below zero.

Lock order: a caller may hold its ``ProcessBudget`` lock when calling in;
the account's lock is always the innermost.
"""
from __future__ import annotations

import threading
import time

import posix_ipc

from .ledger import (
    FLAG_BACKENDS_LOCAL,
    MAX_BACKENDS,
    SUMMED_COUNTERS,
    SLOT_ACTIVE,
    SLOT_FREE,
    Ledger,
    Slot,
    pid_namespace,
    process_start_time,
    seal,
    slot_key,
)

_COUNTERS = SUMMED_COUNTERS


class SlotAccount:
    """This process's slot in one pool's ledger. One per (process, pool NAME)."""

    def __init__(self, ledger: Ledger, pid: int) -> None:
        self.ledger = ledger
        self.header = ledger.header
        self.pid = pid
        self.start_time = start_time = process_start_time(pid) or 0
        self.pid_ns = pid_namespace()
        self.index = ledger.claim_slot(pid, start_time, self.pid_ns)
        self.slot: Slot = ledger.slots[self.index]
        self.lock = threading.Lock()
        self._key = slot_key(ledger.token, start_time)
        self.held = self.inflight = self.waiting = self.local_waiting = 0
        self.idle = self.in_use = self.connecting = self.retired = 0
        self.flags = 0
        self.remote = False  # a backend this host's /proc cannot show: its exit cannot be watched
        self.wait_since = self.idle_since = 0.0
        self.shed_received = 0
        self.counts = dict.fromkeys(_COUNTERS, 0)
        self.backends = [0] * MAX_BACKENDS
        self._backend_free = list(range(MAX_BACKENDS - 1, -1, -1))
        self.closed = False
        self.republish()

    # -- permits (the hot path) ----------------------------------------------------------

    def _seal(self, slot: Slot) -> None:
        slot.check = seal(self._key, self.pid, self.held, self.inflight, self.waiting)

    def try_take(self, sem: posix_ipc.Semaphore) -> bool:
        """Take a free permit now, or return False; recorded in flight before the semaphore moves."""
        with self.lock:
            slot = self.slot
            self.inflight += 1
            slot.inflight = self.inflight
            self._seal(slot)
            try:
                sem.acquire(0)
                taken = True
                self.held += 1
                self.counts["grants"] += 1
                slot.held = self.held
                slot.grants = self.counts["grants"]
            except posix_ipc.BusyError:
                taken = False
            self.inflight -= 1
            slot.inflight = self.inflight
            self._seal(slot)
        return taken

    def give(self, sem: posix_ipc.Semaphore) -> bool:
        """Give one permit back: unrecord, then post (or retire it during a budget cut).

        Returns False, posting nothing, when this process holds no permit.
        """
        if self.header.retire_debt and self._retire_one():
            return True
        with self.lock:
            if not self.held:
                return False
            slot = self.slot
            self.held -= 1
            self.inflight += 1
            self.counts["releases"] += 1
            slot.held = self.held
            slot.inflight = self.inflight
            slot.releases = self.counts["releases"]
            self._seal(slot)
            sem.release()
            self.inflight -= 1
            slot.inflight = self.inflight
            self._seal(slot)
        return True

    def _retire_one(self) -> bool:
        """Keep a permit out of circulation instead of posting it: a budget cut is under way.

        Returning permits go to the cut before any waiter, so the server count
        falls to the new budget as connections close.
        """
        ledger = self.ledger
        with ledger.registry_lock():
            header = ledger.header
            if not header.retire_debt:
                return False
            with self.lock:
                if not self.held:
                    return False
                header.retire_debt -= 1
                self.held -= 1
                self.retired += 1
                self.counts["retired"] += 1
                self.counts["releases"] += 1
                slot = self.slot
                slot.held = self.held
                slot.retired = self.counts["retired"]
                slot.releases = self.counts["releases"]
                self._seal(slot)
        return True

    def begin_wait(self, blocking: bool) -> None:
        """A thread starts waiting; a blocking waiter may take a permit at any instant (in flight)."""
        with self.lock:
            slot = self.slot
            if blocking:
                self.inflight += 1
                slot.inflight = self.inflight
            if self.waiting == 0:
                self.wait_since = slot.wait_since = time.time()
            self.waiting += 1
            slot.waiting = self.waiting
            self._seal(slot)

    def switch_wait(self, blocking: bool) -> None:
        """A waiter between two tries changes mode (the coordinator raised or lowered its hold)."""
        with self.lock:
            self.inflight += 1 if blocking else -1
            self.slot.inflight = self.inflight
            self._seal(self.slot)

    def end_wait(self, blocking: bool, acquired: bool, timed_out: bool, waited_ms: float) -> None:
        with self.lock:
            slot = self.slot
            self.waiting -= 1
            if self.waiting == 0:
                self.wait_since = slot.wait_since = 0.0
            counts = self.counts
            counts["waits"] += 1
            counts["wait_ms"] += waited_ms
            if acquired:
                self.held += 1
                counts["grants"] += 1
            elif timed_out:
                counts["timeouts"] += 1
            if blocking:
                self.inflight -= 1
            slot.waits, slot.wait_ms, slot.grants, slot.timeouts = (
                counts["waits"], counts["wait_ms"], counts["grants"], counts["timeouts"])
            slot.held = self.held
            slot.waiting = self.waiting
            slot.inflight = self.inflight
            self._seal(slot)

    # -- connections ---------------------------------------------------------------------

    def publish(self, idle: int, in_use: int, local_waiting: int) -> None:
        """Mirror this process's connection counts (status, victim choice)."""
        with self.lock:
            slot = self.slot
            if idle and not self.idle:
                self.idle_since = slot.idle_since = time.time()
            self.idle, self.in_use, self.local_waiting = idle, in_use, local_waiting
            slot.idle, slot.in_use, slot.local_waiting = idle, in_use, local_waiting

    def connecting_changed(self, delta: int) -> None:
        with self.lock:
            self.connecting += delta
            self.slot.connecting = self.connecting

    def backend_opened(self, backend_pid: int, local: bool) -> int:
        """Record a new backend (its pid lets the coordinator watch it exit); return its index."""
        with self.lock:
            index = self._backend_free.pop()
            self.backends[index] = backend_pid
            self.connecting -= 1
            self.counts["opened"] += 1
            self.remote = self.remote or not local
            self.flags = 0 if self.remote else FLAG_BACKENDS_LOCAL
            slot = self.slot
            slot.backends[index] = backend_pid
            slot.connecting = self.connecting
            slot.opened = self.counts["opened"]
            slot.flags = self.flags
            return index

    def backend_closed(self, index: int) -> None:
        with self.lock:
            self.backends[index] = 0
            self._backend_free.append(index)
            self.counts["closed"] += 1
            self.slot.backends[index] = 0
            self.slot.closed = self.counts["closed"]

    def count(self, counter: str) -> None:
        """Bump one of this slot's reported counters (sheds)."""
        with self.lock:
            self.counts[counter] += 1
            setattr(self.slot, counter, self.counts[counter])

    def shed_request_received(self) -> None:
        with self.lock:
            self.shed_received += 1
            self.slot.shed_received = self.shed_received

    # -- whole-slot writes ---------------------------------------------------------------

    def republish(self) -> None:
        """Rewrite the whole slot from this process's own numbers (heals a scribbled slot)."""
        with self.lock:
            slot = self.slot
            slot.pid, slot.pid_ns = self.pid, 0 if self.closed else self.pid_ns
            # the identity too: the check value is keyed by the start time, and a slot not marked
            # active is skipped by the shed choice
            slot.start_time, slot.state = self.start_time, SLOT_FREE if self.closed else SLOT_ACTIVE
            for name in ("held", "inflight", "waiting", "local_waiting", "idle", "in_use", "connecting",
                         "retired", "flags", "wait_since", "idle_since", "shed_received"):
                setattr(slot, name, getattr(self, name))
            for name, value in self.counts.items():
                setattr(slot, name, value)
            for index, pid in enumerate(self.backends):
                slot.backends[index] = pid
            self._seal(slot)

    def deregister(self, sem: posix_ipc.Semaphore) -> int:
        """Give back every permit this process took, free the slot; later writes go nowhere. Normal exit."""
        while self.held and self.header.retire_debt and self._retire_one():
            pass
        with self.lock:
            if self.closed:
                return 0
            slot = self.slot
            count = self.held
            self.inflight += count
            self.held = 0
            self.counts["releases"] += count
            slot.held, slot.inflight, slot.releases = 0, self.inflight, self.counts["releases"]
            self._seal(slot)
            for _ in range(count):
                sem.release()
            self.inflight -= count
            slot.inflight = self.inflight
            self._seal(slot)
            self.closed = True
            self.slot = Slot()  # a private scratch slot: writes after this reach nobody
        self.ledger.free_slot(self.index)
        return count
