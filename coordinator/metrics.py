"""Expose pools' ledgers to Prometheus (the optional ``metrics`` extra).

Runs in its own process (``sharedpool metrics``), never in the coordinator.
Every scrape reads one snapshot per pool, re-attaching a pool that was
recreated since the last scrape; a pool that does not exist (yet) is
reported with ``sharedpool_up 0``. Labels are bounded: ``pool`` only.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sharedpool.errors import SharedPoolError

from .status import Follower, pool_names, snapshot_dict

GAUGES = {  # snapshot_dict key: (metric name, help)
    "budget": ("sharedpool_budget", "Permits (server connections) allowed on this host"),
    "free": ("sharedpool_free_permits", "Permits free right now"),
    "held": ("sharedpool_held_permits", "Permits held by worker processes"),
    "idle": ("sharedpool_idle_connections", "Server connections idle in a worker's pool"),
    "in_use": ("sharedpool_in_use_connections", "Server connections checked out by application code"),
    "processes": ("sharedpool_processes", "Live worker processes registered in the ledger"),
    "waiting": ("sharedpool_waiting_threads", "Threads waiting for a permit (across processes)"),
    "waiting_local": ("sharedpool_queued_threads", "Threads queued inside their process (MAX_PER_PROCESS or behind its permit waiter)"),
    "maxwait_s": ("sharedpool_maxwait_seconds", "Age of the oldest current permit wait"),
}
COUNTERS = {  # counter key: (metric name without _total, help)
    "grants": ("sharedpool_grants", "Permits granted"),
    "releases": ("sharedpool_releases", "Permits given back"),
    "timeouts": ("sharedpool_timeouts", "Checkouts that timed out waiting for a permit"),
    "waits": ("sharedpool_waits", "Checkouts that had to wait for a permit"),
    "sheds": ("sharedpool_sheds", "Connections closed to hand their permit to a waiting worker"),
    "opened": ("sharedpool_connections_opened", "Server connections opened (churn)"),
    "closed": ("sharedpool_connections_closed", "Server connections closed"),
    "reclaimed_permits": ("sharedpool_reclaimed_permits", "Permits returned from dead workers"),
    "reclaimed_workers": ("sharedpool_reclaimed_workers", "Dead workers whose permits were returned"),
    "audit_fixes": ("sharedpool_audit_fixes", "Leaked permits returned by the audit"),
}


class LedgerCollector(Collector):
    """Turn each scrape into gauges and counters labelled by pool.

    ``names`` None: every pool on the host at the time of the scrape.
    """

    def __init__(self, names: list[str] | None = None, group: str | None = None) -> None:
        self.names = names
        self._follower = Follower(group)
        self._lock = threading.Lock()  # the HTTP server answers scrapes in threads

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        up = GaugeMetricFamily("sharedpool_up", "1 if the pool's ledger could be read, 0 if it is absent or unreadable", labels=["pool"])
        coordinator_up = GaugeMetricFamily("sharedpool_coordinator_up", "1 if the pool's coordinator runs", labels=["pool"])
        heartbeat = GaugeMetricFamily("sharedpool_coordinator_heartbeat_age_seconds", "Seconds since the coordinator's last heartbeat", labels=["pool"])
        gauges = {key: GaugeMetricFamily(name, text, labels=["pool"]) for key, (name, text) in GAUGES.items()}
        counters = {key: CounterMetricFamily(name, text, labels=["pool"]) for key, (name, text) in COUNTERS.items()}
        wait_seconds = CounterMetricFamily("sharedpool_wait_seconds", "Seconds checkouts spent waiting for a permit", labels=["pool"])
        with self._lock:
            for pool, status in self._read():
                up.add_metric([pool], 0 if status is None else 1)
                if status is None:
                    continue
                for key, family in gauges.items():
                    family.add_metric([pool], status[key])
                coordinator_up.add_metric([pool], 1 if status["coordinator"]["alive"] else 0)
                age = status["coordinator"]["heartbeat_age_s"]
                heartbeat.add_metric([pool], age if age is not None else float("nan"))
                for key, family in counters.items():
                    family.add_metric([pool], status["counters"][key])
                wait_seconds.add_metric([pool], status["counters"]["wait_ms"] / 1000.0)
        yield up
        yield coordinator_up
        yield heartbeat
        yield from gauges.values()
        yield from counters.values()
        yield wait_seconds

    def _read(self) -> Iterator[tuple[str, dict | None]]:
        names = self.names if self.names is not None else pool_names()
        for gone in set(self._follower.ledgers) - set(names):
            self._follower.drop(gone)
        for pool in names:
            try:
                ledger, _ = self._follower.get(pool)
                yield pool, snapshot_dict(ledger.snapshot())
            except SharedPoolError:
                self._follower.drop(pool)
                yield pool, None

    def close(self) -> None:
        with self._lock:
            self._follower.close()
