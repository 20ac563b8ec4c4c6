"""A worker process for the pressure tests: ``python tests/pressure_worker.py MODE NAME BUDGET DSN [ARGS]``.

Each mode prints JSON lines on stdout; stdin lines are commands, EOF means exit.
"""
from __future__ import annotations

import json
import sys
import time


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def make_pool(name: str, budget: int, dsn: str, **options: object):
    from sharedpool import LocalPool, PoolConfig

    return LocalPool(PoolConfig(name=name, pool_size=budget, **options), dsn)


def query(conn, sql: str = "SELECT 1") -> None:
    with conn.cursor() as cur:
        cur.execute(sql)
    conn.commit()


def hoarder(pool) -> None:
    """On 'grab': check out every connection the budget allows, then return them all (idle)."""
    for line in sys.stdin:
        count = int(line)
        conns = [pool.getconn() for _ in range(count)]
        for conn in conns:
            query(conn)
        for conn in conns:
            pool.putconn(conn)
        say(idle=pool.get_stats()["pool_available"], sheds=pool.budget.gate.account.counts['sheds'])


def needer(pool) -> None:
    """On each line: time one checkout (the handoff), use it, close it for real."""
    for _ in sys.stdin:
        started = time.perf_counter()
        conn = pool.getconn()
        waited = time.perf_counter() - started
        query(conn)
        pool.putconn(conn, discard=True)
        say(handoff_s=waited)


def loop(pool, seconds: float, period: float, discard: bool) -> None:
    """Check out, query, return for ``seconds``; one request every ``period`` seconds."""
    from sharedpool import PoolTimeout

    say(ready=True)
    sys.stdin.readline()
    done = timeouts = 0
    deadline = time.monotonic() + seconds
    opened_at = {}
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            conn = pool.getconn()
        except PoolTimeout:
            timeouts += 1
            continue
        query(conn)
        pool.putconn(conn, discard=discard)
        done += 1
        elapsed = time.monotonic() - started
        if period > elapsed:
            time.sleep(period - elapsed)
        second = int(seconds - (deadline - time.monotonic()))
        opened_at[second] = pool.get_stats()["connections_num"]
    counts = pool.budget.gate.account.counts
    say(done=done, timeouts=timeouts, opened_by_second=opened_at, opened=pool.get_stats()["connections_num"],
        grants=counts["grants"], waits=counts["waits"], wait_ms=round(counts["wait_ms"]), sheds=counts["sheds"])


def holder(pool, count: int) -> None:
    """Hold ``count`` connections until a line arrives, then release them."""
    conns = [pool.getconn() for _ in range(count)]
    say(held=count)
    sys.stdin.readline()
    for conn in conns:
        pool.putconn(conn, discard=True)
    say(released=count)
    sys.stdin.readline()


def greenlets(name: str, budget: int, dsn: str, count: int) -> None:
    """Many greenlets on a small per-process max while permits are scarce: the hub must keep ticking."""
    from gevent import monkey

    monkey.patch_all()
    import gevent
    from sharedpool.integrations.servers import make_psycopg2_green

    make_psycopg2_green()  # libpq waits yield to the hub, as under gunicorn's gevent worker
    pool = make_pool(name, budget, dsn, max_per_process=3, timeout=60)
    ticks, gaps, running = [], [], True

    def ticker():
        last = time.monotonic()
        while running:
            gevent.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now
            ticks.append(now)

    def work(i):
        with pool.connection() as conn:
            query(conn, "SELECT pg_sleep(0.02)")
        return i

    say(ready=True)
    sys.stdin.readline()
    tick = gevent.spawn(ticker)
    jobs = [gevent.spawn(work, i) for i in range(count)]
    gevent.joinall(jobs)
    running = False
    tick.join()
    say(completed=sum(1 for job in jobs if job.successful()), ticks=len(ticks), max_gap_s=max(gaps),
        opened=pool.get_stats()["connections_num"])


def main() -> None:
    mode, name, budget, dsn, *args = sys.argv[1:]
    budget = int(budget)
    if mode == "greenlets":
        greenlets(name, budget, dsn, int(args[0]))
        return
    pool = make_pool(name, budget, dsn, timeout=30)
    if mode == "hoarder":
        hoarder(pool)
    elif mode == "needer":
        needer(pool)
    elif mode == "loop":
        loop(pool, float(args[0]), float(args[1]), args[2] == "discard")
    elif mode == "holder":
        holder(pool, int(args[0]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
