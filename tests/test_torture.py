"""Kill -9 torture: churning workers, random SIGKILLs, the cap checked on the server.

Each worker is a separate process (forked from a preloaded forkserver, as
gunicorn --preload does) looping acquire → connect → hold →
close → release. The test SIGKILLs random workers at random instants
and starts replacements; a sampler counts the pool's backends in
pg_stat_activity every few milliseconds and another reads the ledger.
Asserted: the ledger never records more than the budget held, the server
never shows more than the budget, and once the last worker is gone every
permit is free again within 1 s.

Figures are printed (run with ``-s``) and attached as junit properties.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import random
import threading
import time

import pytest

from sharedpool.ledger import Ledger, Slot, SLOT_ACTIVE

from helpers_procs import coordinator, sample_server, torture_gate_worker, torture_pool_worker

WORKERS = 8
BUDGET = 4
KILLS = int(os.environ.get("SHAREDPOOL_TORTURE_KILLS", "220"))


def _forkserver() -> multiprocessing.context.BaseContext:
    """Workers fork from a preloaded server process (like gunicorn --preload), never from pytest."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["psycopg2", "sharedpool", "sharedpool.pool", "helpers_procs"])
    return ctx


class LedgerWatch(threading.Thread):
    """Sum ``held`` over consistent copies of the slot table."""

    def __init__(self, name: str) -> None:
        super().__init__(daemon=True)
        self.ledger = Ledger.attach(name)
        self.stop = threading.Event()
        self.samples = 0
        self.peak = 0

    def run(self) -> None:
        size = ctypes.sizeof(Slot)
        while not self.stop.is_set():
            first = self.ledger.raw_slots()
            if self.ledger.raw_slots() == first:
                held = 0
                for offset in range(0, len(first), size):
                    slot = Slot.from_buffer_copy(first, offset)
                    if slot.state == SLOT_ACTIVE:
                        held += slot.held
                self.samples += 1
                self.peak = max(self.peak, held)
            time.sleep(0.002)


def _torture(name: str, dsn: str, target, record_property) -> None:
    rng = random.Random(12345)
    ctx = _forkserver()

    def spawn():
        proc = ctx.Process(target=target, args=(name, BUDGET, dsn), daemon=True)
        proc.start()
        return proc

    with coordinator(name, BUDGET) as coord:
        stop, results = ctx.Event(), ctx.Queue()
        sampler = ctx.Process(target=sample_server, args=(dsn, f"sharedpool/{name}", BUDGET, stop, results), daemon=True)
        watch = LedgerWatch(name)
        workers = [spawn() for _ in range(WORKERS)]
        crashed: list[int] = []
        sampler.start()
        watch.start()
        kills = 0
        started = time.monotonic()
        try:
            while kills < KILLS:
                time.sleep(rng.uniform(0.02, 0.18))
                for i, proc in enumerate(workers):
                    if proc.exitcode is not None:  # exited by itself: a failure (its traceback is on stderr)
                        crashed.append(proc.exitcode)
                        workers[i] = spawn()
                victim = rng.randrange(len(workers))
                workers[victim].kill()
                workers[victim].join()
                kills += 1
                workers[victim] = spawn()
            duration = time.monotonic() - started
            for proc in workers:
                proc.kill()
            for proc in workers:
                proc.join()
            last_exit = time.monotonic()
            ledger = Ledger.attach(name)
            try:
                while ledger.sem.value != BUDGET and time.monotonic() - last_exit < 3.0:
                    time.sleep(0.002)
                recovered = time.monotonic() - last_exit
                free = ledger.sem.value
                snap = ledger.snapshot()
            finally:
                ledger.close()
            time.sleep(0.3)  # let the sampler see the last backends go
        finally:
            for proc in workers:
                proc.kill()
                proc.join()
            stop.set()
            watch.stop.set()
            server = results.get(timeout=10)
            sampler.join(5)
            watch.join(5)
            watch.ledger.close()
        log = coord.log()
    grants = snap.totals["grants"]
    report = (
        f"{kills} kills in {duration:.1f} s, {WORKERS} workers, budget {BUDGET}: "
        f"server peak {server['peak']} over {server['samples']} samples (max gap {server['max_gap'] * 1000:.1f} ms, {server['late']} gaps > 20 ms), "
        f"ledger peak held {watch.peak} over {watch.samples} samples, grants {grants:.0f}, "
        f"reclaimed {snap.reclaimed_permits} from {snap.reclaimed_workers} workers, audit fixes {snap.audit_fixes}, "
        f"all free {recovered * 1000:.0f} ms after the last exit"
    )
    print("\n" + report)
    for key, value in (
        ("kills", kills), ("server_peak", server["peak"]), ("ledger_peak", watch.peak),
        ("server_samples", server["samples"]), ("recovered_ms", round(recovered * 1000)),
    ):
        record_property(key, value)
    assert not crashed, f"workers exited on their own with codes {crashed}: {report}"
    assert watch.peak <= BUDGET, report
    assert not server["over"], f"server above budget: {report}\n{server['over'][:3]}"
    assert server["peak"] <= BUDGET
    assert free == BUDGET and recovered <= 1.0, report
    assert "exceeds" not in log, log[-3000:]
    assert grants > kills  # the workers did work between kills


@pytest.mark.slow
def test_torture_local_pool(unique_name, dsn, record_property):
    _torture(unique_name, dsn, torture_pool_worker, record_property)


@pytest.mark.slow
def test_torture_permit_gate_raw_psycopg2(unique_name, dsn, record_property):
    _torture(unique_name, dsn, torture_gate_worker, record_property)
