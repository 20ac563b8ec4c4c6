"""Learn the instant a worker process dies. Coordinator only.

A pidfd (Linux ≥ 5.3) becomes readable when its process exits, so deaths
arrive as events in the coordinator's selector; where pidfd_open is missing,
``poll_dead`` is the fallback the loop calls on every tick.
"""
from __future__ import annotations

import contextlib
import errno
import os
import selectors

from sharedpool.ledger import is_alive, process_start_time

HAVE_PIDFD = hasattr(os, "pidfd_open")


class Watcher:
    """Watch (pid, start_time) pairs; report the slots whose process is gone."""

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self._selector = selector
        self._watched: dict[int, tuple[int, int, int | None]] = {}  # slot -> (pid, start, pidfd)

    def watching(self, index: int, pid: int, start_time: int) -> bool:
        entry = self._watched.get(index)
        return entry is not None and entry[:2] == (pid, start_time)

    def watch(self, index: int, pid: int, start_time: int) -> bool:
        """Start watching a slot's process; return False if it is already dead."""
        self.forget(index)
        pidfd = None
        if HAVE_PIDFD:
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                return False
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                return False  # its main thread is gone while others finish: it is exiting
        # the start time is checked after the pidfd exists, so a reused pid cannot slip in
        if process_start_time(pid) != start_time:
            if pidfd is not None:
                os.close(pidfd)
            return False
        self._watched[index] = (pid, start_time, pidfd)
        if pidfd is not None:
            self._selector.register(pidfd, selectors.EVENT_READ, ("pidfd", index))
        return True

    def forget(self, index: int) -> None:
        entry = self._watched.pop(index, None)
        if entry is not None and entry[2] is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(entry[2])
            os.close(entry[2])

    def poll_dead(self) -> list[int]:
        """Fallback without pidfd: the slots whose process no longer runs."""
        return [i for i, (pid, start, fd) in self._watched.items() if fd is None and not is_alive(pid, start)]

    def close(self) -> None:
        for index in list(self._watched):
            self.forget(index)
