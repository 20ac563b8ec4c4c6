"""Send work to the workers that hold connections: a worker without one defers accepting.

Runs in a prefork server's workers (installed by the gunicorn hooks after
fork); the board it shares is created once in the master, before any fork.

With more workers than permits, a request that lands in a worker holding no
connection must wait for a permit to move (a holder closes one, this worker
opens one), while a worker holding an idle connection could serve it at once.
So before each ``accept`` a worker holding no connection of any pool looks at
the ledger and at the board (only at its siblings, the workers of the same
master: another application's holders will not take this server's requests):

- a permit is free (and no other worker waits for it), or no sibling holds
  one: accept at once;
- a sibling holds an idle connection: defer (it will take the request
  within a millisecond), for at most IDLE_GRACE in a row;
- the holders are all busy but one of them came back for work within the
  ready window: defer, the holders are draining the queue in order. A
  request accepted now would wait anyway: a permit moves only when a
  holder's request ends, and at that moment the holder could have taken
  this request without a reconnect;
- otherwise (every holder is stuck well beyond the usual request): accept,
  and wait for the first holder to finish plus one connect, as before.

The ready window is twice the holders' recent mean request time (an
exponential average the holders keep on the board), at least
READY_WINDOW_MIN and at most READY_WINDOW_MAX: a loaded machine that slows
every request does not turn deferral into churn.

Deferring means sleeping DEFER_POLL and reporting "nothing to accept"; the
server's loop then waits on the listener again, so nothing is lost and a
deferring worker costs a ledger scan per DEFER_POLL while a queue exists.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from sharedpool.config import PoolConfig
from sharedpool.ledger import SLOT_ACTIVE, proc_stat

log = logging.getLogger("sharedpool.integrations.routing")

DEFER_POLL = 0.01  # seconds a deferring worker sleeps between looks (a look, server loop included: ~0.1 ms CPU)
BUSY_POLL = 0.001  # seconds instead, where the sleeping loop also serves open client connections (gthread)
IDLE_GRACE = 0.05  # seconds at most a worker defers in a row to a holder whose connection is idle
READY_WINDOW_MIN = 0.05  # seconds: bounds of the window since a holder last came back for work,
READY_WINDOW_MAX = 1.0  # during which workers without a connection keep deferring
CYCLE_WEIGHT = 0.1  # weight of one request in the holders' mean request time
STREAK_GAP = 2 * DEFER_POLL  # a pause longer than this between two deferrals starts a new streak


class Board:
    """A few shared numbers for all workers of one server: an anonymous shared mapping.

    Create it in the master before the workers fork; they inherit it. It is
    never named, so nothing outlives the processes.
    """

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_SHARED)
        # monotonic time a connection-holding worker last went to accept (CLOCK_MONOTONIC is system-wide)
        self.holder_ready = ctypes.c_double.from_buffer(self._map, 0)
        self.cycle = ctypes.c_double.from_buffer(self._map, 8)  # holders' mean request time, seconds

    def note_request(self, seconds: float) -> None:
        """Fold one holder's request time into the mean (racy across workers: an estimate is enough)."""
        mean = self.cycle.value
        self.cycle.value = seconds if mean <= 0.0 else mean + CYCLE_WEIGHT * (seconds - mean)

    def ready_window(self) -> float:
        return min(max(2.0 * self.cycle.value, READY_WINDOW_MIN), READY_WINDOW_MAX)


