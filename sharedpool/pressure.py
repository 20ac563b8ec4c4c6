"""Move permits to where the work is: ask an idle-holding worker to shed.

Runs in the worker. A thread that must wait for a permit picks a victim from
the ledger (most idle connections, least recently used) and wakes it with a
datagram; the victim's listener thread closes one idle connection and posts
its permit, or, if all its connections are busy (or idle only between two
requests), closes the next one returned once it served its minimum stint.
Nothing sheds while nobody waits, so a steady load never churns.
"""
from __future__ import annotations

import socket
import threading
import weakref
from typing import TYPE_CHECKING

from . import channel
from .ledger import SLOT_ACTIVE, Ledger

if TYPE_CHECKING:
    from .pool import ProcessBudget

SHED = b"shed"
STOP = b"stop"
WAKE = b"wake"
REPEAT_EVERY = 0.05  # seconds between shed requests while this process waits
SETTLE_CHECK = 0.005  # seconds between checks while a shed request waits for an idle connection to settle


def choose_victim(ledger: Ledger, own_index: int) -> int:
    """Return the slot that should give a permit up, or -1 if none holds one."""
    slots = ledger.slots
    best, best_key = -1, None
    for index in range(ledger.header.slot_hwm):
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
            key = (1, -slot.held, slot.shed_requests)  # spread requests over equal holders
        else:
            continue
        if best_key is None or key < best_key:
            best, best_key = index, key
    return best


def others_waiting(ledger: Ledger, own_index: int) -> bool:
    """Tell whether a thread of another worker waits for a permit."""
    slots = ledger.slots
    return any(
        slots[i].waiting and slots[i].state == SLOT_ACTIVE for i in range(ledger.header.slot_hwm) if i != own_index
    )


def request_shed(ledger: Ledger, own_index: int) -> int:
    """Ask the best victim to give a permit up; return its slot or -1."""
    victim = choose_victim(ledger, own_index)
    if victim >= 0:
        slot = ledger.slots[victim]
        slot.shed_requests += 1  # unlocked, from many processes: a hint (status, victim spreading)
        channel.send(channel.worker_address(ledger.name, slot.pid), SHED)
    return victim


class ShedListener:
    """A daemon thread (a greenlet under gevent) serving shed requests and idle expiry.

    Holds only a weak reference to its budget and stops when the budget is gone
    or closed (psycopg_pool's MaintenanceTask habit).
    """

    def __init__(self, budget: "ProcessBudget", pid: int, interval: float) -> None:
        self.address = channel.worker_address(budget.name, pid)
        self.sock = channel.bind(self.address)
        self.thread = threading.Thread(
            target=self._run, args=(weakref.ref(budget), self.sock, interval), name=f"sharedpool-{budget.name}",
            daemon=True,
        )
        self.thread.start()

    def nudge(self) -> None:
        """Tell the thread this process now waits: it repeats shed requests until served."""
        channel.send(self.address, WAKE)

    @staticmethod
    def _run(budget_ref: "weakref.ref[ProcessBudget]", sock: socket.socket, interval: float) -> None:
        timeout = interval
        while True:
            sock.settimeout(timeout)
            try:
                message = sock.recv(64)
            except socket.timeout:
                message = b""
            except OSError:
                return
            if message == STOP:
                sock.close()
                return
            budget = budget_ref()
            if budget is None or budget.closed:
                return
            if message == SHED:
                budget.shed_one()
            elif message == b"" and budget.shed_pending and budget.idle:
                budget.shed_one(requested=False)
            elif message != WAKE:
                budget.maintain()
            if budget.global_waiters:
                # the waiting threads sit in one long semaphore wait to keep their place in line
                budget._on_pressure()
                timeout = REPEAT_EVERY
            elif budget.shed_pending and budget.idle:
                timeout = SETTLE_CHECK  # a requested idle connection is about to settle
            else:
                timeout = interval
            del budget

    def close(self) -> None:
        """Stop the thread; it closes the socket on its way out."""
        channel.send(self.address, STOP)
