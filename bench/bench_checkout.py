"""Warm checkout + return in one process: sharedpool vs SQLAlchemy QueuePool vs psycopg_pool.

    .venv/bin/python bench/bench_checkout.py [--dsn DSN] [--iterations N] [--repeats R]

Every pool holds one warm connection; each operation is a checkout and a
return with no query, timed over N iterations, R times; the median per
operation is reported. Appends one JSON line to bench/results/checkout.jsonl.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def timed(op: Callable[[], None], iterations: int, repeats: int) -> float:
    """Median microseconds per call of ``op``."""
    op()
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(iterations):
            op()
        runs.append((time.perf_counter() - started) / iterations * 1e6)
    return statistics.median(runs)


@contextlib.contextmanager
def sharedpool_op(dsn: str) -> Iterator[Callable[[], None]]:
    from sharedpool import LocalPool, PoolConfig
    from tests.helpers_procs import coordinator

    name = f"bench{os.getpid()}"
    with coordinator(name, 4):
        pool = LocalPool(PoolConfig(name=name, pool_size=4), dsn)
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


POOLS = {"sharedpool": sharedpool_op, "sqlalchemy_queuepool": sqlalchemy_op, "psycopg_pool": psycopg_pool_op}


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
        results = {}
        for name, factory in POOLS.items():
            with factory(dsn) as op:
                results[name] = round(timed(op, args.iterations, args.repeats), 3)
            print(f"{name:>22}: {results[name]:7.2f} µs per warm checkout + return", flush=True)
    record = {
        "bench": "checkout",
        "unit": "us_median",
        "results": results,
        "iterations": args.iterations,
        "repeats": args.repeats,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([os.path.relpath(sys.executable, ROOT), *sys.argv]),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
