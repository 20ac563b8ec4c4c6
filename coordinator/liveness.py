"""Learn the instant a worker process dies, where we can see it. Coordinator only.

The truth about a worker's life is its slot lock (names.py): the kernel drops
it when the process dies, in any PID namespace, and the daemon reads it on
every pass. A pidfd (Linux >= 5.3) is only an alarm clock on top: for a
worker in our own PID namespace it becomes readable the moment the process
exits, so the daemon looks at once instead of at its next tick. A pid from
another namespace means nothing here and is never watched.
"""
from __future__ import annotations

import contextlib
import os
import selectors

from sharedpool.ledger import process_start_time


class Watcher:
    """Keep a pidfd per slot whose owner runs in our PID namespace."""

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self._selector = selector
        self._watched: dict[int, tuple[int, int, int]] = {}  # slot -> (pid, start, pidfd)

    def watching(self, index: int, pid: int, start_time: int) -> bool:
        entry = self._watched.get(index)
        return entry is not None and entry[:2] == (pid, start_time)

    def watch(self, index: int, pid: int, start_time: int) -> None:
        """Watch a slot's process if it is the one that registered (same pid and start time)."""
        self.forget(index)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return  # gone, or not ours to watch: the slot lock still tells
        # the start time is checked after the pidfd exists, so a reused pid cannot slip in
        if process_start_time(pid) != start_time:
            os.close(pidfd)
            return
        self._watched[index] = (pid, start_time, pidfd)
        self._selector.register(pidfd, selectors.EVENT_READ, ("pidfd", index))

    def forget(self, index: int) -> None:
        entry = self._watched.pop(index, None)
        if entry is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(entry[2])
            os.close(entry[2])

    def close(self) -> None:
        for index in list(self._watched):
            self.forget(index)
