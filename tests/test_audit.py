"""The coordinator's audit decisions (coordinator/audit.py) against plain values: no process, no ledger.

Each function is asked the question the daemon asks, with the numbers a
corrupted, racing or dying pool can show it. What must hold: nothing is
posted unless it is provably missing, a forged number never inflates a
post, and an exact count is refused while any live operation is in flight.
"""
from __future__ import annotations

import pytest

from coordinator.audit import SlotFacts, exact_missing, excess, needs_exact_count, reclaimable

U32_MAX = 2**32 - 1


def slot(index: int = 0, *, alive: bool = True, verified: bool = True, held: int = 0, inflight: int = 0,
         waiting: int = 0) -> SlotFacts:
    return SlotFacts(index=index, alive=alive, verified=verified, held=held, inflight=inflight, waiting=waiting)


# -- reclaimable ---------------------------------------------------------------------


def test_dead_verified_slot_is_reclaimed_at_its_word():
    dead = slot(1, alive=False, held=2)
    others = [slot(2, held=1)]
    # budget 4: 1 free, 1 held by the live slot, 2 by the dead one
    assert reclaimable(dead, physical=4, free=1, others=others) == 2
    assert not needs_exact_count(dead, 2)


def test_dead_slot_with_inflight_is_not_reclaimed():
    """Mid-operation the dead owner may or may not have moved the semaphore: only an exact count tells."""
    dead = slot(1, alive=False, held=2, inflight=1)
    assert reclaimable(dead, physical=4, free=0, others=[]) == 0
    assert needs_exact_count(dead, 0)


def test_dead_unverified_slot_is_not_reclaimed():
    dead = slot(1, alive=False, verified=False, held=3)
    assert reclaimable(dead, physical=4, free=0, others=[]) == 0
    assert needs_exact_count(dead, 0)


def test_unverified_live_slot_blocks_posting():
    """A live slot whose numbers are not its owner's may hide any number of permits: post nothing."""
    dead = slot(1, alive=False, held=1)
    scribbled = slot(2, alive=True, verified=False, held=0)
    assert reclaimable(dead, physical=4, free=0, others=[scribbled]) == 0
    assert needs_exact_count(dead, 0)
    # an unverified *dead* neighbour does not block: its owner cannot take anything any more
    dead_neighbour = slot(3, alive=False, verified=False, held=0)
    assert reclaimable(dead, physical=4, free=0, others=[dead_neighbour]) == 1


@pytest.mark.parametrize("forged", [5, 1000, U32_MAX])
def test_forged_huge_held_is_capped(forged):
    """A verified-looking record claiming more than can circulate is capped at what is missing."""
    dead = slot(1, alive=False, held=forged)
    others = [slot(2, held=1), slot(3, held=1)]
    count = reclaimable(dead, physical=4, free=1, others=others)
    assert count == 1  # 4 in circulation - 1 free - 2 held elsewhere
    assert needs_exact_count(dead, count)  # the rest is only settled by an exact count


def test_reclaim_never_negative_and_never_above_physical():
    dead = slot(1, alive=False, held=3)
    # free and the others already account for everything (or more, after a double post)
    assert reclaimable(dead, physical=3, free=3, others=[]) == 0
    assert reclaimable(dead, physical=3, free=2, others=[slot(2, held=5)]) == 0
    for free in range(0, 5):
        for other in range(0, 5):
            count = reclaimable(dead, physical=4, free=free, others=[slot(2, held=other)])
            assert 0 <= count <= 3
            assert free + other + count <= max(4, free + other)


def test_partial_reclaim_needs_exact_count():
    dead = slot(1, alive=False, held=3)
    assert reclaimable(dead, physical=4, free=2, others=[]) == 2
    assert needs_exact_count(dead, 2)
    assert not needs_exact_count(dead, 3)


# -- exact count -----------------------------------------------------------------------


def test_exact_count_refuses_while_a_live_op_is_in_flight():
    live = [slot(0, held=1), slot(1, held=0, inflight=1)]
    assert exact_missing(physical=4, free=1, live=live) is None


def test_exact_count_refuses_an_unverified_live_slot():
    assert exact_missing(physical=4, free=1, live=[slot(0, held=1), slot(1, verified=False)]) is None


def test_blocking_waiter_counts_as_in_flight():
    """A waiter blocked on the semaphore may take a permit at any instant: the view is not exact."""
    waiter = slot(1, held=0, inflight=1, waiting=1)
    assert exact_missing(physical=2, free=0, live=[slot(0, held=1), waiter]) is None


def test_exact_count_finds_missing_and_excess():
    live = [slot(0, held=1), slot(1, held=2)]
    assert exact_missing(physical=5, free=2, live=live) == 0
    assert exact_missing(physical=5, free=0, live=live) == 2  # leaked: post 2
    assert exact_missing(physical=5, free=4, live=live) == -2  # too many free: take 2 back
    assert exact_missing(physical=5, free=5, live=[]) == 0


def test_polling_waiter_is_exact():
    """A waiter that polls (hold raised) holds nothing between tries: no inflight, the count is exact."""
    assert exact_missing(physical=2, free=0, live=[slot(0, held=1), slot(1, waiting=3)]) == 1


# -- excess ----------------------------------------------------------------------------


def test_excess_detected():
    live = [slot(0, held=2), slot(1, held=1)]
    assert excess(physical=3, free=0, live=live) == 0
    assert excess(physical=3, free=2, live=live) == 2  # a double or foreign post


def test_excess_ignores_unverified_and_counts_inflight_as_nothing():
    """Only verified holdings are a lower bound of what circulates; a forged held cannot cause a take-back."""
    live = [slot(0, held=1), slot(1, verified=False, held=U32_MAX)]
    assert excess(physical=3, free=2, live=live) == 0
    assert excess(physical=3, free=3, live=live) == 1
    # in flight only hides permits, it never adds to the bound
    assert excess(physical=3, free=1, live=[slot(0, held=2, inflight=5)]) == 0


def test_excess_never_negative():
    assert excess(physical=10, free=0, live=[]) == 0
    assert excess(physical=0, free=0, live=[]) == 0


def test_random_views_never_over_grant():
    """Brute force over small views: what reclaim posts never takes free + held past physical.

    Truth: ``physical`` permits circulate, the dead slot really held ``real`` of
    them; the record may be forged (any ``held``) but a verified record is the
    owner's, so forging shows up only as unverified slots or as numbers above
    the truth.
    """
    import itertools

    for physical, real, other_held, forged in itertools.product(range(0, 5), range(0, 5), range(0, 5), range(0, 7)):
        if real + other_held > physical:
            continue
        free = physical - real - other_held
        dead = slot(1, alive=False, held=forged)
        count = reclaimable(dead, physical, free, [slot(2, held=other_held)])
        # posting ``count`` must not put more permits in circulation than ``physical``
        assert free + other_held + count <= physical, (physical, real, other_held, forged, count)
        if forged <= real:
            assert count == forged
