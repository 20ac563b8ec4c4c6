"""PermitGate in one process: accounting order, timeouts, deregistration, threads."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from sharedpool.errors import PoolTimeout
from sharedpool.permits import PermitGate

from helpers_procs import run_in_threads


@pytest.fixture
def ledger(make_ledger):
    return make_ledger(2)


def test_acquire_release_accounting(ledger):
    gate = PermitGate(ledger)
    assert gate.account.slot.pid == os.getpid() and gate.slot_index == 0
    assert gate.try_acquire() and gate.try_acquire()
    assert not gate.try_acquire()
    slot = gate.account.slot
    assert (slot.held, slot.inflight, slot.grants, ledger.sem.value) == (2, 0, 2, 0)
    gate.release()
    assert (slot.held, slot.inflight, slot.releases, ledger.sem.value) == (1, 0, 1, 1)
    gate.acquire(1.0)
    assert (slot.held, slot.waiting, slot.inflight) == (2, 0, 0)
    gate.deregister()
    assert ledger.sem.value == 2 and gate.account.closed
    assert ledger.header.grants == 3 and ledger.header.releases == 3  # folded into the header


@pytest.mark.timing
def test_timeout_names_budget_holders_and_waiters(ledger, unique_name):
    gate = PermitGate(ledger)
    gate.acquire(0.1)
    gate.acquire(0.1)
    pressure = []
    gate.on_pressure = lambda: pressure.append(1)
    start = time.monotonic()
    with pytest.raises(PoolTimeout) as err:
        gate.acquire(0.3)
    assert 0.25 <= time.monotonic() - start < 2.0
    message = str(err.value)
    assert f"pool '{unique_name}': no permit after 0.3 s (budget 2, held by 1 workers" in message
    assert f"pid {os.getpid()} held 2" in message and "0 waiting" in message
    assert pressure  # waiting asks others to shed
    slot = gate.account.slot
    assert (slot.inflight, slot.waiting, slot.timeouts, slot.waits) == (0, 0, 1, 1)
    gate.deregister()


def test_waiter_is_in_flight_while_blocked_and_wakes_on_release(ledger):
    gate = PermitGate(ledger)
    gate.acquire(0.1)
    gate.acquire(0.1)
    got = threading.Event()

    def waiter():
        gate.acquire(5.0)
        got.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    deadline = time.monotonic() + 2
    while gate.account.slot.waiting != 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert (gate.account.slot.waiting, gate.account.slot.inflight) == (1, 1) and gate.account.slot.wait_since > 0
    gate.release()
    assert got.wait(2)
    thread.join()
    assert (gate.account.slot.held, gate.account.slot.inflight, gate.account.slot.waiting, gate.account.slot.wait_since) == (2, 0, 0, 0.0)
    gate.deregister()


def test_timeout_message_names_the_reported_timeout(ledger):
    """A caller that passes what is left of its TIMEOUT gets its whole TIMEOUT named."""
    gate = PermitGate(ledger)
    gate.acquire(0.1)
    gate.acquire(0.1)
    with pytest.raises(PoolTimeout) as err:
        gate.acquire(0.05, reported_timeout=30.0)
    assert "no permit after 30.0 s" in str(err.value)
    gate.deregister()


def test_many_threads_keep_exact_counts(ledger):
    gate = PermitGate(ledger)

    def churn():
        for _ in range(300):
            gate.acquire(5.0)
            gate.release()

    errors = run_in_threads(churn, 6)
    assert not errors
    slot = gate.account.slot
    assert (slot.held, slot.inflight, slot.waiting, ledger.sem.value) == (0, 0, 0, 2)
    assert slot.grants == slot.releases == 1800
    gate.deregister()


GEVENT_WAITERS = """
from gevent import monkey
monkey.patch_all()
import json, sys, time
import gevent
from sharedpool.errors import PoolTimeout
from sharedpool.ledger import Ledger
from sharedpool.permits import PermitGate

ledger = Ledger.attach(sys.argv[1])
gate = PermitGate(ledger)
gate.acquire(1.0)
gate.acquire(1.0)  # the budget (2) is taken

def waiter():
    start = time.monotonic()
    try:
        gate.acquire(0.4)
    except PoolTimeout:
        return time.monotonic() - start
    return -1.0

jobs = [gevent.spawn(waiter) for _ in range(25)]  # more than the hub's threadpool holds
gevent.joinall(jobs)
waits = [job.value for job in jobs]

victim = gevent.spawn(gate.acquire, 5.0)
gevent.sleep(0.1)
victim.kill()  # killed mid-wait: it must take nothing, now or later
with gevent.Timeout(0.1, False):
    gate.acquire(5.0)  # cut short by a gevent.Timeout
gate.release()
gevent.sleep(0.3)
slot = gate.account.slot
print(json.dumps({"waits": waits, "free": ledger.sem.value, "held": slot.held,
                  "inflight": slot.inflight, "waiting": slot.waiting}))
gate.deregister()
"""


def test_gevent_waiters_poll_in_their_greenlet(ledger, unique_name):
    """Under gevent no OS thread waits for us: no queue before the timeout starts, nothing taken after a kill."""
    pytest.importorskip("gevent")
    out = subprocess.run([sys.executable, "-c", GEVENT_WAITERS, unique_name],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    waits = result["waits"]
    assert min(waits) >= 0.39 and max(waits) < 0.9, waits  # 25 waiters, each bounded by its own 0.4 s
    # the released permit stayed free: the killed and timed-out waiters took nothing unrecorded
    assert (result["free"], result["held"], result["inflight"], result["waiting"]) == (1, 1, 0, 0)
    assert ledger.sem.value == 2  # deregistered: everything back
