"""Expose a pool's ledger to Prometheus (the optional ``metrics`` extra).

Runs in its own process (``sharedpool metrics``), never in the coordinator;
every scrape reads one consistent ledger snapshot, nothing is kept in between.
"""
from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sharedpool.ledger import Ledger

from .status import snapshot_dict

COUNTERS = {
    "grants": "Permits granted",
    "releases": "Permits given back",
    "timeouts": "Checkouts that timed out waiting for a permit",
    "waits": "Checkouts that had to wait for a permit",
    "sheds": "Connections closed to hand their permit to a waiting worker",
    "opened": "Server connections opened",
    "closed": "Server connections closed",
    "reclaimed_permits": "Permits returned from dead workers",
    "reclaimed_workers": "Dead workers whose permits were returned",
    "audit_fixes": "Leaked permits returned by the audit",
}


class LedgerCollector(Collector):
    """Turn each scrape into gauges and counters labelled by pool (and worker pid)."""

    def __init__(self, ledgers: list[Ledger]) -> None:
        self.ledgers = ledgers

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        gauges = {
            "budget": GaugeMetricFamily("sharedpool_budget", "Permits (server connections) allowed per host", labels=["pool"]),
            "free": GaugeMetricFamily("sharedpool_free_permits", "Permits free right now", labels=["pool"]),
            "held": GaugeMetricFamily("sharedpool_held_permits", "Permits held by workers", labels=["pool"]),
            "waiting": GaugeMetricFamily("sharedpool_waiting_threads", "Threads waiting for a permit", labels=["pool"]),
            "heartbeat": GaugeMetricFamily("sharedpool_coordinator_heartbeat_age_seconds", "Seconds since the coordinator's last heartbeat", labels=["pool"]),
        }
        worker_held = GaugeMetricFamily("sharedpool_worker_held_permits", "Permits held per worker", labels=["pool", "pid"])
        worker_idle = GaugeMetricFamily("sharedpool_worker_idle_connections", "Idle connections per worker", labels=["pool", "pid"])
        counters = {
            key: CounterMetricFamily(f"sharedpool_{key}", help_text, labels=["pool"]) for key, help_text in COUNTERS.items()
        }
        for ledger in self.ledgers:
            status = snapshot_dict(ledger.snapshot())
            pool = status["name"]
            for key in ("budget", "free", "held", "waiting"):
                gauges[key].add_metric([pool], status[key])
            age = status["coordinator"]["heartbeat_age_s"]
            gauges["heartbeat"].add_metric([pool], age if age is not None else float("nan"))
            for key, family in counters.items():
                family.add_metric([pool], status["counters"][key])
            for worker in status["workers"]:
                worker_held.add_metric([pool, str(worker["pid"])], worker["held"])
                worker_idle.add_metric([pool, str(worker["pid"])], worker["idle"])
        yield from gauges.values()
        yield worker_held
        yield worker_idle
        yield from counters.values()
