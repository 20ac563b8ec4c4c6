"""Render ledger snapshots for people (tables) and programs (JSON); join them with the server's view.

Runs in the ``sharedpool status`` and ``sharedpool metrics`` processes, never
in a worker. Everything here reads snapshots; nothing writes to a ledger.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from sharedpool.errors import SharedPoolError
from sharedpool.ledger import Ledger, Snapshot, SlotView
from sharedpool.names import pool_names_on_host

RATED = ("opened", "grants", "sheds", "waits", "timeouts")


def pool_names() -> list[str]:
    """Name every pool that has a ledger on this host."""
    return [name for name in pool_names_on_host() if Ledger.exists(name)]


class Follower:
    """Keep one attached Ledger per pool name, re-attached when its pool is recreated.

    A pool recreated under the same name (a restart after ``--remove-on-exit``)
    is a new segment: the old mapping would keep showing the dead one.
    """

    def __init__(self, group: str | None = None) -> None:
        self.group = group
        self.ledgers: dict[str, Ledger] = {}

    def get(self, name: str) -> tuple[Ledger, bool]:
        """Return the pool's current ledger and whether it is the one returned last time.

        Raises SharedPoolError (LedgerError) while the pool does not exist or cannot be read.
        """
        ledger = self.ledgers.get(name)
        if ledger is not None and ledger.is_current():
            return ledger, True
        self.drop(name)
        ledger = self.ledgers[name] = Ledger.attach(name, group=self.group, mapped=False)
        return ledger, False

    def drop(self, name: str) -> None:
        ledger = self.ledgers.pop(name, None)
        if ledger is not None:
            ledger.close()

    def close(self) -> None:
        for name in list(self.ledgers):
            self.drop(name)


def local_waiting(slot: SlotView) -> int:
    """Threads of the slot's process queued inside it (on MAX_PER_PROCESS or behind its permit waiter)."""
    return slot.local_waiting


def in_use(slot: SlotView) -> int:
    """Connections of the slot checked out by application code.

    The worker counts a checkout in ``in_use`` as soon as it reserves a
    connection, before it holds a permit; only permits held and not idle are
    open connections in use.
    """
    return max(0, min(slot.in_use, slot.held - slot.idle))


def max_wait(snap: Snapshot, now: float) -> float:
    """Seconds the longest current permit wait has lasted (PgBouncer's maxwait), 0 if none."""
    return max((now - s.wait_since for s in snap.slots if s.waiting and s.wait_since), default=0.0)


def snapshot_dict(
    snap: Snapshot, now: float | None = None, previous: Snapshot | None = None, elapsed: float = 0.0
) -> dict[str, Any]:
    """Describe a snapshot; with an earlier one of the same ledger, add per-second rates (churn is ``opened``)."""
    now = time.time() if now is None else now
    before = {s.pid: s.counters for s in previous.slots} if previous is not None and elapsed > 0 else None
    coordinator_alive = snap.coordinator_alive
    workers = []
    for s in snap.slots:
        workers.append(
            {
                "pid": s.pid,
                "alive": s.alive,
                "held": s.held,
                "idle": s.idle,
                "in_use": in_use(s),
                "waiting": s.waiting,
                "waiting_local": local_waiting(s),
                "wait_s": round(now - s.wait_since, 3) if s.waiting and s.wait_since else 0.0,
                "inflight": s.inflight,
                "opened": s.counters["opened"],
                "sheds": s.counters["sheds"],
                "timeouts": s.counters["timeouts"],
                "backends": list(s.backends),
            }
        )
        if before is not None:
            earlier = before.get(s.pid, {})
            workers[-1]["opened_per_s"] = round((s.counters["opened"] - earlier.get("opened", 0)) / elapsed, 2)
    return {
        "name": snap.name,
        "budget": snap.budget,
        "free": snap.free,
        "held": snap.held,
        "idle": sum(s.idle for s in snap.slots),
        "in_use": sum(w["in_use"] for w in workers),
        "processes": sum(w["alive"] for w in workers),
        "waiting": snap.waiting,
        "waiting_local": sum(w["waiting_local"] for w in workers),
        "maxwait_s": round(max_wait(snap, now), 3),
        "epoch": snap.epoch,
        "coordinator": {
            "pid": snap.coordinator_pid or None,
            "alive": coordinator_alive,
            "heartbeat_age_s": round(now - snap.heartbeat, 3) if snap.heartbeat else None,
        },
        "counters": {
            **{k: round(v, 3) if isinstance(v, float) else v for k, v in snap.totals.items()},
            "reclaimed_permits": snap.reclaimed_permits,
            "reclaimed_workers": snap.reclaimed_workers,
            "audit_fixes": snap.audit_fixes,
            "reloads": snap.reloads,
        },
        "mean_wait_ms": round(snap.totals["wait_ms"] / snap.totals["waits"], 1) if snap.totals["waits"] else 0.0,
        "rates": _rates(snap, previous, elapsed) if before is not None else None,
        "workers": workers,
    }


