"""gunicorn with sharedpool's hooks (-c python:sharedpool.integrations.gunicorn), real processes.

Each test starts gunicorn on a free port with more workers than the budget,
drives HTTP load at ``/sleep`` (a ``pg_sleep`` in a pooled connection), and
samples pg_stat_activity every 10 ms: the server-side peak must stay within
the budget. When gunicorn stops, its embedded coordinator must stop too and
leave no IPC object in /dev/shm.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from apps.loadtools import Load, pool_status, stop_server, wait_http
from devtools.pgcluster import free_port
from helpers_procs import PeakSampler, process_gone, wait_until
from sharedpool.ledger import Ledger

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APPS = os.path.join(ROOT, "tests", "apps")
GUNICORN = [sys.executable, "-m", "gunicorn"]
# gunicorn >= 24 opens a control socket at one fixed path per user: keep parallel arbiters apart
NO_CONTROL_SOCKET = ["--no-control-socket"] if "control_socket_disable" in {
    setting.name for setting in __import__("gunicorn.config").config.KNOWN_SETTINGS} else []


def ipc_objects(name: str) -> list[str]:
    return sorted(e for e in os.listdir("/dev/shm") if f"sharedpool.{name}" in e)


class Server:
    """One gunicorn arbiter for one test."""

    def __init__(self, dsn, name, budget, *args, config="python:sharedpool.integrations.gunicorn", env=None, tmp_path=None):
        self.name, self.budget = name, budget
        self.port = free_port()
        self.log_path = os.path.join(tmp_path, "gunicorn.log")
        environment = {
            **os.environ,
            "TEST_DSN": dsn,
            "SHAREDPOOL_NAME": name,
            "SHAREDPOOL_POOL_SIZE": str(budget),
            "SHAREDPOOL_TIMEOUT": "30",
            "PYTHONPATH": os.pathsep.join(filter(None, [APPS, ROOT, os.environ.get("PYTHONPATH")])),
            **(env or {}),
        }
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [*GUNICORN, "-c", config, "--bind", f"127.0.0.1:{self.port}", *NO_CONTROL_SOCKET,
             "--graceful-timeout", "10", "--timeout", "60", *args, "pool_app:application"],
            cwd=APPS, env=environment, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            wait_http(self.port, process=self.process)
        except AssertionError:
            self.stop()
            raise AssertionError(self.log_text())

    def log_text(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-6000:]

    def coordinator_pid(self) -> int:
        return pool_status(self.name)["coordinator"]

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout
        coordinator = self.coordinator_pid() if Ledger.exists(self.name) else 0
        return [int(p) for p in out.split() if int(p) != coordinator]

    def stop(self) -> None:
        stop_server(self.process)
        self.log.close()


@pytest.fixture
def server(dsn, unique_name, tmp_path, request):
    """Start gunicorn: ``server(budget, *gunicorn_args, env=..., config=...)``; stopped and checked at the end."""
    started: list[Server] = []

    def start(budget, *args, **kwargs):
        s = Server(dsn, unique_name, budget, *args, tmp_path=str(tmp_path), **kwargs)
        started.append(s)
        return s

    yield start
    for s in started:
        coordinator = s.coordinator_pid() if Ledger.exists(s.name) else None
        s.stop()
        leftovers = wait_until(lambda: not ipc_objects(s.name), timeout=10) or ipc_objects(s.name)
        assert leftovers is True, f"IPC objects left after gunicorn stopped: {leftovers}\n{s.log_text()}"
        if coordinator:
            assert wait_until(lambda: process_gone(coordinator), timeout=5), "coordinator still runs"


def record(request, peak, budget):
    print(f"\n{request.node.name}: server-side peak {peak} connections, budget {budget}")


def run_load(dsn, server, clients, total, path="/sleep?ms=20"):
    with PeakSampler(dsn, server.name) as sampler:
        load = Load(server.port, path, clients, total=total).start()
        load.join()
        peak = sampler.stop()
    return load, peak, sampler


def test_sync_workers_stay_within_budget(dsn, server, request):
    s = server(3, "--workers", "6")
    load, peak, sampler = run_load(dsn, s, clients=18, total=300)
    assert load.statuses == {200: 300}, load.summary()
    assert sampler.samples > 10
    assert 1 <= peak <= 3, f"peak {peak} > budget 3"
    record(request, peak, 3)


def test_gthread_workers_stay_within_budget(dsn, server, request):
    s = server(4, "--workers", "4", "--threads", "4", "--worker-class", "gthread")
    load, peak, _ = run_load(dsn, s, clients=24, total=400)
    assert load.statuses == {200: 400}, load.summary()
    assert 1 <= peak <= 4, f"peak {peak} > budget 4"
    record(request, peak, 4)


def test_gevent_workers_stay_within_budget(dsn, server, request):
    s = server(3, "--workers", "2", "--worker-class", "gevent")
    load, peak, _ = run_load(dsn, s, clients=20, total=300)
    assert load.statuses == {200: 300}, load.summary()
    assert 1 <= peak <= 3, f"peak {peak} > budget 3"
    record(request, peak, 3)


def _worker_in_query(name: str, dsn: str, marker: str) -> tuple[int, int]:
    """Find (worker pid, backend pid) of the request running ``marker``'s pg_sleep."""
    import psycopg2

    conn = psycopg2.connect(dsn, application_name="test-probe")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pid FROM pg_stat_activity WHERE query LIKE %s AND pid <> pg_backend_pid()",
                        (f"%pg_sleep({marker})%",))
            row = cur.fetchone()
    finally:
        conn.close()
    if row is None:
        return 0, 0
    backend = row[0]
    ledger = Ledger.attach(name)
    try:
        for slot in ledger.snapshot().slots:
            if backend in slot.backends:
                return slot.pid, backend
    finally:
        ledger.close()
    return 0, backend


