"""Decide every host's share of CLUSTER_BUDGET: pure functions of the hosts' rows, no I/O.

Coordinator only (the cluster agent, cluster.py, is the I/O around them).
The hard cap is the server's; these decide only which host may try.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

TICK = 0.1  # seconds between heartbeats and plans
SUSPECT = 0.5  # seconds without heartbeat after which a host with no live backend counts as gone
LEASE = 2.0  # seconds without heartbeat after which a host counts as gone even with live backends
FENCE_AFTER = 1.0  # seconds past LEASE after which a gone host's backends are terminated
HOLD = 2.0  # seconds a host's peak demand is kept before its share may shrink (hysteresis)
ROTATE = 2.0  # seconds between turns when the budget is smaller than the number of hosts wanting
UNLISTED_GRACE = 5 * TICK  # seconds a backend no live host lists may be one whose host will list it next tick
PRUNE_AFTER = 600.0  # seconds after which the row of a gone host with no backend is deleted


# -- decisions (pure) --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HostRow:
    """One host as its last heartbeat left it; ``age`` in seconds by the server's clock."""

    host: str
    ceiling: int
    share: int
    held: int
    waiting: int
    wanted: int
    backends: tuple[int, ...]
    fenced: int
    age: float


@dataclasses.dataclass(frozen=True)
class Plan:
    shares: dict[str, int]
    live: frozenset[str]
    reserved: int  # role backends not covered by a live host: they hold budget until gone
    fence: dict[str, tuple[int, ...]]  # host ('' for unlisted) -> backend pids to terminate
    prune: tuple[str, ...]


def is_live(row: HostRow, alive: Mapping[int, float]) -> bool:
    """A host is live while it heartbeats; a late one only while its backends live (and never past LEASE)."""
    return row.age <= SUSPECT or (row.age <= LEASE and any(pid in alive for pid in row.backends))


def plan(budget: int, rows: Iterable[HostRow], alive: Mapping[int, float], now: float) -> Plan:
    """Share ``budget`` among live hosts; keep what gone hosts' backends still hold; pick backends to fence.

    ``alive`` maps the role's backend pids to their age in seconds. A share is
    never given from budget a gone host's backend still occupies: that
    backend is counted in ``reserved`` until it is gone, and terminated once
    its host has been gone for LEASE + FENCE_AFTER (a backend nobody lists
    is terminated once older than that).
    """
    rows = list(rows)
    live = [r for r in rows if is_live(r, alive)]
    covered = {pid for r in live for pid in r.backends}
    orphans = {pid: age for pid, age in alive.items() if pid not in covered}
    listed_by = {pid: r for r in rows if r not in live for pid in r.backends}
    fence: dict[str, list[int]] = {}
    for pid, age in orphans.items():
        row = listed_by.get(pid)
        if age > LEASE + FENCE_AFTER and (row is None or row.age > LEASE + FENCE_AFTER):
            fence.setdefault(row.host if row else "", []).append(pid)
    reserved = sum(1 for pid, age in orphans.items() if pid in listed_by or age > UNLISTED_GRACE)
    wants = {r.host: min(r.wanted, r.ceiling) for r in live}
    ceilings = {r.host: r.ceiling for r in live}
    shares = water_fill(max(budget - reserved, 0), wants, ceilings, turn=int(now // ROTATE))
    prune = tuple(r.host for r in rows if r.age > PRUNE_AFTER and not any(p in alive for p in r.backends))
    return Plan(
        shares={r.host: shares.get(r.host, 0) for r in rows},
        live=frozenset(r.host for r in live),
        reserved=reserved,
        fence={host: tuple(pids) for host, pids in fence.items()},
        prune=prune,
    )


def water_fill(available: int, wants: Mapping[str, int], ceilings: Mapping[str, int], turn: int) -> dict[str, int]:
    """Max-min fair shares of ``available``: demand first, then what is left up to each ceiling.

    When fewer permits than hosts wanting remain, the hosts take turns
    (``turn`` rotates the order), so no host starves; otherwise the order is
    fixed, so a remainder does not move between hosts (no handoff churn).
    """
    order = sorted(wants)
    shares = _fill_both(available, wants, ceilings, order)
    if any(wants[h] and not shares[h] for h in order):
        shift = turn % len(order)
        shares = _fill_both(available, wants, ceilings, order[shift:] + order[:shift])
    return shares


def _fill_both(available: int, wants: Mapping[str, int], ceilings: Mapping[str, int], order: list[str]) -> dict[str, int]:
    shares = dict.fromkeys(order, 0)
    for limit in (wants, ceilings):
        available -= _fill(shares, limit, available, order)
    return shares


def _fill(shares: dict[str, int], limit: Mapping[str, int], available: int, order: list[str]) -> int:
    """Raise the lowest shares towards ``limit`` with at most ``available`` more; return how many were given."""
    total = available + sum(shares.values())

    def level_used(level: int) -> int:
        return sum(max(shares[h], min(limit[h], level)) for h in order)

    low, high = 0, max((limit[h] for h in order), default=0)
    while low < high:  # the highest water level that fits
        middle = (low + high + 1) // 2
        low, high = (middle, high) if level_used(middle) <= total else (low, middle - 1)
    given = 0
    for host in order:
        raised = max(shares[host], min(limit[host], low))
        given += raised - shares[host]
        shares[host] = raised
    for host in order:  # the remainder, one each, in turn order: fewer than the hosts at the level
        if given >= available:
            break
        if shares[host] == low and shares[host] < limit[host]:
            shares[host] += 1
            given += 1
    return given


class DemandTracker:
    """Report a host's demand as its peak over the last HOLD seconds, so a share doesn't flap."""

    def __init__(self, hold: float = HOLD) -> None:
        self.hold = hold
        self.peak = 0
        self.peak_at = 0.0

    def update(self, demand: int, now: float) -> int:
        if demand >= self.peak or now - self.peak_at > self.hold:
            self.peak, self.peak_at = demand, now
        return self.peak
