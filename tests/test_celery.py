"""sharedpool.integrations.celery: a real prefork Celery worker, a real Redis broker, a real PostgreSQL.

The worker runs tests/apps/celery_app.py (tasks that hold a pooled
connection in ``pg_sleep``) with more children than the budget; the cap is
counted on the server, the permits in the semaphore.
"""
from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest

celery = pytest.importorskip("celery")
redis = pytest.importorskip("redis")

from devtools.pgcluster import free_port  # noqa: E402
from sharedpool import channel  # noqa: E402
from sharedpool.coordinator.status import snapshot_dict  # noqa: E402
from sharedpool.ledger import Ledger  # noqa: E402
from sharedpool.names import CONTROL_SOCKET, PoolNames  # noqa: E402
from helpers_procs import PeakSampler, backends, process_gone, sem_free, wait_until  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APPS = os.path.join(ROOT, "tests", "apps")
REDIS_SERVER = shutil.which("redis-server")


@pytest.fixture
def broker(tmp_path):
    """A Redis server of this test's own, on a free loopback port; its URL."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (devtools/system-deps.sh installs it)")
    port = free_port()
    process = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path), "--save", "",
         "--appendonly", "no", "--daemonize", "no", "--logfile", str(tmp_path / "redis.log")],
        stdin=subprocess.DEVNULL, start_new_session=True,
    )
    client = redis.Redis(host="127.0.0.1", port=port)

    def up() -> bool:
        with contextlib.suppress(redis.ConnectionError):
            return client.ping()
        return False

    try:
        assert wait_until(up, 10.0), (tmp_path / "redis.log").read_text()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Worker:
    """``celery -A celery_app worker --pool prefork`` in its own session, logging to a file."""

    def __init__(self, broker: str, dsn: str, name: str, budget: int, concurrency: int, tmp_path,
                 backend: str | None = None, **env: str) -> None:
        self.log_path = tmp_path / "celery.log"
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "celery_app", "worker", "--pool", "prefork",
             "--concurrency", str(concurrency), "--loglevel", "INFO", "-O", "fair", "--hostname", f"{name}@test",
             "--without-heartbeat", "--without-mingle", "--without-gossip"],
            cwd=APPS, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([APPS, ROOT]), "CELERY_BROKER_URL": broker,
                 "CELERY_RESULT_BACKEND": backend or broker, "TEST_DSN": dsn, "SHAREDPOOL_NAME": name,
                 "SHAREDPOOL_POOL_SIZE": str(budget), **env},
        )
        self.client = celery.Celery("celery_app", broker=broker, backend=backend or broker)
        if env.get("CELERY_FS_DIR"):
            folder = env["CELERY_FS_DIR"]
            self.client.conf.broker_transport_options = {"data_folder_in": folder, "data_folder_out": folder,
                                                         "control_folder": folder}

    def hold(self, seconds: float) -> "celery.result.AsyncResult":
        return self.client.send_task("celery_app.hold", args=[seconds])

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> int:
        """Warm shutdown (SIGTERM): running tasks finish, children exit, then the main process."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        finally:
            self.close()

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.client.close()
        self.log.close()


def snapshot_of(name: str) -> dict:
    ledger = Ledger.attach(name)
    try:
        return snapshot_dict(ledger.snapshot())
    finally:
        ledger.close()


def holders(name: str) -> list[dict]:
    return [w for w in snapshot_of(name)["workers"] if w["alive"] and w["in_use"]]


def test_prefork_worker_cap_kill_and_clean_exit(broker, dsn, unique_name, tmp_path, record_property):
    budget = 3
    worker = Worker(broker, dsn, unique_name, budget, concurrency=6, tmp_path=tmp_path)
    try:
        worker.hold(0).get(timeout=60)  # the worker is up, and its coordinator (started in worker_init)
        coordinator = snapshot_of(unique_name)["coordinator"]["pid"]
        assert coordinator, worker.output()

        with PeakSampler(dsn, unique_name) as sampler:
            results = [worker.hold(0.1) for _ in range(40)]
            children = {result.get(timeout=120)[0] for result in results}
            peak = sampler.stop()
        assert 1 <= peak <= budget, f"server peak {peak} over budget {budget}"
        assert len(children) > budget, children  # more children than permits took part

        # three children busy in the server; SIGKILL one: its permit is back at once
        busy = [worker.hold(4) for _ in range(budget)]
        assert wait_until(lambda: len(holders(unique_name)) == budget, 30.0), holders(unique_name)
        victim = holders(unique_name)[0]["pid"]
        assert sem_free(unique_name) == 0
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        assert wait_until(lambda: sem_free(unique_name) == 1, 5.0), sem_free(unique_name)
        back_in = time.monotonic() - killed
        outcomes = []
        for result in busy:
            try:
                outcomes.append(result.get(timeout=60)[0])
            except Exception as exc:  # noqa: BLE001 - the killed child's task is lost
                outcomes.append(type(exc).__name__)
        assert "WorkerLostError" in outcomes, outcomes
        seen = children | {pid for pid in outcomes if isinstance(pid, int)}

        assert worker.stop() == 0, worker.output()
    finally:
        worker.close()
    # no leftovers: children, coordinator, ledger, semaphore and backends all gone
    assert all(process_gone(pid) for pid in seen)
    assert wait_until(lambda: process_gone(coordinator), 15.0), worker.output()
    assert wait_until(lambda: not Ledger.exists(unique_name), 15.0), worker.output()
    assert backends(dsn, unique_name) == 0
    record_property("server_peak", peak)
    record_property("samples", sampler.samples)
    record_property("permit_back_after_kill_ms", round(back_in * 1000))
    assert back_in < 1.0, f"permit back after {back_in:.3f} s"


@pytest.mark.parametrize("transport", ["redis", "filesystem"])
def test_main_process_reports_a_killed_child_at_once(transport, broker, dsn, unique_name, make_ledger, tmp_path,
                                                     record_property):
    """No coordinator: the test listens on its address and receives the main process's exit notice.

    With Redis the worker runs Celery's event loop (AsynPool); the filesystem
    broker has none, so billiard's own pool and supervisor thread reap the child.
    """
    make_ledger(2)
    listener = channel.Inbox(PoolNames(unique_name), CONTROL_SOCKET, None, os.geteuid())  # posing as the coordinator
    env = {"SHAREDPOOL_AUTOSTART": "0"}
    if transport == "filesystem":
        (tmp_path / "queue").mkdir()
        env["CELERY_FS_DIR"] = str(tmp_path / "queue")
    worker = Worker("filesystem://" if transport == "filesystem" else broker, dsn, unique_name, 2, concurrency=2,
                    tmp_path=tmp_path, backend=broker, **env)
    try:
        child, _ = worker.hold(0).get(timeout=60)
        os.kill(child, signal.SIGKILL)
        killed = time.monotonic()
        assert select.select([listener], [], [], 10.0)[0], "no exit notice within 10 s"
        message = listener.receive()[0]
        noticed = time.monotonic() - killed
        assert message == f"exit {child}".encode()
        worker.hold(0).get(timeout=60)  # billiard replaced the child; the pool still serves
        assert worker.stop() == 0, worker.output()
    finally:
        worker.close()
        listener.close()
    record_property("exit_notice_ms", round(noticed * 1000))
