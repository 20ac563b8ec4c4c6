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
