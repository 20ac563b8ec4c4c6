"""Decide how many permits the coordinator may post or must take back: pure functions.

Coordinator only. Inputs are plain values read from one stable view of the
ledger (``SlotFacts``), the semaphore's value and the coordinator's own
count of permits in circulation (``physical``, never the header's); outputs
are numbers the daemon acts on. Nothing here can over-grant: a permit is
posted only when it is provably missing (a dead owner's own verified record,
or an exact count), never while a live slot's numbers are not its owner's
(a failed check value).

Where a worker died in the middle of a permit operation, or its slot was
scribbled over, only an exact count can tell what leaked: the daemon raises
the hold (waiters poll instead of blocking, so a thread between two tries
holds nothing unrecorded) and waits for a view in which no live operation is
in flight. That is exact by construction, with no timing assumption.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SlotFacts:
    """One slot as the daemon saw it in a stable view."""

    index: int
    alive: bool  # its owner holds the slot lock
    verified: bool  # its check value matches: the numbers are its owner's
    held: int
    inflight: int
    waiting: int


def reclaimable(dead: SlotFacts, physical: int, free: int, others: list[SlotFacts]) -> int:
    """Permits of a dead worker (its backends gone) that may be posted right now.

    Only a verified slot with no operation in flight is taken at its word:
    its owner recorded exactly those permits and can no longer move them.
    As a cap against a forged record, never more than ``physical - free -``
    what the other slots record, and nothing while a live slot's numbers are
    not its owner's. Whatever is left waits for an exact count.
    """
    if not dead.verified or dead.inflight:
        return 0
    if any(not s.verified for s in others if s.alive):
        return 0
    return max(0, min(dead.held, physical - free - sum(s.held for s in others)))


def needs_exact_count(dead: SlotFacts, posted: int) -> bool:
    """Tell whether reclaiming ``dead`` left something only an exact count can settle."""
    return not dead.verified or bool(dead.inflight) or posted < dead.held


def exact_missing(physical: int, free: int, live: list[SlotFacts]) -> int | None:
    """Permits missing (positive) or in excess (negative), or None when the view is not exact.

    Exact when every live slot is verified and none has an operation in
    flight (dead slots must already be settled and freed): then every permit
    is either free or recorded in a live slot.
    """
    if any(not s.verified or s.inflight for s in live):
        return None
    return physical - free - sum(s.held for s in live)


def excess(physical: int, free: int, live: list[SlotFacts]) -> int:
    """Permits surely in circulation beyond ``physical`` (a double post, a foreign post).

    In-flight operations only hide permits (taken but not yet recorded, or
    unrecorded but not yet posted), so free plus verified holdings is a lower
    bound of what circulates: anything above ``physical`` is excess for sure.
    """
    return max(0, free + sum(s.held for s in live if s.verified) - physical)