@pytest.mark.timing
def test_sigkill_worker_mid_request_returns_its_permits(dsn, server, request):
    s = server(2, "--workers", "4")
    with PeakSampler(dsn, s.name) as sampler:
        load = Load(s.port, "/sleep?ms=20", clients=6).start()
        load.wait_for(40)
        long_request = Load(s.port, "/sleep?ms=7777", clients=1, total=1).start()
        found = wait_until(lambda: _worker_in_query(s.name, dsn, "7.777")[0], timeout=30)
        assert found, "the long request never reached the database"
        victim = found
        ledger = Ledger.attach(s.name)
        try:
            held_before = next(w.held for w in ledger.snapshot().slots if w.pid == victim)
        finally:
            ledger.close()
        assert held_before >= 1
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        gone = wait_until(lambda: victim not in pool_status(s.name)["workers"], timeout=5, interval=0.005)
        reclaim_s = time.monotonic() - killed_at
        assert gone, "the killed worker's slot was not reclaimed within 5 s"
        done_at_kill = load.done
        load.wait_for(done_at_kill + 100)
        load.stop()
        long_request.join()
        peak = sampler.stop()
    print(f"\nreclaimed the permits of SIGKILLed worker {victim} after {reclaim_s * 1000:.0f} ms")
    assert reclaim_s < 1.0, f"permits came back after {reclaim_s:.2f} s"
    assert load.statuses[200] >= done_at_kill + 100 and set(load.statuses) == {200}, load.summary()
    assert long_request.statuses[200] == 0  # it died with its worker
    assert peak <= 2, f"peak {peak} > budget 2"
    record(request, peak, 2)


def test_max_requests_churn_hup_and_ttin_ttou_leak_nothing(dsn, server, request):
    budget = 2
    s = server(budget, "--workers", "4", "--max-requests", "20", "--max-requests-jitter", "5",
               env={"SHAREDPOOL_MAX_IDLE": "0.5"})
    with PeakSampler(dsn, s.name) as sampler:
        load = Load(s.port, "/sleep?ms=5", clients=8, total=600).start()
        load.wait_for(150)
        s.process.send_signal(signal.SIGHUP)
        load.wait_for(300)
        s.process.send_signal(signal.SIGTTIN)
        s.process.send_signal(signal.SIGTTIN)
        load.wait_for(450)
        s.process.send_signal(signal.SIGTTOU)
        load.join()
        peak = sampler.stop()
    assert load.statuses == {200: 600}, load.summary()
    assert 1 <= peak <= budget, f"peak {peak} > budget {budget}"
    # idle: every connection expired (MAX_IDLE 0.5 s), every permit back, nothing leaked
    status = wait_until(lambda: (st := pool_status(s.name))["free"] == budget and st, timeout=15)
    assert status, f"permits not all free when idle: {pool_status(s.name)}"
    assert status["held"] == 0
    assert wait_until(lambda: sampler_count(dsn, s.name) == 0, timeout=5)
    record(request, peak, budget)


