"""Prometheus exposition of live ledgers: values, bounded labels, and a real scrape across a pool recreation."""
from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sharedpool.coordinator.metrics import LedgerCollector
from helpers_procs import GateWorker, coordinator, run_cli, wait_until


def samples(text: str, pool: str) -> dict[str, float]:
    """The pool's samples by metric name; fails on any label other than ``pool``."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert set(sample.labels) == {"pool"}, sample  # no per-pid label: series stay bounded
            if sample.labels["pool"] == pool:
                found[sample.name] = sample.value
    return found


def test_scrape_reports_budget_holders_waits_and_counters(unique_name):
    registry = CollectorRegistry()
    collector = LedgerCollector([unique_name])
    registry.register(collector)
    try:
        assert samples(generate_latest(registry).decode(), unique_name) == {"sharedpool_up": 0.0}
        with coordinator(unique_name, 2):
            holder, waiter = GateWorker(unique_name), GateWorker(unique_name, timeout=10)
            try:
                holder.do("acquire 2")
                waiter.proc.stdin.write("acquire 1\n")  # blocks: no permit free
                got = wait_until(lambda: (s := samples(generate_latest(registry).decode(), unique_name))
                                 and s["sharedpool_waiting_threads"] == 1 and s["sharedpool_maxwait_seconds"] > 0.05 and s)
                assert got, "the waiter and its wait are not exported"
                assert got["sharedpool_up"] == 1 and got["sharedpool_coordinator_up"] == 1
                assert (got["sharedpool_budget"], got["sharedpool_free_permits"], got["sharedpool_held_permits"]) == (2, 0, 2)
                assert got["sharedpool_processes"] == 2 and got["sharedpool_queued_threads"] == 0
                assert got["sharedpool_grants_total"] == 2
                holder.do("release 1")
                assert waiter.proc.stdout.readline().startswith("ok")
                got = samples(generate_latest(registry).decode(), unique_name)
                assert got["sharedpool_waits_total"] >= 1 and got["sharedpool_wait_seconds_total"] > 0
                assert got["sharedpool_maxwait_seconds"] == 0 and got["sharedpool_waiting_threads"] == 0
            finally:
                holder.exit()
                waiter.exit()
    finally:
        collector.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def exporter(*args: str) -> Iterator[str]:
    """Run ``sharedpool metrics`` on a free loopback port; yield its URL; SIGTERM must end it cleanly."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "sharedpool.coordinator", "metrics", *args, "--port", str(port)],
        stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
                time.sleep(0.05)
        yield url
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(10) == 0
        server.stderr.close()


def scrape(url: str, pool: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return samples(response.read().decode(), pool)


def test_exporter_serves_before_the_pool_exists_and_follows_its_recreation(unique_name):
    with exporter("--name", unique_name) as url:
        assert scrape(url, unique_name) == {"sharedpool_up": 0.0}  # serving, and saying the pool is down
        with coordinator(unique_name, 2):
            worker = GateWorker(unique_name)
            try:
                worker.do("acquire 1")
                first = scrape(url, unique_name)
                assert (first["sharedpool_up"], first["sharedpool_budget"], first["sharedpool_held_permits"]) == (1, 2, 1)
            finally:
                worker.exit()
        assert scrape(url, unique_name)["sharedpool_up"] == 0  # removed on exit: down, not stale
        with coordinator(unique_name, 3):  # a new segment under the same name
            worker = GateWorker(unique_name)
            try:
                worker.do("acquire 2")
                again = scrape(url, unique_name)
                assert (again["sharedpool_up"], again["sharedpool_budget"], again["sharedpool_held_permits"]) == (1, 3, 2)
                assert again["sharedpool_coordinator_heartbeat_age_seconds"] < 5
                assert again["sharedpool_grants_total"] == 2  # the new ledger's counters, not the old one's
            finally:
                worker.exit()


def test_exporter_without_name_reports_every_pool(unique_name):
    with coordinator(unique_name, 2), exporter() as url:
        assert scrape(url, unique_name)["sharedpool_budget"] == 2


def test_default_port_is_not_postgres_exporters():
    out = run_cli("metrics", "--help")
    assert "(default: 10187)" in out.stdout
