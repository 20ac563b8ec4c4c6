"""This process's share of one pool NAME: its permits, idle entries, counts and the wait for a permit.

Runs in the worker. Every ``LocalPool`` of the same NAME (one per connection
target) draws on one ``ProcessBudget``. It owns the idle entries' bookkeeping,
the per-process cap and the shed listener; its ``SlotAccount`` (through the
``PermitGate``) is the only writer of this process's ledger slot. ``self.lock``
guards the counts, the pools' idle lists and the set of pools; the account's
own lock is always taken inside it, never around it.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Any, Protocol

from .closing import wait_for_eof
from .config import PoolConfig
from .embedded import attach_or_start
from .errors import ConfigError, PoolClosed, PoolUnavailable
from .permits import PermitGate
from .pressure import ShedListener, others_waiting, request_shed



class Target(Protocol):
    """What the budget needs of a LocalPool (one connection target): its idle entries and how to close one."""

    _idle: list[Any]

    def _close_entry(self, entry: Any, *, checked_out: bool = False) -> None: ...

    def forget_after_fork(self) -> None: ...

    def close(self) -> None: ...

log = logging.getLogger("sharedpool")

SHED_PENDING_FOR = 1.0  # seconds a shed request waits for a busy connection to come back
MIN_STINT = 0.2  # seconds a busy connection is kept before a shed request may close it (no churn)
IDLE_SETTLED = 0.02  # seconds idle after which a connection is not merely between two requests
HANDOVER_YIELD = 0.03  # seconds at most a process that just handed a permit over lets the waiter take it
HEAL_EVERY = 1.0  # seconds at most between two rewrites of our slot from our own numbers


class ProcessBudget:
    """This process's share of one pool NAME. Created lazily, in the process that uses it."""

    _by_name: dict[str, "ProcessBudget"] = {}
    _registry_lock = threading.Lock()

    @classmethod
    def for_config(cls, config: PoolConfig) -> "ProcessBudget":
        with cls._registry_lock:
            budget = cls._by_name.get(config.name)
            if budget is None or budget.closed:
                budget = cls._by_name[config.name] = cls(config)
            elif budget.config.pool_size != config.pool_size:
                raise ConfigError(
                    f"pool {config.name!r}: POOL_SIZE {config.pool_size} disagrees with "
                    f"{budget.config.pool_size} configured earlier in this process"
                )
            return budget

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.name = config.name
        self.max_open = config.max_per_process
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.pools: "weakref.WeakSet[Target]" = weakref.WeakSet()  # add and iterate under self.lock
        self.closed = False
        self._reset_process_state()

    def _reset_process_state(self) -> None:
        self.pid = 0
        self.ledger = None
        self.gate: PermitGate | None = None
        self.listener: ShedListener | None = None
        self.open = 0  # connections open or being opened by this process
        self.idle = 0
        self.in_use = 0
        self.global_waiters = 0
        self.local_waiters = 0  # threads of this process waiting at the per-process cap
        self.shed_pending = 0
        self.shed_pending_until = 0.0
        self.handed_over_at = 0.0
        self.lingering: list[tuple[int, Any, bool]] = []  # closed, backend not yet gone: (fd, entry, in use)
        self._replaced_logged = False

    # -- process lifecycle ---------------------------------------------------------

    def ensure_ready(self) -> None:
        """Attach and register in this process (first use, or first use after fork)."""
        if self.pid:
            return  # reset to 0 in a forked child
        with self.lock:
            if self.pid:
                return
            if self.closed:
                raise PoolClosed(f"pool {self.name!r} is closed")
            gate = self._register()
            # the listener's tick: idle expiry, and healing a scribbled slot (the coordinator decides nothing on it)
            interval = min(v for v in (self.config.max_idle, self.config.recycle, 60.0) if v is not None)
            tick = min(max(interval / 2, 0.5), HEAL_EVERY)
            try:
                self.listener = ShedListener(self, self.ledger, gate.slot_index, tick, self._heal)
            except BaseException:
                gate.deregister()
                raise
            self.gate = gate
            self.pid = os.getpid()

    def _register(self) -> PermitGate:
        """Claim a slot in the pool's current ledger (under self.lock).

        A coordinator exiting idle may remove the ledger just as we attach; a
        slot in a removed ledger would be a second budget, so follow the name.
        """
        for _ in range(3):
            if self.ledger is None:
                self.ledger = attach_or_start(self.config)
            gate = PermitGate(self.ledger, os.getpid(), on_pressure=self.on_pressure)
            if self.ledger.is_current():
                return gate
            gate.deregister()
            self.ledger.close()
            self.ledger = None
        raise PoolUnavailable(f"pool {self.name!r}: the ledger keeps being replaced while attaching")

    def forget_after_fork(self) -> None:
        """Child after fork: drop the parent's connections and slot without any I/O."""
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        for pool in list(self.pools):
            pool.forget_after_fork()
        if self.listener is not None:
            self.listener.forget_after_fork()
        for fd, _, _ in self.lingering:
            os.close(fd)
        ledger = self.ledger
        self._reset_process_state()
        if ledger is not None:
            ledger.after_fork_in_child()
        self.ledger = ledger  # the mapping and semaphore are inherited and valid here

    def close(self) -> None:
        """Close this process's idle connections and free its slot once nothing is open (exit).

        Connections other threads still have checked out keep their permits
        until they come back (then they are closed), or until the process dies
        and the coordinator sees their backends gone: never before.
        """
        if self.pid != os.getpid():
            return
        with self.lock:
            self.closed = True  # from now on a returned connection is closed, not parked
            self.pid = 0  # the next checkout raises PoolClosed
            if self.listener is not None:
                self.listener.close()
                self.listener = None
            pools = list(self.pools)
        for pool in pools:
            pool.close()
        self._settle_lingering(wait=True)
        with self.lock:
            finished = self.open == 0
        if finished:
            self._deregister()

    def _deregister(self) -> None:
        with self.lock:
            gate, self.gate = self.gate, None
        if gate is not None:
            gate.deregister()

    def _heal(self) -> None:
        """Listener tick: rewrite our slot from our own numbers; say once if the ledger was replaced."""
        gate, ledger = self.gate, self.ledger
        if gate is None or ledger is None:
            return
        gate.account.republish()
        if not self._replaced_logged and not ledger.is_current():
            self._replaced_logged = True
            log.error("sharedpool: pool %r: the ledger this worker uses was removed or replaced (cleanup?); "
                      "this worker stays on the old budget until it exits", self.name)

    # -- permits and the per-process cap ---------------------------------------------

    def publish(self) -> None:
        """Mirror the counts into our slot (under self.lock)."""
        self.gate.account.publish(self.idle, self.in_use, self.local_waiters)

    def may_reserve(self) -> bool:
        """Tell whether a thread may count a new connection in (under self.lock).

        Below MAX_PER_PROCESS, and only one thread per process waits at the
        semaphore while others hold connections: the rest wait on ``cond``,
        where a connection another thread returns reaches them at once.
        """
        return self.open < self.max_open and not (self.global_waiters and self.in_use)

    def on_pressure(self) -> None:
        request_shed(self.ledger, self.gate.slot_index)

    def take_permit(self, deadline: float, timeout: float, pool: Target) -> bool:
        """Take one permit for a connection about to open (self.open already counted it).

        Returns False, holding no permit, when a connection of ``pool`` came
        back in this process meanwhile: taking that one costs no reconnect.
        """
        gate = self.gate
        if time.monotonic() - self.handed_over_at < HANDOVER_YIELD:
            self._let_waiters_go_first()
        if gate.try_acquire():
            return True
        with self.lock:
            other = self.pop_lru_idle(exclude=pool)
            self.global_waiters += 1
        if other is not None:
            other.pool._close_entry(other)  # an idle connection to another target: its permit is ours
        listener = self.listener
        if listener is not None:
            listener.nudge()
        try:
            if self.in_use > 1:
                # other threads here hold connections: one may come back before any permit does
                return gate.acquire(
                    max(deadline - time.monotonic(), 0.0), reported_timeout=timeout,
                    give_up=lambda: bool(pool._idle), wait_slice=0.02,
                )
            return gate.acquire(max(deadline - time.monotonic(), 0.0), reported_timeout=timeout)
        finally:
            with self.lock:
                self.global_waiters -= 1
                if self.local_waiters:
                    self.cond.notify()  # another thread here may now take its turn at the semaphore

    def _let_waiters_go_first(self) -> None:
        """Don't barge: a woken waiter may need milliseconds to take the permit we posted."""
        sem, own = self.ledger.sem, self.gate.slot_index
        deadline = self.handed_over_at + HANDOVER_YIELD
        while sem.value > 0 and others_waiting(self.ledger, own) and time.monotonic() < deadline:
            time.sleep(0.001)

    def give_back(self, entry: Any, *, in_use: bool = False) -> None:
        """Post the permit of a closed (or never opened) connection, then uncount it.

        Posting first means a concurrent close() cannot see this connection gone
        and deregister (posting every permit) while ours is still held.
        """
        gate = self.gate
        if entry is not None:
            gate.account.backend_closed(entry.backend_index)
        gate.release()
        self.unreserve(in_use=in_use)

    def linger(self, fd: int, entry: Any, in_use: bool) -> None:
        """Keep a closed connection's permit until its backend is gone (the server has not confirmed yet)."""
        with self.lock:
            self.lingering.append((fd, entry, in_use))
        log.warning("sharedpool: pool %r: backend %d did not exit on close; its permit stays taken until it does",
                    self.name, entry.backend_pid)

    def _settle_lingering(self, wait: bool = False) -> None:
        with self.lock:
            pending, self.lingering = self.lingering, []
        still = []
        for fd, entry, in_use in pending:
            if wait_for_eof(fd, 2.0 if wait else 0.0):
                os.close(fd)
                self.give_back(entry, in_use=in_use)
            else:
                still.append((fd, entry, in_use))
        if still:
            with self.lock:
                self.lingering.extend(still)

    def unreserve(self, *, in_use: bool = True) -> None:
        """Uncount a connection that is no longer open (and, if ``in_use``, was checked out)."""
        with self.lock:
            if in_use:
                self.in_use -= 1
                self.publish()
            self.open -= 1
            if self.local_waiters:
                self.cond.notify()
            last = self.closed and self.open == 0
        if last:
            self._deregister()

    def should_hand_over(self, entry: Any) -> bool:
        """Tell whether a returned connection should be closed: a cut, or a waiter elsewhere (under self.lock)."""
        if self.ledger.header.retire_debt:
            return True
        if self.shed_pending:
            now = time.monotonic()
            if now - entry.created < MIN_STINT:
                return False  # served too briefly: keep it, the request stays pending
            if now < self.shed_pending_until and others_waiting(self.ledger, self.gate.slot_index):
                self.shed_pending -= 1
                self.gate.account.count("sheds")
                self.handed_over_at = now
                return True
            self.shed_pending = 0  # expired, or the waiter was served meanwhile
        return False

    # -- the listener's side (Shedder) ----------------------------------------------

    def waiting_for_permits(self) -> bool:
        return bool(self.global_waiters)

    def settling(self) -> bool:
        return bool((self.shed_pending and self.idle) or self.lingering)

    def shed_request_received(self) -> None:
        if self.gate is not None:
            self.gate.account.shed_request_received()

    def shed_one(self, requested: bool = True) -> None:
        """Close the least recently used idle connection for a waiter elsewhere, or for a budget cut.

        Called by the listener for each request, and again (``requested=False``)
        while a request is pending and an idle connection is about to settle.
        """
        if self.pid != os.getpid():
            return
        if self.lingering:
            self._settle_lingering()
        now = time.monotonic()
        cutting = bool(self.ledger.header.retire_debt)
        with self.lock:
            if not requested and not (self.shed_pending and others_waiting(self.ledger, self.gate.slot_index)):
                self.shed_pending = 0
                return
            entry = self.pop_lru_idle(settled_by=None if cutting else now)
            if entry is None:
                if requested and (self.in_use or self.idle):
                    # busy, or idle only for a moment between requests: hand over after the stint
                    self.shed_pending = min(self.shed_pending + 1, self.in_use + self.idle)
                    self.shed_pending_until = now + SHED_PENDING_FOR
                return
            if not requested:
                self.shed_pending -= 1
            self.gate.account.count("sheds")
            self.handed_over_at = now
        log.debug("sharedpool: pool %r: shedding an idle connection for %s", self.name,
                  "a budget cut" if cutting else "a waiting worker")
        entry.pool._close_entry(entry)

    def pop_lru_idle(self, exclude: Target | None = None, settled_by: float | None = None) -> Any:
        """Pop the least recently used idle connection (under self.lock).

        With ``settled_by`` (now), only one that served its minimum stint or has
        really gone idle qualifies: shedding a connection between two requests
        of a busy worker would only trade permits for reconnects.
        """
        victim = None
        for pool in self.pools:
            if pool is exclude or not pool._idle:
                continue
            oldest = pool._idle[0]
            if settled_by is not None and not (
                settled_by - oldest.created >= MIN_STINT or settled_by - oldest.last_used >= IDLE_SETTLED
            ):
                continue
            if victim is None or oldest.last_used < victim._idle[0].last_used:
                victim = pool
        if victim is None:
            return None
        entry = victim._idle.pop(0)
        self.idle -= 1
        self.publish()
        return entry

    def maintain(self) -> None:
        """Close idle connections past MAX_IDLE (above MIN_IDLE) or RECYCLE; settle lingering closes."""
        if self.pid != os.getpid():
            return
        if self.lingering:
            self._settle_lingering()
        now = time.monotonic()
        max_idle, recycle, keep = self.config.max_idle, self.config.recycle, self.config.min_idle
        expired: list[Any] = []
        with self.lock:
            for pool in self.pools:
                for entry in list(pool._idle):
                    stale = recycle is not None and now - entry.created >= recycle
                    unused = max_idle is not None and now - entry.last_used >= max_idle and self.idle > keep
                    if stale or unused:
                        pool._idle.remove(entry)
                        self.idle -= 1
                        expired.append(entry)
            if expired:
                self.publish()
        for entry in expired:
            entry.pool._close_entry(entry)


def forget_all_after_fork() -> None:
    ProcessBudget._registry_lock = threading.Lock()  # another thread may have held it at fork
    for budget in list(ProcessBudget._by_name.values()):
        budget.forget_after_fork()


def close_all(name: str | None = None) -> None:
    """Close this process's pools (all, or those of pool NAME) and free their slots.

    Runs at exit, from a server's worker-exit hook or a test's teardown. A
    later checkout through a new LocalPool starts afresh.
    """
    with ProcessBudget._registry_lock:
        budgets = [b for n, b in ProcessBudget._by_name.items() if name is None or n == name]
    for budget in budgets:
        budget.close()