def sampler_count(dsn, name):
    sampler = PeakSampler(dsn, name)
    try:
        return sampler.count()
    finally:
        sampler.conn.close()


def test_preload_app_that_used_the_database_before_fork(dsn, server, request, tmp_path):
    result = tmp_path / "parent-check"
    s = server(3, "--workers", "4", config=os.path.join(APPS, "gunicorn_preload_conf.py"),
               env={"TEST_TOUCH_DB_AT_IMPORT": "1", "TEST_RESULT_FILE": str(result)})
    load, peak, _ = run_load(dsn, s, clients=12, total=200)
    assert load.statuses == {200: 200}, load.summary()
    assert peak <= 3, f"peak {peak} > budget 3"
    arbiter = s.process.pid
    assert arbiter in pool_status(s.name)["workers"]  # the arbiter still holds its checked-out connection
    s.stop()
    assert result.read_text() == "ok", s.log_text()
    record(request, peak, 3)


def test_embedded_coordinator_follows_a_sigkilled_arbiter(dsn, server, request):
    s = server(2, "--workers", "3", "--timeout", "4")  # sync workers check their parent every timeout/2
    load, peak, _ = run_load(dsn, s, clients=6, total=60)
    assert load.statuses == {200: 60}
    coordinator = s.coordinator_pid()
    workers = s.worker_pids()
    os.kill(s.process.pid, signal.SIGKILL)
    s.process.wait()
    # the workers notice their parent changed, exit; the coordinator then exits and cleans up
    assert wait_until(lambda: process_gone(coordinator), timeout=20), "coordinator still runs"
    assert not ipc_objects(s.name)
    for pid in workers:
        assert wait_until(lambda: process_gone(pid), timeout=10)
    assert peak <= 2
    record(request, peak, 2)


def _opened_under_load(dsn, server, config, budget=4, total=800):
    s = server(budget, "--workers", "8", config=config)
    with PeakSampler(dsn, s.name, interval=0.005) as sampler:
        load = Load(s.port, "/sleep?ms=2", clients=16, total=total).start()
        load.join()
        peak = sampler.stop()
    s.stop()
    assert wait_until(lambda: not ipc_objects(s.name), timeout=20), "the first server's pool is still there"
    return load, peak, len(sampler.seen)


def test_work_follows_connections_without_churn(dsn, server, request, tmp_path):
    """8 sync workers on a budget of 4: the workers holding connections serve the queue.

    With deferral off, requests keep landing in workers without a connection,
    and each one moves a permit: a backend closed, another opened.
    """
    off = tmp_path / "gunicorn_no_follow.py"
    off.write_text(
        "from sharedpool.integrations.gunicorn import on_starting, post_fork, child_exit, worker_exit, on_exit\n"
        "from sharedpool.integrations.gunicorn import follow_connections\n"
        "follow_connections(False)\n"
    )
    load_on, peak_on, opened_on = _opened_under_load(dsn, server, "python:sharedpool.integrations.gunicorn")
    load_off, peak_off, opened_off = _opened_under_load(dsn, server, str(off))
    print(f"\n{request.node.name}: backends opened with deferral {opened_on}, without {opened_off}; "
          f"peaks {peak_on} / {peak_off} (budget 4)")
    assert load_on.statuses == {200: 800}, load_on.summary()
    assert load_off.statuses == {200: 800}, load_off.summary()
    assert peak_on <= 4 and peak_off <= 4
    assert opened_on <= 8, f"{opened_on} backends opened for 800 requests with 4 permits"
    assert opened_on < opened_off
