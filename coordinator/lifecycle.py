"""Claim a pool's name, then create or adopt its ledger; remove only what is provably ours.

Coordinator and CLI. Order on start: take the coordinator lock (one
coordinator per pool), bind the control socket (a coordinator that cannot be
reached fails before it touches the ledger), then create or adopt. The pool
directory must be our own user's; everything in it is checked before use.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import TypeVar

import posix_ipc

from sharedpool.channel import Inbox
from sharedpool.errors import LedgerError, PoolPermissionError, SharedPoolError
from sharedpool.ledger import HEADER_SIZE, SLOT_ACTIVE, SLOT_SIZE, Header, Ledger, Slot, sealed, validate_segment
from sharedpool.names import (
    CONTROL_SOCKET,
    COORDINATOR_BYTE,
    LEDGER_FILE,
    LOCK_FILE,
    REGISTRY_BYTE,
    SLOT_LOCK_BASE,
    PoolNames,
    byte_locked,
    describe_user,
    lock_byte,
    modes,
    open_directory,
    open_entry,
    unlock_byte,
)

log = logging.getLogger("sharedpool.coordinator")

T = TypeVar("T")

LOCK_PATIENCE = 10.0  # seconds a coordinator that lost the lock waits for the winner to be ready


class CoordinatorError(SharedPoolError):
    """The coordinator cannot start or adopt the pool."""


class PoolClaim:
    """The pool's directory, lock file and coordinator lock, held for this process's life."""

    def __init__(self, names: PoolNames, group: str | None) -> None:
        self.names = names
        self.group = group
        self.dir_fd = -1
        self.lock_fd = -1

    def take(self, patience: float = LOCK_PATIENCE) -> None:
        """Take the coordinator lock; a loser waits until the winner is ready, then fails naming it."""
        names = self.names
        deadline = time.monotonic() + patience
        while True:
            dir_fd = open_directory(names, self.group, create=True, strict=True)
            owner = os.fstat(dir_fd).st_uid
            try:
                lock_fd = open_entry(names, dir_fd, LOCK_FILE, os.O_RDWR | os.O_CREAT, self.group, owner=owner)
            except BaseException:
                os.close(dir_fd)
                raise
            if lock_byte(lock_fd, COORDINATOR_BYTE):
                # an exiting coordinator may have removed the directory between our open and our lock
                if _still_named(names.directory, dir_fd) and _still_named(names.path(LOCK_FILE), lock_fd):
                    self.dir_fd, self.lock_fd = dir_fd, lock_fd
                    return
                os.close(lock_fd)
                os.close(dir_fd)
                continue
            os.close(lock_fd)
            os.close(dir_fd)
            if time.monotonic() > deadline or _ready(names, self.group):
                raise CoordinatorError(
                    f"pool {names.name!r}: a coordinator already runs{_holder(names, self.group)}"
                )
            time.sleep(0.01)

    def bind_control(self) -> Inbox:
        try:
            return Inbox(self.names, CONTROL_SOCKET, self.group, os.fstat(self.dir_fd).st_uid)
        except OSError as exc:
            raise CoordinatorError(
                f"pool {self.names.name!r}: cannot bind the control socket {self.names.path(CONTROL_SOCKET)}: {exc}"
            ) from None

    def release(self) -> None:
        for fd in (self.lock_fd, self.dir_fd):
            if fd >= 0:
                os.close(fd)
        self.lock_fd = self.dir_fd = -1


def _still_named(path: str, fd: int) -> bool:
    try:
        return os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _read(names: PoolNames, group: str | None, read: Callable[[Ledger], T], unreadable: T) -> T:
    """Read something from the pool's ledger, or ``unreadable`` when it cannot be attached."""
    try:
        ledger = Ledger.attach(names.name, group=group, mapped=False)
    except LedgerError:
        return unreadable
    try:
        return read(ledger)
    finally:
        ledger.close()


def _ready(names: PoolNames, group: str | None) -> bool:
    return _read(names, group, lambda ledger: ledger.coordinator_alive() and bool(ledger.header.coordinator_pid), False)


def _holder(names: PoolNames, group: str | None) -> str:
    pid = _read(names, group, lambda ledger: ledger.header.coordinator_pid, 0)
    return f" (pid {pid})" if pid else ""


def create_or_adopt(claim: PoolClaim, budget: int, nslots: int) -> tuple[Ledger, bool]:
    """Create the ledger, or adopt the one there; return it and whether it was adopted."""
    names, group = claim.names, claim.group
    try:
        ledger = Ledger.create(names.name, budget, nslots=nslots, group=group, dir_fd=os.dup(claim.dir_fd), mapped=False)
        return ledger, False
    except FileExistsError:
        pass
    owner = os.fstat(claim.dir_fd).st_uid
    fd = open_entry(names, claim.dir_fd, LEDGER_FILE, os.O_RDWR, group, owner=owner)
    try:
        header = validate_segment(names, fd)
        if not os.path.exists(names.semaphore_path(header.token)):
            _recreate_semaphore(names, fd, header, group)
    except LedgerError as exc:
        raise CoordinatorError(f"{exc}; remove it with `sharedpool cleanup --name {names.name}`") from None
    finally:
        os.close(fd)
    try:
        ledger = Ledger.attach(names.name, group=group, mapped=False)
    except LedgerError as exc:
        raise CoordinatorError(f"{exc}; remove it with `sharedpool cleanup --name {names.name}`") from None
    return ledger, True


