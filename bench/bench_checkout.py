"""Warm checkout + return in one process: sharedpool (psycopg2, psycopg 3) vs SQLAlchemy QueuePool vs psycopg_pool.

    .venv/bin/python bench/bench_checkout.py [--dsn DSN] [--iterations N] [--repeats R]

Every pool holds one warm connection; each operation is a checkout and a
return with no query, timed over N iterations, R rounds interleaved across
the pools; the median (and minimum) per operation is reported. Appends one JSON line to bench/results/checkout.jsonl.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def timed(ops: dict[str, Callable[[], None]], iterations: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Median and minimum microseconds per call of each op, rounds interleaved.

    Every round times each pool once, back to back, so the noise of a shared
    machine falls on all of them alike.
    """
    runs: dict[str, list[float]] = {name: [] for name in ops}
    for op in ops.values():
        op()
    for _ in range(repeats):
        for name, op in ops.items():
            started = time.perf_counter()
            for _ in range(iterations):
                op()
            runs[name].append((time.perf_counter() - started) / iterations * 1e6)
    return {name: (statistics.median(r), min(r)) for name, r in runs.items()}


@contextlib.contextmanager
def sharedpool_op(dsn: str, driver: str) -> Iterator[Callable[[], None]]:
    from sharedpool import LocalPool, PoolConfig
    from tests.helpers_procs import coordinator

    name = f"bench{os.getpid()}{driver}"
    with coordinator(name, 4):
        pool = LocalPool(PoolConfig(name=name, pool_size=4, driver=driver), dsn)
        getconn, putconn = pool.getconn, pool.putconn

        def op() -> None:
            putconn(getconn())

        yield op
        pool.budget.close()


@contextlib.contextmanager
def sqlalchemy_op(dsn: str) -> Iterator[Callable[[], None]]:
    import psycopg2
    from sqlalchemy.pool import QueuePool

    pool = QueuePool(lambda: psycopg2.connect(dsn), pool_size=4, max_overflow=0)

    def op() -> None:
        pool.connect().close()

    yield op
    pool.dispose()


@contextlib.contextmanager
def psycopg_pool_op(dsn: str) -> Iterator[Callable[[], None]]:
    from psycopg_pool import ConnectionPool

    pool = ConnectionPool(dsn, min_size=1, max_size=4, open=True)
    pool.wait()
    getconn, putconn = pool.getconn, pool.putconn

    def op() -> None:
        putconn(getconn())

    yield op
    pool.close()


POOLS = {
    "sharedpool_psycopg2": functools.partial(sharedpool_op, driver="psycopg2"),
    "sharedpool_psycopg": functools.partial(sharedpool_op, driver="psycopg"),
    "sqlalchemy_queuepool": sqlalchemy_op,  # on psycopg2
    "psycopg_pool": psycopg_pool_op,  # on psycopg 3
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("DATABASE_URL"), help="server to use (default: $DATABASE_URL, else a throwaway cluster)")
    parser.add_argument("--iterations", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "checkout.jsonl"))
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        dsn = args.dsn
        if not dsn:
            from devtools.pgcluster import TempCluster

            dsn = stack.enter_context(TempCluster()).dsn
        ops = {name: stack.enter_context(factory(dsn)) for name, factory in POOLS.items()}
        timings = timed(ops, args.iterations, args.repeats)
    results = {name: round(median, 3) for name, (median, _) in timings.items()}
    minimums = {name: round(low, 3) for name, (_, low) in timings.items()}
    for name, (median, low) in timings.items():
        print(f"{name:>22}: {median:7.2f} µs per warm checkout + return (median; min {low:.2f})", flush=True)
    record = {
        "bench": "checkout",
        "unit": "us_median",
        "results": results,
        "minimums": minimums,
        "iterations": args.iterations,
        "repeats": args.repeats,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "load_average_1min": round(os.getloadavg()[0], 2),  # a shared machine: judge the figures by it
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([os.path.relpath(sys.executable, ROOT), *sys.argv]),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
