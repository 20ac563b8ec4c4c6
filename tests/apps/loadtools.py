"""Drive HTTP load at a server and watch the database side. Runs in the test process.

- ``Load``: client threads sending requests until told to stop (or a count),
  recording statuses and latencies.
- ``pool_status``: read the ledger without joining the pool.
(``PeakSampler``, ``wait_until`` and ``process_gone`` live in helpers_procs.)
"""
from __future__ import annotations

import collections
import http.client
import os
import signal
import subprocess
import threading
import time

from sharedpool.ledger import Ledger


def get(port: int, path: str, timeout: float = 60.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


def wait_http(port: int, path: str = "/health", timeout: float = 30.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode} before answering")
        try:
            if get(port, path, timeout=2.0)[0] == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"no answer on port {port} within {timeout} s")
        time.sleep(0.05)


class Load:
    """``clients`` threads GETting ``path`` in a loop until ``stop()`` or ``total`` requests."""

    def __init__(self, port: int, path: str, clients: int, total: int | None = None, timeout: float = 60.0) -> None:
        self.port, self.path, self.total, self.timeout = port, path, total, timeout
        self.statuses: collections.Counter = collections.Counter()
        self.errors: list[str] = []
        self.latencies: list[float] = []
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._sent = 0
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    @property
    def done(self) -> int:
        return sum(self.statuses.values())

    def _next(self) -> bool:
        with self._lock:
            if self._stop_event.is_set() or (self.total is not None and self._sent >= self.total):
                return False
            self._sent += 1
            return True

    def _client(self) -> None:
        while self._next():
            started = time.monotonic()
            try:
                status, body = get(self.port, self.path, self.timeout)
            except OSError as exc:
                status, body = 0, f"{type(exc).__name__}: {exc}"
            with self._lock:
                self.statuses[status] += 1
                self.latencies.append(time.monotonic() - started)
                if status != 200 and len(self.errors) < 20:
                    self.errors.append(f"{status} {body[:300]}")

    def start(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def wait_for(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.done < count and time.monotonic() < deadline and any(t.is_alive() for t in self.threads):
            time.sleep(0.01)

    def join(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def summary(self) -> str:
        return f"{self.done} requests, statuses {dict(self.statuses)}, first errors {self.errors[:3]}"


def pool_status(name: str) -> dict:
    """Budget, free permits, held permits and live registered workers, from a ledger snapshot."""
    ledger = Ledger.attach(name)
    try:
        snap = ledger.snapshot()
        return {
            "budget": snap.budget,
            "free": snap.free,
            "held": snap.held,
            "workers": [s.pid for s in snap.slots],
            "coordinator": snap.coordinator_pid,
        }
    finally:
        ledger.close()


def stop_server(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
    """Stop a server we started; SIGKILL its whole group if it does not go in time."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
    return process.returncode
