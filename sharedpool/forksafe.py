"""Make a forked child forget what belongs to its parent.

Runs in every process: ``os.register_at_fork`` calls the hooks in the child
right after ``os.fork()``, before any other code. Servers that fork from C
(uWSGI) bypass that, so their post-fork hook calls ``after_fork_in_child()``;
it runs the hooks once per process whichever way it is reached. Hooks must do
no I/O on inherited connections (they would end the parent's sessions).
"""
from __future__ import annotations

import os
from collections.abc import Callable

_child_hooks: list[Callable[[], object]] = []
_ran_in_pid = os.getpid()  # the first process owns what it opened: nothing to forget


def register(hook: Callable[[], object]) -> None:
    """Run ``hook`` in every child process right after fork."""
    _child_hooks.append(hook)


def after_fork_in_child() -> None:
    """Forget the parent's connections and slot, once per process."""
    global _ran_in_pid
    if _ran_in_pid == os.getpid():
        return
    _ran_in_pid = os.getpid()
    for hook in _child_hooks:
        hook()


os.register_at_fork(after_in_child=after_fork_in_child)