class Router:
    """Decide, in one worker, whether to accept now or leave the request to a holder."""

    def __init__(self, configs: Sequence[PoolConfig], board: Board, *, holders_ready_only_when_idle: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.configs = list(configs)
        self.board = board
        self.holders_ready_only_when_idle = holders_ready_only_when_idle
        self.clock = clock
        self._budgets: list[Any] = []
        self._streak_start = 0.0
        self._last_deferral = -1.0
        self.pid = os.getpid()
        self.ppid = os.getppid()
        self._siblings: dict[tuple[int, int], bool] = {}  # (pid, start time) -> child of our master

    def served(self, seconds: float) -> None:
        """Count one request this worker served: a holder's times set the ready window."""
        if any(b.open for b in self._budgets):
            self.board.note_request(seconds)

    def _budget_list(self) -> list[Any]:
        from sharedpool.pool import ProcessBudget

        if not self._budgets or any(b.closed for b in self._budgets):
            self._budgets = [ProcessBudget.for_config(c) for c in self.configs]
        return self._budgets

    def should_defer(self) -> bool:
        """Tell whether this worker should leave the waiting request to a worker holding a connection."""
        now = self.clock()
        try:
            budgets = self._budget_list()
            if any(b.open for b in budgets):
                if not self.holders_ready_only_when_idle or any(b.idle for b in budgets):
                    self.board.holder_ready.value = now
                return False
            idle_elsewhere = held_elsewhere = False
            for budget in budgets:
                if not budget.pid:
                    budget.ensure_ready()  # registers this worker, as its first request would
                ledger = budget.ledger
                held, idle, waiting = self._scan(ledger)
                if ledger.sem.value > waiting:
                    return False  # a permit nobody waits for: opening a connection takes nobody's
                held_elsewhere |= held
                idle_elsewhere |= idle
        except Exception as exc:  # noqa: BLE001 - routing is an optimisation: never fail a request for it
            log.debug("sharedpool: routing check failed (%s: %s); accepting", type(exc).__name__, exc)
            return False
        if not held_elsewhere:
            return False
        if now - self._last_deferral > STREAK_GAP:
            self._streak_start = now
        defer = (idle_elsewhere and now - self._streak_start < IDLE_GRACE) or (
            now - self.board.holder_ready.value < self.board.ready_window()
        )
        self._last_deferral = now if defer else -1.0
        return defer

    def _scan(self, ledger: Any) -> tuple[bool, bool, int]:
        """Tell whether siblings hold permits and idle connections, and count the waiting threads of all.

        A free permit while others wait is theirs (it is being handed over):
        taking it as free would start a chain of moves, each leaving a permit
        briefly free for the next worker to grab.
        """
        slots = ledger.slots
        held = idle = False
        waiting = 0
        for index in range(ledger.scan_limit()):
            slot = slots[index]
            if slot.state != SLOT_ACTIVE or slot.pid == self.pid:
                continue
            waiting += slot.waiting
            if slot.held and not idle and self._is_sibling(slot.pid, slot.start_time):
                held = True
                idle = bool(slot.idle)
        return held, idle, waiting

    def _is_sibling(self, pid: int, start_time: int) -> bool:
        key = (pid, start_time)
        known = self._siblings.get(key)
        if known is None:
            fields = proc_stat(pid)
            known = fields is not None and int(fields[1]) == self.ppid
            if len(self._siblings) > 4096:
                self._siblings.clear()
            self._siblings[key] = known
        return known


def deferring_accept(accept: Callable[..., Any], router: Router) -> Callable[..., Any]:
    """Wrap a worker's ``accept(listener)``: defer by sleeping and raising EAGAIN, as an empty queue would.

    gunicorn's sync worker treats EAGAIN as "no client waiting" and returns to
    ``select``. Its ``accept`` also serves the request: the time it takes, in a
    holder, feeds the ready window. (gthread's ``accept`` is a poller callback
    that must not raise: ``deferring_callback``.)
    """

    def wrapped(*args: Any) -> Any:
        if router.should_defer():
            time.sleep(DEFER_POLL)
            raise BlockingIOError(errno.EAGAIN, "sharedpool: deferred to a worker holding a connection")
        started = router.clock()
        result = accept(*args)  # accepts and serves one request, or raises EAGAIN
        router.served(router.clock() - started)
        return result

    return wrapped


def deferring_callback(accept: Callable[..., Any], router: Router, busy: Callable[[], bool]) -> Callable[..., Any]:
    """Wrap a poller callback ``accept(listener)``: defer by sleeping and returning without accepting.

    The sleep stalls the loop that also serves the worker's open client
    connections: while ``busy()`` says there are some, sleep BUSY_POLL only.
    """

    def wrapped(*args: Any) -> Any:
        if router.should_defer():
            time.sleep(BUSY_POLL if busy() else DEFER_POLL)
            return None
        return accept(*args)

    return wrapped
