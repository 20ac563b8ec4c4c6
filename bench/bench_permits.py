"""Micro-benchmark: one permit acquire + release with ledger accounting, from Python.

Run: .venv/bin/python bench/bench_permits.py [--rounds 31] [--ops 20000]

Creates a throwaway ledger (no coordinator, no PostgreSQL), registers one
PermitGate and times ``try_acquire()`` + ``release()`` pairs (the uncontended
path a warm worker takes), in rounds; prints the median and spread of the
per-pair cost in microseconds, next to the bare posix_ipc semaphore pair for
reference. Removes its IPC objects on exit.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sharedpool.coordinator.lifecycle import remove_pool  # noqa: E402
from sharedpool.ledger import Ledger  # noqa: E402
from sharedpool.names import PoolNames  # noqa: E402
from sharedpool.permits import PermitGate  # noqa: E402


def per_op_us(fn, ops: int, rounds: int) -> list[float]:
    results = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        fn(ops)
        results.append((time.perf_counter_ns() - start) / ops / 1000)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--ops", type=int, default=20000)
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    args = parser.parse_args()

    name = f"bench{os.getpid()}"
    ledger = Ledger.create(name, 8)
    try:
        gate = PermitGate(ledger)
        sem = ledger.sem

        def gated(n: int) -> None:
            acquire, release = gate.try_acquire, gate.release
            for _ in range(n):
                acquire()
                release()

        def blocking(n: int) -> None:
            acquire, release = gate.acquire, gate.release
            for _ in range(n):
                acquire(1.0)
                release()

        def bare(n: int) -> None:
            acquire, release = sem.acquire, sem.release
            for _ in range(n):
                acquire(0)
                release()

        per_op_us(gated, args.ops, 3)  # warm up
        results = {
            "gate try_acquire+release": per_op_us(gated, args.ops, args.rounds),
            "gate acquire(timeout)+release": per_op_us(blocking, args.ops, args.rounds),
            "bare sem acquire+release": per_op_us(bare, args.ops, args.rounds),
        }
        assert gate.account.held == 0 and gate.account.inflight == 0 and sem.value == 8
        gate.deregister()
    finally:
        ledger.close()
        remove_pool(PoolNames(name), None, force=True)

    summary = {
        label: {
            "median_us": round(statistics.median(v), 3),
            "min_us": round(min(v), 3),
            "max_us": round(max(v), 3),
        }
        for label, v in results.items()
    }
    if args.json:
        print(json.dumps({"python": sys.version.split()[0], "rounds": args.rounds, "ops": args.ops, **summary}))
    else:
        print(f"Python {sys.version.split()[0]}, {args.rounds} rounds x {args.ops} pairs (median of per-round means)")
        for label, s in summary.items():
            print(f"  {label:32s} {s['median_us']:7.3f} us  (min {s['min_us']:.3f}, max {s['max_us']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