def _recreate_semaphore(names: PoolNames, fd: int, header: Header, group: str | None) -> None:
    """The ledger survived its semaphore: rebuild it from what the verified slots record.

    Every operation in flight, every live waiter and every unverified live
    slot is counted as holding as much as it could: never over-grant; the
    audit returns what this leaves missing once it can count exactly.
    """
    raw = os.pread(fd, header.nslots * SLOT_SIZE, HEADER_SIZE)
    held = 0
    for offset in range(0, len(raw), SLOT_SIZE):
        slot = Slot.from_buffer_copy(raw, offset)
        if slot.state == SLOT_ACTIVE:
            held += slot.held + slot.inflight + slot.waiting if sealed(header.token, slot) else header.budget
    free = max(0, min(header.budget, header.physical) - held)
    posix_ipc.Semaphore(names.semaphore(header.token), posix_ipc.O_CREX, mode=modes(group)[1],
                        initial_value=free).close()
    log.warning("pool %r: recreated the missing semaphore with %d free permit(s)", names.name, free)


def remove_pool(names: PoolNames, group: str | None, *, force: bool) -> tuple[list[str], list[str]]:
    """Remove a pool's objects unless someone uses it; return (removed paths, warnings).

    Holds the coordinator and registry locks while removing, so no
    coordinator starts and no worker registers half-way. Raises
    CoordinatorError naming who uses the pool; ``force`` overrides only live
    workers (they keep their connections, outside any budget, until they exit).
    """
    removed: list[str] = []
    warnings: list[str] = []
    try:
        dir_fd = open_directory(names, group, create=False)
    except LedgerError as exc:
        if "no pool directory" not in str(exc):
            raise
        _unlink_semaphores(names, names.stray_semaphores(), os.geteuid(), removed, warnings)
        return removed, warnings
    try:
        info = os.fstat(dir_fd)
        owner = info.st_uid
        if os.geteuid() not in (0, owner):  # GROUP lets a member in, not remove what it cannot finish removing
            raise PoolPermissionError(
                f"pool {names.name!r}: {names.directory} belongs to {describe_user(owner)} (mode "
                f"{info.st_mode & 0o777:04o}); only its owner or root can remove the pool, and this process runs "
                f"as {describe_user(os.geteuid())}"
            )
        lock_fd = open_entry(names, dir_fd, LOCK_FILE, os.O_RDWR | os.O_CREAT, group, owner=owner)
        try:
            if not lock_byte(lock_fd, COORDINATOR_BYTE):
                raise CoordinatorError(
                    f"pool {names.name!r}: a coordinator{_holder(names, group)} runs; stop it first "
                    "(with --remove-on-exit it removes the pool itself when the workers are gone)"
                )
            lock_byte(lock_fd, REGISTRY_BYTE, wait=True)
            if byte_locked(lock_fd, SLOT_LOCK_BASE, 0):
                live = _live_workers(names, group)
                if not force:
                    raise CoordinatorError(
                        f"pool {names.name!r}: live worker(s) use it ({live}); stop them first, or use --force"
                    )
                warnings.append(
                    f"pool {names.name!r}: removed while live worker(s) ({live}) still use it: they keep their "
                    "connections outside any budget until they exit, so the server may see more than the budget"
                )
            token = _token(names, dir_fd)
            for entry in os.listdir(dir_fd):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry, dir_fd=dir_fd)
                    removed.append(names.path(entry))
            with contextlib.suppress(OSError):
                os.rmdir(names.directory)
                removed.append(names.directory)
            sems = [names.semaphore_path(token)] if token else []
            _unlink_semaphores(names, sems + names.stray_semaphores(), owner, removed, warnings)
            unlock_byte(lock_fd, REGISTRY_BYTE)
        finally:
            os.close(lock_fd)
    finally:
        os.close(dir_fd)
    return sorted(set(removed)), warnings


def _unlink_semaphores(names: PoolNames, paths: list[str], owner: int, removed: list[str],
                       warnings: list[str]) -> None:
    """Unlink the semaphore files that belong to the pool's owner; leave (and name) anyone else's."""
    for path in dict.fromkeys(paths):
        try:
            uid = os.lstat(path).st_uid
        except FileNotFoundError:
            continue
        if uid != owner:
            warnings.append(f"pool {names.name!r}: left {path}: it belongs to {describe_user(uid)}, not to the "
                            f"pool's owner {describe_user(owner)}")
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(path)


def _token(names: PoolNames, dir_fd: int) -> int:
    with contextlib.suppress(OSError):
        fd = os.open(LEDGER_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            data = os.pread(fd, HEADER_SIZE, 0)
        finally:
            os.close(fd)
        if len(data) == HEADER_SIZE:
            return Header.from_buffer_copy(data).token
    return 0


def _live_workers(names: PoolNames, group: str | None) -> str:
    pids = _read(names, group, lambda ledger: [s.pid for s in ledger.snapshot().slots if s.alive], None)
    if pids is None:
        return "pids unknown: the ledger is unreadable"
    return "pids " + ", ".join(map(str, pids[:8])) + (" ..." if len(pids) > 8 else "")

