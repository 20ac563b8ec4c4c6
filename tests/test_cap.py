"""The cap on the server when operators cut the budget and when the server freezes.

Judged on the server (pg_stat_activity, sampled every 10 ms), with real
coordinators, real worker processes and a real PostgreSQL.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from sharedpool import LocalPool, PoolConfig, PoolTimeout
from sharedpool.ledger import Ledger

from helpers_procs import PYTHON, PeakSampler, PoolWorker, coordinator, read_line, run_cli, sem_free, wait_until


def test_budget_cut_converges_on_the_server_and_never_over_grants(dsn, unique_name):
    """5 -> 1 with idle and busy holders and a waiter: idle ones close at once, busy ones at their
    return, none of the returned permits reaches the waiter; back to 5 serves it at once."""
    with coordinator(unique_name, 5) as coord, PeakSampler(dsn, unique_name) as sampler:
        idle_holder, busy_holder, keeper = (PoolWorker(unique_name, 5, dsn) for _ in range(3))
        waiter = PoolWorker(unique_name, 5, dsn)
        try:
            idle_holder.get(2)
            idle_holder.do("put 2")  # two idle connections in that process
            busy_holder.get(2)  # two checked out, returned later
            keeper.get(1)  # one checked out for good
            assert wait_until(lambda: sampler.last == 5, 2.0)
            cut_at = time.monotonic()
            reload = subprocess.Popen([PYTHON, "-m", "sharedpool.coordinator", "reload", "--name", unique_name,
                                       "--budget", "1", "--wait", "20"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            ledger = Ledger.attach(unique_name)
            try:
                assert wait_until(lambda: ledger.header.budget == 1, 5.0)
            finally:
                ledger.close()
            waiter.proc.stdin.write("get 1\n")  # waits through the cut: it must get none of the returns
            waiter.proc.stdin.flush()
            assert wait_until(lambda: sampler.last <= 3, 1.0), "idle connections above the new budget stay open"
            idle_closed = time.monotonic() - cut_at
            time.sleep(1.0)  # the busy holder's requests take a while
            busy_holder.do("put 2")  # returned: closed and retired, not handed to the waiter
            returned_at = time.monotonic()
            assert wait_until(lambda: sampler.last <= 1, 1.0), f"server still at {sampler.last}"
            converged = time.monotonic() - returned_at
            said, err = reload.communicate(timeout=20)
            assert reload.returncode == 0 and "budget 1 (within it after" in said, err
            time.sleep(0.5)
            assert sampler.last == 1 and waiter.proc.poll() is None  # the waiter got nothing meanwhile
            after_cut = [count for at, count in sampler.history if at >= cut_at]
            assert max(after_cut) <= 5 and all(b <= a for a, b in zip(after_cut, after_cut[1:]) if b > 1), \
                f"the server count rose during the cut: {after_cut[:50]}"
            out = run_cli("reload", "--name", unique_name, "--budget", "5")
            assert out.returncode == 0, out.stderr
            assert read_line(waiter.proc, 5.0).startswith("ok")  # raising is immediate
            assert sampler.peak <= 5
            print(f"\nbudget cut 5 -> 1: idle connections closed in {idle_closed * 1000:.0f} ms; "
                  f"busy ones {converged * 1000:.0f} ms after their return; reload said: {said.strip()}")
        finally:
            for worker in (idle_holder, busy_holder, keeper, waiter):
                worker.kill()
        assert wait_until(lambda: sem_free(unique_name) == 5, 3.0), coord.log()[-2000:]


def _postmaster_pid(pg) -> int:
    with open(os.path.join(pg.datadir, "postmaster.pid")) as f:
        return int(f.readline())


@pytest.mark.timing
def test_timeout_bounds_a_checkout_against_a_frozen_server(pg, dsn, unique_name):
    """SIGSTOP on this test's own postmaster: the checkout raises PoolTimeout within TIMEOUT and a slack,
    and its permit comes back."""
    postmaster = _postmaster_pid(pg)
    with coordinator(unique_name, 2):
        pool = LocalPool(PoolConfig(name=unique_name, pool_size=2, timeout=2.0, autostart=False), dsn)
        os.kill(postmaster, signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(PoolTimeout, match=rf"pool '{unique_name}': could not connect within TIMEOUT \(2.0 s\)"):
                pool.getconn()
            elapsed = time.monotonic() - start
        finally:
            os.kill(postmaster, signal.SIGCONT)
        ledger = Ledger.attach(unique_name)
        try:
            assert ledger.sem.value == 2  # the permit of the failed connect is back
        finally:
            ledger.close()
            pool.budget.close()
        print(f"\nfrozen server: PoolTimeout after {elapsed:.2f} s (TIMEOUT 2.0 s)")
        assert elapsed < 2.0 + 1.5


GEVENT_TIMEOUT_MID_QUERY = """
from gevent import monkey
monkey.patch_all()
import json, sys, time
import gevent
from sharedpool import LocalPool, PoolConfig
from sharedpool.integrations.servers import make_psycopg2_green

make_psycopg2_green()
name, dsn = sys.argv[1], sys.argv[2]
pool = LocalPool(PoolConfig(name=name, pool_size=1, check_interval=None, reclaim_grace=0.5, timeout=20,
                            autostart=False, driver="psycopg2"), dsn)
started = time.monotonic()
try:
    with gevent.Timeout(0.3):
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_sleep(2)")
except gevent.Timeout:
    pass
returned = time.monotonic() - started
with pool.connection() as conn, conn.cursor() as cur:  # the next checkout needs the one permit
    cur.execute("SELECT 1")
print(json.dumps({"returned_s": returned, "next_s": time.monotonic() - started}), flush=True)
pool.budget.close()
"""


def test_gevent_timeout_mid_query_posts_no_permit_while_the_backend_runs(dsn, unique_name):
    """CHECK_INTERVAL None, budget 1: a greenlet timed out in the middle of pg_sleep(2) closes its connection;
    the permit is posted only once the backend is gone (the query is cancelled first), so the server never
    sees two."""
    pytest.importorskip("gevent")
    import json
    import sys

    with coordinator(unique_name, 1), PeakSampler(dsn, unique_name, interval=0.005) as sampler:
        out = subprocess.run([sys.executable, "-c", GEVENT_TIMEOUT_MID_QUERY, unique_name, dsn],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
    print(f"\ngevent timeout mid-query: back after {result['returned_s']:.2f} s, next checkout done after "
          f"{result['next_s']:.2f} s, server peak {sampler.peak}")
    assert sampler.peak == 1  # never the old backend and the new one together
    assert result["next_s"] > 1.5  # the permit came back only when pg_sleep(2) had ended, not at the timeout
