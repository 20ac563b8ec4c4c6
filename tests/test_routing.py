"""The accept-deferral decision (integrations/routing.py) against a fake ledger and an injected clock.

No processes, no sleeps: the real-process proof (8 sync workers on a budget
of 4 open few backends) is in test_gunicorn.py.
"""
from __future__ import annotations

import types

import pytest

from sharedpool.integrations import routing
from sharedpool.ledger import SLOT_ACTIVE

OWN_PID = 1000


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def slot(pid: int, held: int = 0, idle: int = 0, waiting: int = 0):
    return types.SimpleNamespace(state=SLOT_ACTIVE, pid=pid, start_time=1, held=held, idle=idle, waiting=waiting)


def budget(ledger, open_: int = 0, idle: int = 0):
    return types.SimpleNamespace(open=open_, idle=idle, closed=False, pid=OWN_PID, ledger=ledger,
                                 ensure_ready=lambda: None)


def ledger(free: int, *slots):
    return types.SimpleNamespace(sem=types.SimpleNamespace(value=free), slots=list(slots),
                                 scan_limit=lambda: len(slots))


@pytest.fixture
def make_router():
    def make(the_budget, *, siblings=True, **kwargs):
        clock = Clock()
        router = routing.Router([], routing.Board(), clock=clock, **kwargs)
        router.pid = OWN_PID
        router._budgets = [the_budget]
        router._is_sibling = lambda pid, start_time: siblings
        return router, clock

    return make


def test_a_holder_accepts_and_marks_itself_ready(make_router):
    router, clock = make_router(budget(ledger(0, slot(OWN_PID, held=1)), open_=1))
    assert not router.should_defer()
    assert router.board.holder_ready.value == clock.now


def test_accept_at_once_with_a_free_permit_or_no_sibling_holder(make_router):
    router, _ = make_router(budget(ledger(1, slot(2, held=1, idle=1))))
    assert not router.should_defer()  # a free permit takes nobody's connection
    router, _ = make_router(budget(ledger(0, slot(2, held=1, idle=1))), siblings=False)
    assert not router.should_defer()  # another application's holder will not take our requests


def test_defer_to_an_idle_sibling_for_a_bounded_streak(make_router):
    router, clock = make_router(budget(ledger(0, slot(2, held=1, idle=1))))
    assert router.should_defer()
    clock.now += routing.DEFER_POLL
    assert router.should_defer()
    # the idle sibling never takes it (stuck after its request) and no holder came back: accept
    while router.should_defer():
        clock.now += routing.DEFER_POLL
        assert clock.now - 100.0 <= routing.IDLE_GRACE + routing.DEFER_POLL
    assert clock.now - 100.0 >= routing.IDLE_GRACE


def test_defer_while_busy_holders_keep_coming_back(make_router):
    router, clock = make_router(budget(ledger(0, slot(2, held=1), slot(3, held=1))))
    router.board.holder_ready.value = clock.now
    for _ in range(100):  # a saturated queue: holders come back every few ms, far longer than IDLE_GRACE
        clock.now += routing.DEFER_POLL
        router.board.holder_ready.value = clock.now - 0.001
        assert router.should_defer()
    clock.now += routing.READY_WINDOW_MIN + 0.001  # every holder stuck beyond the window
    assert not router.should_defer()


def test_the_ready_window_follows_the_holders_request_time():
    board = routing.Board()
    assert board.ready_window() == routing.READY_WINDOW_MIN
    board.note_request(0.2)
    assert board.ready_window() == pytest.approx(0.4)
    for _ in range(100):
        board.note_request(5.0)
    assert board.ready_window() == routing.READY_WINDOW_MAX


def test_a_failing_check_never_blocks_accepting(make_router):
    def broken():
        raise RuntimeError("no coordinator")

    the_budget = budget(None)
    the_budget.pid = 0
    the_budget.ensure_ready = broken
    router, _ = make_router(the_budget)
    assert not router.should_defer()


def test_gthread_holders_are_ready_only_with_an_idle_connection(make_router):
    router, _ = make_router(budget(ledger(0, slot(OWN_PID, held=1)), open_=1, idle=0),
                            holders_ready_only_when_idle=True)
    assert not router.should_defer()
    assert router.board.holder_ready.value == 0.0


def test_a_permit_being_handed_to_a_waiter_is_not_free(make_router):
    router, clock = make_router(budget(ledger(1, slot(2, held=1), slot(3, waiting=1))))
    router.board.holder_ready.value = clock.now
    assert router.should_defer()