def _rates(snap: Snapshot, previous: Snapshot, elapsed: float) -> dict[str, float]:
    rates = {f"{key}_per_s": round((snap.totals[key] - previous.totals[key]) / elapsed, 2) for key in RATED}
    rates["window_s"] = round(elapsed, 3)
    return rates


def _coordinator_text(status: dict[str, Any]) -> str:
    coord = status["coordinator"]
    if coord["alive"]:
        return f"pid {coord['pid']}, heartbeat {coord['heartbeat_age_s']:.1f} s ago"
    return "NOT RUNNING (cap holds; dead workers are reclaimed when one starts)"


def format_table(status: dict[str, Any]) -> str:
    """One pool in detail: totals, coordinator, counters, rates, one row per worker process."""
    c = status["counters"]
    lines = [
        f"pool {status['name']!r}: budget {status['budget']}, free {status['free']}, "
        f"held {status['held']} (idle {status['idle']}, in use {status['in_use']}), "
        f"processes {status['processes']}, waiting {status['waiting']} across processes "
        f"+ {status['waiting_local']} inside, maxwait {status['maxwait_s']:.2f} s, epoch {status['epoch']}",
        f"coordinator: {_coordinator_text(status)}",
        f"counters: grants {c['grants']}, releases {c['releases']}, timeouts {c['timeouts']}, "
        f"waits {c['waits']} ({c['wait_ms']:.0f} ms), opened {c['opened']}, closed {c['closed']}, "
        f"sheds {c['sheds']}, reclaimed {c['reclaimed_permits']} from {c['reclaimed_workers']} workers, "
        f"audit fixes {c['audit_fixes']}; mean wait {status['mean_wait_ms']:.1f} ms",
    ]
    rates = status.get("rates")
    if rates:
        lines.append(
            f"last {rates['window_s']:.1f} s: opened {rates['opened_per_s']:.1f}/s (churn), "
            f"grants {rates['grants_per_s']:.1f}/s, sheds {rates['sheds_per_s']:.1f}/s, "
            f"waits {rates['waits_per_s']:.1f}/s, timeouts {rates['timeouts_per_s']:.1f}/s"
        )
    lines.append(
        f"{'PID':>8} {'HELD':>5} {'IDLE':>5} {'IN USE':>6} {'WAIT':>5} {'WAITED':>7} {'QUEUED':>6} "
        f"{'OPENED':>7} {'OPEN/S':>7} {'SHEDS':>6}  STATE"
    )
    for w in status["workers"]:
        per_s = f"{w['opened_per_s']:>7.1f}" if "opened_per_s" in w else f"{'-':>7}"
        lines.append(
            f"{w['pid']:>8} {w['held']:>5} {w['idle']:>5} {w['in_use']:>6} {w['waiting']:>5} "
            f"{w['wait_s']:>6.2f}s {w['waiting_local']:>6} {w['opened']:>7} {per_s} {w['sheds']:>6}  "
            f"{'alive' if w['alive'] else 'DEAD'}"
        )
    if not status["workers"]:
        lines.append("  (no worker registered)")
    return "\n".join(lines)


POOLS_HEADER = (
    f"{'POOL':<20} {'BUDGET':>6} {'FREE':>5} {'HELD':>5} {'IDLE':>5} {'IN_USE':>6} {'PROCS':>5} "
    f"{'WAIT':>5} {'QUEUED':>6} {'MAXWAIT':>8} {'OPEN/S':>7}  COORDINATOR"
)


