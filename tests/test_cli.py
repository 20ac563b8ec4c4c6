"""The ``sharedpool`` command: status, reload, cleanup, and refusing bad input clearly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import posix_ipc
import pytest

from sharedpool.ledger import Ledger, ipc_names, lock_path, unlink

from helpers_procs import CoordinatorProc, GateWorker, coordinator, read_line, run_cli, sem_free, wait_until


def test_status_json_fields(unique_name):
    with coordinator(unique_name, 3) as coord:
        worker = GateWorker(unique_name)
        try:
            worker.do("acquire 2")
            out = run_cli("status", "--name", unique_name, "--json")
            assert out.returncode == 0, out.stderr
            status = json.loads(out.stdout)
            assert set(status) == {"name", "budget", "free", "held", "waiting", "epoch", "coordinator", "counters",
                                   "mean_wait_ms", "rates", "workers"}
            assert (status["name"], status["budget"], status["free"], status["held"], status["waiting"]) == (unique_name, 3, 1, 2, 0)
            assert status["coordinator"]["pid"] == coord.pid and status["coordinator"]["alive"]
            assert 0 <= status["coordinator"]["heartbeat_age_s"] < 2
            for key in ("grants", "releases", "timeouts", "waits", "wait_ms", "sheds", "opened", "closed",
                        "reclaimed_permits", "reclaimed_workers", "audit_fixes", "reloads"):
                assert key in status["counters"], key
            assert status["counters"]["grants"] == 2
            [w] = status["workers"]
            assert (w["pid"], w["alive"], w["held"], w["inflight"], w["waiting"]) == (worker.pid, True, 2, 0, 0)
            assert set(w) >= {"idle", "in_use", "wait_s", "opened", "sheds", "timeouts"}
            assert status["rates"]["window_s"] >= 1.0 and status["rates"]["grants_per_s"] == 0
            assert w["opened_per_s"] == 0
            # a grant between two --watch reports shows up as a rate in the second
            watcher = subprocess.Popen(
                [sys.executable, "-m", "sharedpool.coordinator", "status", "--name", unique_name, "--json",
                 "--rate-window", "0", "--watch", "0.5"], stdout=subprocess.PIPE, text=True)
            try:
                assert json.loads(read_line(watcher))["rates"] is None  # the first report: no window yet
                worker.do("acquire 1")
                rates = [json.loads(read_line(watcher))["rates"] for _ in range(3)]
            finally:
                watcher.kill()
                watcher.communicate()
            assert any(0 < r["grants_per_s"] <= 1 / 0.5 + 0.01 for r in rates), rates
            table = run_cli("status", "--name", unique_name, "--rate-window", "0")
            assert f"pool '{unique_name}': budget 3, free 0, held 3" in table.stdout
            assert "(churn)" not in table.stdout
            table = run_cli("status", "--name", unique_name)
            assert "/s (churn)" in table.stdout
            assert f"pool '{unique_name}': budget 3, free 0, held 3" in table.stdout
            assert f"{worker.pid:>8}     3" in table.stdout and "alive" in table.stdout
        finally:
            worker.exit()


def test_status_without_coordinator_says_so(unique_name):
    coord = CoordinatorProc(unique_name, 2, remove_on_exit=False)
    try:
        coord.stop(signal.SIGKILL)
        out = run_cli("status", "--name", unique_name)
        assert out.returncode == 0
        assert "coordinator: NOT RUNNING" in out.stdout
        assert json.loads(run_cli("status", "--name", unique_name, "--json").stdout)["coordinator"]["alive"] is False
    finally:
        coord.close()
        unlink(unique_name)


def test_status_of_missing_pool(unique_name):
    out = run_cli("status", "--name", unique_name)
    assert out.returncode == 1
    assert f"sharedpool status: pool '{unique_name}': no ledger at /dev/shm/sharedpool.{unique_name}" in out.stderr
    assert "Traceback" not in out.stderr


def test_cleanup_refuses_with_live_workers(unique_name):
    with coordinator(unique_name, 2):
        worker = GateWorker(unique_name)
        try:
            out = run_cli("cleanup", "--name", unique_name)
            assert out.returncode == 1
            assert f"pool '{unique_name}' has 1 live worker(s) ({worker.pid}); use --force" in out.stderr
            assert Ledger.exists(unique_name)
        finally:
            worker.exit()
        out = run_cli("cleanup", "--name", unique_name)
        assert out.returncode == 0 and f"removed /dev/shm/sharedpool.{unique_name}" in out.stdout
        assert f"removed {lock_path(unique_name)}" in out.stdout  # the coordinator's lock file too
        assert not Ledger.exists(unique_name) and not os.path.exists(lock_path(unique_name))
    assert "nothing to remove" in run_cli("cleanup", "--name", unique_name).stdout


def test_cleanup_force_and_corrupt_segment(unique_name):
    shm = posix_ipc.SharedMemory(ipc_names(unique_name)[0], posix_ipc.O_CREX, mode=0o600, size=64)
    os.close(shm.fd)
    out = run_cli("cleanup", "--name", unique_name)  # corrupt: removing it is the point
    assert out.returncode == 0 and "removed" in out.stdout
    assert not Ledger.exists(unique_name)


def test_reload_raises_and_lowers_budget(unique_name):
    with coordinator(unique_name, 3) as coord:
        holder = GateWorker(unique_name, timeout=0.2)
        try:
            holder.do("acquire 3")
            out = run_cli("reload", "--name", unique_name, "--budget", "5")
            assert out.returncode == 0 and f"pool '{unique_name}': budget 5" in out.stdout, out.stderr
            assert sem_free(unique_name) == 2
            holder.do("acquire 2")  # the new permits are usable at once
            # lower to 2 while 5 are held: nothing is taken away, permits retire as they free
            out = run_cli("reload", "--name", unique_name, "--budget", "2")
            assert out.returncode == 0, out.stderr
            ledger = Ledger.attach(unique_name)
            try:
                assert ledger.header.budget == 2 and ledger.header.physical == 5
                holder.do("release 2")
                assert wait_until(lambda: ledger.header.physical == 3, 2.0), "retirement of freed permits"
                assert ledger.sem.value == 0
                holder.do("release 1")
                assert wait_until(lambda: ledger.header.physical == 2, 2.0), "retirement down to the budget"
                assert ledger.sem.value == 0  # 2 held, 2 in circulation: none free
                holder.do("release 1")
                assert wait_until(lambda: ledger.sem.value == 1, 2.0)
                time.sleep(0.3)
                assert ledger.header.physical == 2 and ledger.sem.value == 1  # the budget is kept, not undercut
                assert ledger.header.reloads == 2
            finally:
                ledger.close()
        finally:
            holder.exit()
        assert sem_free(unique_name) == 2
        assert "budget 3 -> 5" in coord.log() and "budget 5 -> 2" in coord.log()


def test_reload_without_coordinator(unique_name):
    coord = CoordinatorProc(unique_name, 2, remove_on_exit=False)
    try:
        coord.stop(signal.SIGKILL)
        out = run_cli("reload", "--name", unique_name, "--budget", "4")
        assert out.returncode == 1
        assert f"no coordinator is running for pool '{unique_name}'" in out.stderr
    finally:
        coord.close()
        unlink(unique_name)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["coordinator", "--name", "x"], "the following arguments are required: --budget"),
        (["coordinator", "--budget", "0"], "argument --budget: --budget must be between 1 and 100000, got 0"),
        (["coordinator", "--budget", "-3"], "argument --budget: --budget must be between 1 and 100000, got -3"),
        (["coordinator", "--budget", "ten"], "argument --budget: --budget must be an integer, got 'ten'"),
        (["coordinator", "--budget", "2", "--reclaim-grace", "nan"], "argument --reclaim-grace: --reclaim-grace must be a finite number >= 0.0, got 'nan'"),
        (["coordinator", "--budget", "2", "--exit-when-idle", "-1"], "argument --exit-when-idle: --exit-when-idle must be a finite number >= 0.0, got '-1'"),
        (["coordinator", "--budget", "2", "--name", "bad/name"], "argument --name: --name must be 1-40 characters of [A-Za-z0-9_-], got 'bad/name'"),
        (["status", "--name", "x" * 41], "--name must be 1-40 characters"),
        (["reload", "--name", "x"], "the following arguments are required: --budget"),
        (["reload", "--name", "x", "--budget", "100001"], "argument --budget: --budget must be between 1 and 100000, got 100001"),
        (["status", "--name", "x", "--watch", "inf"], "argument --watch: --watch must be a finite number >= 0.0, got 'inf'"),
        (["cleanup"], "the following arguments are required: --name"),
    ],
)
def test_bad_arguments_are_named(args, message):
    out = run_cli(*args)
    assert out.returncode == 2
    assert message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_coordinator_refuses_corrupt_segment_naming_it(unique_name):
    shm_name, sem_name = ipc_names(unique_name)
    shm = posix_ipc.SharedMemory(shm_name, posix_ipc.O_CREX, mode=0o600, size=4096)
    os.pwrite(shm.fd, b"NOTALEDGER" * 10, 0)
    os.close(shm.fd)
    posix_ipc.Semaphore(sem_name, posix_ipc.O_CREX, mode=0o600, initial_value=1).close()
    try:
        out = run_cli("coordinator", "--name", unique_name, "--budget", "2")
        assert out.returncode == 1
        assert f"sharedpool coordinator: pool '{unique_name}': /dev/shm/sharedpool.{unique_name} is not a sharedpool ledger" in out.stderr
        assert f"remove it with `sharedpool cleanup --name {unique_name}`" in out.stderr
        assert "Traceback" not in out.stderr
    finally:
        unlink(unique_name)


def test_second_coordinator_is_refused(unique_name):
    with coordinator(unique_name, 2) as first:
        out = run_cli("coordinator", "--name", unique_name, "--budget", "2")
        assert out.returncode == 1
        assert f"pool '{unique_name}': a coordinator already runs (pid {first.pid})" in out.stderr
        assert Ledger.exists(unique_name) and first.proc.poll() is None
