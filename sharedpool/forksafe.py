"""Make a forked child forget what belongs to its parent.

Runs in every process: ``os.register_at_fork`` calls the hooks in the child
right after fork, before any other code. Hooks must do no I/O on inherited
connections (they would end the parent's sessions).
"""
from __future__ import annotations

import os
from collections.abc import Callable

_child_hooks: list[Callable[[], object]] = []


def register(hook: Callable[[], object]) -> None:
    """Run ``hook`` in every child process right after fork."""
    _child_hooks.append(hook)


def _after_fork_in_child() -> None:
    for hook in _child_hooks:
        hook()


os.register_at_fork(after_in_child=_after_fork_in_child)
