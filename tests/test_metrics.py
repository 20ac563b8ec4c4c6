"""Prometheus exposition of a live ledger."""
from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, generate_latest

from sharedpool.coordinator.metrics import LedgerCollector
from sharedpool.ledger import Ledger
from sharedpool.permits import PermitGate
from helpers_procs import coordinator


def test_scrape_reports_budget_holders_and_counters(unique_name):
    with coordinator(unique_name, 3):
        ledger = Ledger.attach(unique_name)
        gate = PermitGate(ledger)
        gate.register()
        try:
            gate.acquire(1)
            gate.acquire(1)
            registry = CollectorRegistry()
            registry.register(LedgerCollector([ledger]))
            text = generate_latest(registry).decode()
        finally:
            gate.release()
            gate.release()
            gate.deregister()
            ledger.close()
    pool = f'pool="{unique_name}"'
    assert f"sharedpool_budget{{{pool}}} 3.0" in text
    assert f"sharedpool_free_permits{{{pool}}} 1.0" in text
    assert f"sharedpool_held_permits{{{pool}}} 2.0" in text
    assert f"sharedpool_grants_total{{{pool}}} 2.0" in text
    assert f'sharedpool_worker_held_permits{{pid="{os.getpid()}",{pool}}} 2.0' in text


def test_metrics_command_serves_http_until_sigterm(unique_name):
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with coordinator(unique_name, 2):
        server = subprocess.Popen(
            [sys.executable, "-m", "sharedpool.coordinator", "metrics", "--name", unique_name, "--port", str(port)],
            stderr=subprocess.PIPE, text=True,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                        body = response.read().decode()
                    break
                except OSError:
                    assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
                    time.sleep(0.05)
            assert f'sharedpool_budget{{pool="{unique_name}"}} 2.0' in body
        finally:
            server.send_signal(signal.SIGTERM)
            assert server.wait(10) == 0
            server.stderr.close()
