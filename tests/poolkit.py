"""Test helpers for pools: a coordinator per test, worker subprocesses, a server-side sampler."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import psycopg2

from sharedpool.ledger import Ledger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def coordinator(name: str, budget: int, *extra: str) -> Iterator[subprocess.Popen]:
    """Run a real coordinator for the test; SIGTERM it and remove its IPC objects after."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sharedpool.coordinator", "coordinator", "--name", name,
         "--budget", str(budget), "--remove-on-exit", *extra],
        stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 10
    while not Ledger.exists(name):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "coordinator did not create its ledger"
        time.sleep(0.01)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()
        subprocess.run([sys.executable, "-m", "sharedpool.coordinator", "cleanup", "--name", name, "--force"],
                       capture_output=True)


def start_worker(code: str, **env: str) -> subprocess.Popen:
    """Start a separate interpreter running ``code``; it talks through stdin/stdout lines."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
        env={**os.environ, "PYTHONPATH": ROOT, **env}, cwd=ROOT,
    )


def read_line(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    """Read one stdout line, failing with the worker's stderr if it dies or stalls."""
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not result or not result[0]:
        proc.kill()
        raise AssertionError(f"worker {proc.pid} said nothing: {proc.stderr.read()[-3000:]}")
    return result[0].strip()


def finish(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    """Close stdin (the worker's cue to exit) and return its remaining output."""
    out, err = proc.communicate("", timeout=timeout)
    assert proc.returncode == 0, f"worker {proc.pid} exited {proc.returncode}: {err[-3000:]}"
    return out


class ServerSampler:
    """Count this pool's backends in pg_stat_activity every ``interval`` seconds; keep the peak."""

    def __init__(self, dsn: str, name: str, interval: float = 0.01) -> None:
        self.dsn, self.pattern, self.interval = dsn, f"sharedpool/{name}", interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn = psycopg2.connect(self.dsn, application_name="sampler")
        conn.autocommit = True  # each count is its own transaction: a fresh activity snapshot
        with conn.cursor() as cur:
            while not self._stop.is_set():
                cur.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (self.pattern,)
                )
                self.peak = max(self.peak, cur.fetchone()[0])
                self.samples += 1
                self._started.set()
                self._stop.wait(self.interval)
        conn.close()

    def __enter__(self) -> "ServerSampler":
        self._thread.start()
        assert self._started.wait(10), "sampler could not query the server"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def backends(dsn: str, name: str) -> int:
    with contextlib.closing(psycopg2.connect(dsn, application_name="probe")) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (f"sharedpool/{name}",))
        return cur.fetchone()[0]


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
