"""Move permits to where the work is: ask an idle-holding worker to shed.

Runs in the worker. A thread that must wait for a permit picks a victim from
the ledger (most idle connections, least recently used) and wakes it with a
datagram to the victim's socket in the pool directory; the victim's listener
thread closes one idle connection and posts its permit, or, if all its
connections are busy (or idle only between two requests), closes the next
one returned once it served its minimum stint. Nothing sheds while nobody
waits, so a steady load never churns.

This module talks to the process's budget only through ``Shedder``; it
imports nothing from the pool.
"""
from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Protocol

from . import channel
from .ledger import SLOT_ACTIVE, Ledger
from .names import PoolNames

log = logging.getLogger("sharedpool")

SHED = b"shed"
REPEAT_EVERY = 0.05  # seconds between shed requests while this process waits
SETTLE_CHECK = 0.005  # seconds between checks while a shed request waits for an idle connection to settle
RESTART_PAUSE = 0.1  # seconds before the listener resumes after an unexpected error


class Shedder(Protocol):
    """What the listener needs from a process's share of a pool."""

    name: str
    closed: bool

    def waiting_for_permits(self) -> bool: ...

    def settling(self) -> bool: ...

    def shed_one(self, requested: bool = True) -> None: ...

    def maintain(self) -> None: ...

    def on_pressure(self) -> None: ...

    def shed_request_received(self) -> None: ...


def choose_victim(ledger: Ledger, own_index: int) -> int:
    """Return the slot that should give a permit up, or -1 if none holds one."""
    slots = ledger.slots
    best, best_key = -1, None
    for index in range(ledger.scan_limit()):
        if index == own_index:
            continue
        slot = slots[index]
        if slot.state != SLOT_ACTIVE or not slot.held:
            continue
        idle = slot.idle
        # idle holders first (most idle, then least recently used); then busy holders not waiting themselves
        if idle:
            key = (0, -idle, slot.idle_since)
        elif not slot.waiting:
            key = (1, -slot.held, slot.shed_received)  # spread requests over equal holders
        else:
            continue
        if best_key is None or key < best_key:
            best, best_key = index, key
    return best


def others_waiting(ledger: Ledger, own_index: int) -> bool:
    """Tell whether a thread of another worker waits for a permit."""
    slots = ledger.slots
    return any(
        slots[i].waiting and slots[i].state == SLOT_ACTIVE for i in range(ledger.scan_limit()) if i != own_index
    )


def request_shed(ledger: Ledger, own_index: int) -> int:
    """Ask the best victim to give a permit up; return its slot or -1."""
    victim = choose_victim(ledger, own_index)
    if victim >= 0:
        channel.send(ledger.names, PoolNames.worker_socket(victim), SHED)
    return victim


class ShedListener:
    """A daemon thread (a greenlet under gevent) serving shed requests, idle expiry and slot healing.

    Holds only a weak reference to its budget and stops when the budget is
    gone or closed (psycopg_pool's MaintenanceTask habit). It is stopped
    through a pipe only this process holds, never through its socket. If its
    socket cannot be bound, it still expires idle connections; only shed
    requests from others are lost, and checkouts never fail for it.
    """

    def __init__(self, budget: Shedder, ledger: Ledger, index: int, interval: float,
                 heal: Callable[[], None]) -> None:
        self.inbox: channel.Inbox | None = None
        try:
            self.inbox = channel.Inbox(ledger.names, PoolNames.worker_socket(index), ledger.group,
                                       os.fstat(ledger.dir_fd).st_uid)
        except OSError as exc:
            log.warning("sharedpool: pool %r: cannot listen for shed requests (%s); this worker keeps "
                        "serving but other workers cannot ask it to free idle connections", budget.name, exc)
        # a socket pair, not a pipe: a closed socket object refuses writes instead of hitting a reused fd
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.thread = threading.Thread(
            target=self._run, args=(weakref.ref(budget), interval, heal),
            name=f"sharedpool-{budget.name}", daemon=True,
        )
        self.thread.start()

    def nudge(self) -> None:
        """Tell the thread this process now waits: it repeats shed requests until served."""
        self._signal(b"w")

    def close(self) -> None:
        """Stop the thread; it closes its socket on its way out."""
        self._signal(b"s")

    def forget_after_fork(self) -> None:
        """Child after fork: drop our copies; the parent's thread, socket and pipe live on."""
        self._wake_r.close()
        self._wake_w.close()
        if self.inbox is not None:
            self.inbox.close(unlink=False)

    def _signal(self, what: bytes) -> None:
        try:
            self._wake_w.send(what)
        except OSError:
            pass  # already signalled, or stopped

    def _run(self, budget_ref: "weakref.ref[Shedder]", interval: float, heal: Callable[[], None]) -> None:
        timeout = interval
        stopping = False
        fds = [self._wake_r] + ([self.inbox.fileno()] if self.inbox is not None else [])
        try:
            while not stopping:
                try:
                    ready = select.select(fds, [], [], timeout)[0]
                    messages = self.inbox.receive() if self.inbox is not None and self.inbox.fileno() in ready else []
                    woken = b""
                    if self._wake_r in ready:
                        woken = self._wake_r.recv(64)
                        stopping = b"s" in woken
                    budget = budget_ref()
                    if stopping or budget is None or budget.closed:
                        return
                    for message in messages:
                        if message == SHED:
                            budget.shed_request_received()
                            budget.shed_one()
                    if not (messages or woken):
                        if budget.settling():
                            budget.shed_one(requested=False)
                        else:
                            budget.maintain()
                            heal()
                    if budget.waiting_for_permits():
                        # the waiting threads sit in one semaphore wait to keep their place in line
                        budget.on_pressure()
                        timeout = REPEAT_EVERY
                    elif budget.settling():
                        timeout = SETTLE_CHECK  # a requested idle connection is about to settle
                    else:
                        timeout = interval
                    del budget
                except Exception:
                    log.exception("sharedpool: listener thread error; resuming")
                    time.sleep(RESTART_PAUSE)
        finally:
            self._wake_r.close()
            self._wake_w.close()
            if self.inbox is not None:
                self.inbox.close()
