"""Render a ledger snapshot for people (a table) and programs (JSON). Any process."""
from __future__ import annotations

import time
from typing import Any

from sharedpool.ledger import Snapshot


RATED = ("opened", "grants", "sheds", "waits", "timeouts")


def snapshot_dict(
    snap: Snapshot, now: float | None = None, previous: Snapshot | None = None, elapsed: float = 0.0
) -> dict[str, Any]:
    """Describe a snapshot; with an earlier one, add per-second rates (churn is ``opened``)."""
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
                "in_use": s.in_use,
                "waiting": s.waiting,
                "wait_s": round(now - s.wait_since, 3) if s.waiting and s.wait_since else 0.0,
                "inflight": s.inflight,
                "opened": s.counters["opened"],
                "sheds": s.counters["sheds"],
                "timeouts": s.counters["timeouts"],
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
        "waiting": snap.waiting,
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


def format_table(status: dict[str, Any]) -> str:
    coord = status["coordinator"]
    if coord["alive"]:
        coord_text = f"pid {coord['pid']}, heartbeat {coord['heartbeat_age_s']:.1f} s ago"
    else:
        coord_text = "NOT RUNNING (cap holds; dead workers are reclaimed when one starts)"
    c = status["counters"]
    lines = [
        f"pool {status['name']!r}: budget {status['budget']}, free {status['free']}, "
        f"held {status['held']}, waiting {status['waiting']}, epoch {status['epoch']}",
        f"coordinator: {coord_text}",
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
    header = f"{'PID':>8} {'HELD':>5} {'IDLE':>5} {'IN USE':>6} {'WAIT':>5} {'WAITED':>7} {'OPENED':>7} {'OPEN/S':>7} {'SHEDS':>6}  STATE"
    lines.append(header)
    for w in status["workers"]:
        per_s = f"{w['opened_per_s']:>7.1f}" if "opened_per_s" in w else f"{'-':>7}"
        lines.append(
            f"{w['pid']:>8} {w['held']:>5} {w['idle']:>5} {w['in_use']:>6} {w['waiting']:>5} "
            f"{w['wait_s']:>6.2f}s {w['opened']:>7} {per_s} {w['sheds']:>6}  {'alive' if w['alive'] else 'DEAD'}"
        )
    if not status["workers"]:
        lines.append("  (no worker registered)")
    return "\n".join(lines)