def format_pools(statuses: Iterable[Mapping[str, Any]]) -> str:
    """Every pool of the host, one row each, like PgBouncer's SHOW POOLS.

    WAIT counts threads waiting for a permit (across processes), QUEUED those
    queued inside their process; OPEN/S is the churn (server connections opened
    per second over the rate window).
    """
    lines = [POOLS_HEADER]
    for s in statuses:
        if "error" in s:
            lines.append(f"{s['name']:<20} {s['error']}")
            continue
        churn = f"{s['rates']['opened_per_s']:>7.1f}" if s.get("rates") else f"{'-':>7}"
        coord = s["coordinator"]
        lines.append(
            f"{s['name']:<20} {s['budget']:>6} {s['free']:>5} {s['held']:>5} {s['idle']:>5} {s['in_use']:>6} "
            f"{s['processes']:>5} {s['waiting']:>5} {s['waiting_local']:>6} {s['maxwait_s']:>7.2f}s {churn}  "
            + (f"pid {coord['pid']}" if coord["alive"] else "NOT RUNNING")
        )
    if len(lines) == 1:
        lines.append("  (no pool on this host)")
    return "\n".join(lines)


# -- backends, and the server's view of them ----------------------------------------


def server_sessions(dsn: str, name: str, pids: Iterable[int]) -> dict[int, dict[str, Any]]:
    """Read ``pg_stat_activity`` rows of the given backend pids and of sessions tagged ``sharedpool/NAME``."""
    import psycopg2

    try:
        conn = psycopg2.connect(dsn, application_name="sharedpool status")
    except psycopg2.Error as exc:
        raise SharedPoolError(f"--dsn: cannot connect to the server: {str(exc).strip()}") from None
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pid, state, application_name, extract(epoch FROM now() - backend_start), "
                "extract(epoch FROM now() - state_change) FROM pg_stat_activity "
                "WHERE backend_type = 'client backend' AND (pid = ANY(%s) OR application_name = %s)",
                (list(pids), f"sharedpool/{name}"),
            )
            return {
                pid: {
                    "state": state,
                    "application_name": app,
                    "age_s": round(float(age), 1) if age is not None else None,
                    "state_age_s": round(float(state_age), 1) if state_age is not None else None,
                }
                for pid, state, app, age, state_age in cur.fetchall()
            }
    finally:
        conn.close()


def backends_report(status: Mapping[str, Any], server: Mapping[int, Mapping[str, Any]] | None) -> dict[str, Any]:
    """List each recorded backend (worker pid, server state); with the server's view, flag disagreements.

    Orphans are backends the server still runs for workers that are dead, and
    sessions tagged with the pool's name that no live worker records.
    ``missing`` are backends recorded in the ledger that the server does not
    know (a proxy in front reports its own pids).
    """
    rows, recorded = [], set()
    for w in status["workers"]:
        for pid in w["backends"]:
            recorded.add(pid)
            row = {"backend_pid": pid, "worker_pid": w["pid"], "worker_alive": w["alive"]}
            if server is not None:
                seen = server.get(pid)
                row["on_server"] = seen is not None
                row.update(seen or {})
            rows.append(row)
    report: dict[str, Any] = {"name": status["name"], "held": status["held"], "backends": rows}
    if server is not None:
        report["orphans"] = sorted(
            [r["backend_pid"] for r in rows if r["on_server"] and not r["worker_alive"]]
            + [pid for pid, s in server.items() if pid not in recorded and s["application_name"] == f"sharedpool/{status['name']}"]
        )
        report["missing"] = [r["backend_pid"] for r in rows if not r["on_server"]]
        report["server_sessions"] = len([p for p in server if p in recorded or p in report["orphans"]])
    return report


def format_backends(report: Mapping[str, Any]) -> str:
    """One row per recorded backend; then what the server sees that the ledger does not, and back."""
    joined = "orphans" in report
    lines = [f"{'BACKEND':>8} {'WORKER':>8} {'WORKER STATE':<12}" + ("  SERVER STATE" if joined else "")]
    for r in report["backends"]:
        line = f"{r['backend_pid']:>8} {r['worker_pid']:>8} {'alive' if r['worker_alive'] else 'DEAD':<12}"
        if joined:
            if r["on_server"]:
                line += f"  {r['state'] or '?'} for {r['state_age_s'] or 0:.1f} s ({r['application_name']})"
            else:
                line += "  NOT ON SERVER"
        lines.append(line)
    if not report["backends"]:
        lines.append("  (no backend recorded)")
    if joined:
        orphans, missing = report["orphans"], report["missing"]
        lines.append(
            f"server: {report['server_sessions']} session(s) of this pool for {report['held']} held permit(s); "
            f"orphans: {', '.join(map(str, orphans)) or 'none'}; "
            f"in the ledger but not on the server: {', '.join(map(str, missing)) or 'none'}"
        )
    return "\n".join(lines)
