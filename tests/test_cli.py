"""The ``sharedpool`` command: status, reload, cleanup, and refusing bad input clearly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from sharedpool.ledger import Ledger
from sharedpool.names import PoolNames

from helpers_procs import (
    PYTHON,
    CoordinatorProc,
    GateWorker,
    coordinator,
    read_line,
    remove_pool_objects,
    run_cli,
    sem_free,
    wait_until,
)


def test_status_json_fields(unique_name):
    with coordinator(unique_name, 3) as coord:
        worker = GateWorker(unique_name)
        try:
            worker.do("acquire 2")
            out = run_cli("status", "--name", unique_name, "--json")
            assert out.returncode == 0, out.stderr
            status = json.loads(out.stdout)
            assert set(status) == {"name", "budget", "free", "held", "waiting", "epoch", "coordinator", "counters",
                                   "mean_wait_ms", "rates", "workers", "idle", "in_use", "processes", "waiting_local", "maxwait_s"}
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
        remove_pool_objects(unique_name)


def test_status_of_missing_pool(unique_name):
    out = run_cli("status", "--name", unique_name)
    assert out.returncode == 1
    assert f"sharedpool status: pool '{unique_name}': no pool directory /dev/shm/sharedpool.{unique_name}.d" in out.stderr
    assert "Traceback" not in out.stderr


def test_cleanup_refuses_while_a_coordinator_runs(unique_name):
    with coordinator(unique_name, 2, remove_on_exit=False) as coord:
        for args in ([], ["--force"]):
            out = run_cli("cleanup", "--name", unique_name, *args)
            assert out.returncode == 1, out.stdout
            assert f"pool '{unique_name}': a coordinator (pid {coord.pid}) runs; stop it first" in out.stderr
            assert Ledger.exists(unique_name) and "Traceback" not in out.stderr
        coord.stop()
        out = run_cli("cleanup", "--name", unique_name)
        assert out.returncode == 0, out.stderr
        assert f"removed {PoolNames(unique_name).directory}" in out.stdout and "removed /dev/shm/sem.sharedpool." in out.stdout
        assert not os.path.exists(PoolNames(unique_name).directory) and not PoolNames(unique_name).stray_semaphores()
    assert "nothing to remove" in run_cli("cleanup", "--name", unique_name).stdout


def test_cleanup_refuses_live_workers_and_force_says_what_it_breaks(unique_name):
    with coordinator(unique_name, 2, remove_on_exit=False) as coord:
        worker = GateWorker(unique_name)
        try:
            worker.do("acquire 1")
            coord.stop()
            out = run_cli("cleanup", "--name", unique_name)
            assert out.returncode == 1
            assert f"pool '{unique_name}': live worker(s) use it (pids {worker.pid}); stop them first, or use --force" in out.stderr
            assert Ledger.exists(unique_name)
            out = run_cli("cleanup", "--name", unique_name, "--force")
            assert out.returncode == 0, out.stderr
            assert f"removed while live worker(s) (pids {worker.pid}) still use it: they keep their connections outside any budget" in out.stderr
            assert not Ledger.exists(unique_name)
        finally:
            worker.kill()


def test_cleanup_removes_a_corrupt_ledger(unique_name):
    names = PoolNames(unique_name)
    os.makedirs(names.directory, mode=0o700)
    with open(names.path("ledger"), "wb") as f:
        f.write(b"garbage" * 10)
    out = run_cli("cleanup", "--name", unique_name)  # corrupt and unused: removing it is the point
    assert out.returncode == 0 and "removed" in out.stdout, out.stderr
    assert not os.path.exists(names.directory)


def test_killed_restarted_coordinators_and_forced_cleanups_never_make_two_budgets(unique_name):
    """Interleave SIGKILLed and restarted coordinators with `cleanup --force`: one budget at any time."""
    import random

    names = PoolNames(unique_name)
    rng = random.Random(7)
    running: list[CoordinatorProc] = []
    try:
        for _ in range(16):
            step = rng.choice(["start", "start", "kill", "cleanup"])
            if step == "start":
                proc = CoordinatorProc(unique_name, 2, remove_on_exit=False, wait=False)
                running.append(proc)
                wait_until(lambda: proc.proc.poll() is not None or "ready, budget" in proc.log(), 10.0)
            elif step == "kill" and running:
                running.pop(0).stop(signal.SIGKILL)
            elif step == "cleanup":
                run_cli("cleanup", "--name", unique_name, "--force")
            running = [p for p in running if p.proc.poll() is None]
            assert len(running) <= 1, "two coordinators run for one pool"
            semaphores = names.stray_semaphores()
            assert len(semaphores) <= 1, f"two semaphores for one pool: {semaphores}"
            if running:
                ledger = Ledger.attach(unique_name)
                try:
                    assert semaphores == [names.semaphore_path(ledger.token)]
                    assert ledger.header.coordinator_pid == running[0].pid and ledger.sem.value == 2
                finally:
                    ledger.close()
    finally:
        for proc in running:
            proc.close()
        remove_pool_objects(unique_name)


def test_reload_raises_at_once_and_a_cut_converges(unique_name):
    with coordinator(unique_name, 3) as coord:
        holder = GateWorker(unique_name, timeout=0.2)
        try:
            holder.do("acquire 3")
            out = run_cli("reload", "--name", unique_name, "--budget", "5")
            assert out.returncode == 0 and f"pool '{unique_name}': budget 5" in out.stdout, out.stderr
            assert sem_free(unique_name) == 2
            holder.do("acquire 2")  # the new permits are usable at once
            # cut to 2 while 5 are held: nothing is taken away, returning permits retire first
            waiter = GateWorker(unique_name, timeout=5.0)
            waiter.proc.stdin.write("acquire 1\n")
            waiter.proc.stdin.flush()
            reload = subprocess.Popen([PYTHON, "-m", "sharedpool.coordinator", "reload", "--name", unique_name,
                                       "--budget", "2", "--wait", "20"], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
            ledger = Ledger.attach(unique_name)
            try:
                assert wait_until(lambda: ledger.header.budget == 2, 5.0)
                assert ledger.header.physical == 5 and ledger.header.retire_debt == 3
                holder.do("release 3")  # all three retire, none reaches the waiter
                assert wait_until(lambda: ledger.header.physical == 2, 2.0), "retirement of returned permits"
                assert ledger.sem.value == 0 and waiter.proc.poll() is None
                out, err = reload.communicate(timeout=10)
                assert reload.returncode == 0 and "budget 2 (within it after" in out, err
                holder.do("release 1")
                assert read_line(waiter.proc, 5.0).startswith("ok")  # now the waiter is served
                assert ledger.header.physical == 2 and ledger.header.reloads == 2
            finally:
                ledger.close()
                waiter.exit()
        finally:
            holder.exit()
        assert sem_free(unique_name) == 2
        assert "budget 3 -> 5" in coord.log() and "budget 5 -> 2" in coord.log()


def test_reload_that_cannot_converge_names_the_holders(unique_name):
    with coordinator(unique_name, 3):
        holder = GateWorker(unique_name)
        try:
            holder.do("acquire 3")
            out = run_cli("reload", "--name", unique_name, "--budget", "1", "--wait", "1")
            assert out.returncode == 1
            assert f"budget 1 applied, but 2 permit(s) above it are still held after 1 s: pid {holder.pid} held 3" in out.stderr
        finally:
            holder.exit()


def test_reload_without_coordinator(unique_name):
    coord = CoordinatorProc(unique_name, 2, remove_on_exit=False)
    try:
        coord.stop(signal.SIGKILL)
        out = run_cli("reload", "--name", unique_name, "--budget", "4")
        assert out.returncode == 1
        assert f"no coordinator is running for pool '{unique_name}'" in out.stderr
    finally:
        coord.close()
        remove_pool_objects(unique_name)


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


def test_coordinator_refuses_corrupt_ledger_naming_it(unique_name):
    names = PoolNames(unique_name)
    os.makedirs(names.directory, mode=0o700)
    fd = os.open(names.path("ledger"), os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"NOTALEDGER" * 100)
    os.close(fd)
    try:
        out = run_cli("coordinator", "--name", unique_name, "--budget", "2")
        assert out.returncode == 1
        assert f"sharedpool coordinator: pool '{unique_name}': {names.path('ledger')} is not a sharedpool ledger" in out.stderr
        assert f"remove it with `sharedpool cleanup --name {unique_name}`" in out.stderr
        assert "Traceback" not in out.stderr
    finally:
        remove_pool_objects(unique_name)


def test_second_coordinator_is_refused(unique_name):
    with coordinator(unique_name, 2) as first:
        out = run_cli("coordinator", "--name", unique_name, "--budget", "2")
        assert out.returncode == 1
        assert f"pool '{unique_name}': a coordinator already runs (pid {first.pid})" in out.stderr
        assert Ledger.exists(unique_name) and first.proc.poll() is None
