"""Name a pool's objects, open them without trusting the path, and lock bytes of them.

Any process. Every object of pool NAME lives in one directory,
``/dev/shm/sharedpool.NAME.d`` (mode 0700, 0770 with GROUP), that belongs to
the pool's owner: the ledger, the lock file and the unix sockets of the
coordinator and the workers. Nobody else can create, replace, connect to or
squat anything inside it, and everything in it is opened relative to the
directory with ``O_NOFOLLOW``. The one object that cannot live there is the
POSIX semaphore (``/dev/shm/sem.*``): its name carries a random token kept in
the ledger, so nobody can create it ahead of us, and unlinking by name only
ever removes our own.

The lock file holds open-file-description locks (``F_OFD_SETLK``): byte 0 is
held by the coordinator for its whole life, byte 1 serialises slot claims and
header totals, byte ``SLOT_LOCK_BASE + i`` is held by the owner of slot i.
The kernel drops them when the holder dies, whatever PID namespace it runs
in, which is how the coordinator tells a live worker from a dead one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import grp
import os
import pwd
import stat
import struct

from .errors import LedgerError, PoolPermissionError

SHM_DIR = "/dev/shm"
LEDGER_FILE = "ledger"
LOCK_FILE = "locks"
CONTROL_SOCKET = "control"
COORDINATOR_BYTE = 0
REGISTRY_BYTE = 1
SLOT_LOCK_BASE = 64

_FLOCK = struct.Struct("@hhqqi4x")  # struct flock (Linux, 64-bit off_t)
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


@dataclasses.dataclass(frozen=True)
class PoolNames:
    """Every path and IPC name of one pool, built in one place."""

    name: str

    @property
    def directory(self) -> str:
        return f"{SHM_DIR}/sharedpool.{self.name}.d"

    def path(self, entry: str) -> str:
        return f"{self.directory}/{entry}"

    def semaphore(self, token: int) -> str:
        return f"/sharedpool.{self.name}.{token:016x}"

    def semaphore_path(self, token: int) -> str:
        return f"{SHM_DIR}/sem.sharedpool.{self.name}.{token:016x}"

    def stray_semaphores(self) -> list[str]:
        """Semaphore files of this pool's name left in /dev/shm (any token)."""
        prefix = f"sem.sharedpool.{self.name}."
        with contextlib.suppress(FileNotFoundError):
            return sorted(
                f"{SHM_DIR}/{entry}" for entry in os.listdir(SHM_DIR)
                if entry.startswith(prefix) and len(entry) == len(prefix) + 16
            )
        return []

    @staticmethod
    def worker_socket(index: int) -> str:
        return f"w{index}"


def pool_names_on_host() -> list[str]:
    """Names of the pools whose directory exists on this host."""
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted(e[len("sharedpool."):-2] for e in entries if e.startswith("sharedpool.") and e.endswith(".d"))


def group_id(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise LedgerError(f"GROUP {group!r} is not a group on this host") from None


def modes(group: str | None) -> tuple[int, int]:
    """(directory mode, file mode) for a pool with or without GROUP."""
    return (0o2770, 0o660) if group else (0o700, 0o600)


def describe_user(uid: int) -> str:
    """'name (uid N)', or 'uid N' for a uid with no account."""
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _group_name(gid: int) -> str:
    try:
        return f"{grp.getgrgid(gid).gr_name} (gid {gid})"
    except KeyError:
        return f"gid {gid}"


def check_owned(name: str, info: os.stat_result, path: str, group: str | None, owner: int | None = None,
                *, strict: bool = False) -> None:
    """Refuse an object that is not the pool owner's, or whose mode is wider than configured.

    ``owner`` is the uid of the pool's directory; for the directory itself
    it is None, and the rules are: ours, or shared with us through GROUP.
    A root process never adopts another user's pool unless GROUP says so;
    with ``strict`` (the coordinator) the directory must be our own.
    """
    euid = os.geteuid()
    gid = group_id(group) if group else None
    expected = owner if owner is not None else euid
    shared = owner is None and not strict and gid is not None and info.st_gid == gid
    if info.st_uid != expected and not shared:
        raise PoolPermissionError(
            f"pool {name!r}: {path} belongs to {describe_user(info.st_uid)}, not to {describe_user(expected)}"
            + ("" if owner is not None else f" (this process runs as {describe_user(euid)})")
            + f"; its mode is {info.st_mode & 0o777:04o}, its group {_group_name(info.st_gid)}"
            + "; to share a pool between users set GROUP to a group of both (and start the coordinator "
            "with --group), to keep them apart give this one another NAME"
        )
    dir_mode, file_mode = modes(group)
    allowed = (dir_mode if stat.S_ISDIR(info.st_mode) else file_mode) & 0o777
    if info.st_mode & 0o777 & ~allowed:
        raise PoolPermissionError(
            f"pool {name!r}: {path} has mode {info.st_mode & 0o777:04o}, wider than {allowed:04o}"
            + (f" (GROUP {group})" if group else " (no GROUP configured)")
            + f"; owner {describe_user(info.st_uid)}, group {_group_name(info.st_gid)}. Remove it with "
            f"`sharedpool cleanup --name {name}` or fix GROUP"
        )
    if gid is not None and info.st_gid != gid:
        raise PoolPermissionError(
            f"pool {name!r}: {path} belongs to group {_group_name(info.st_gid)}, not to GROUP {group!r}; "
            f"remove it with `sharedpool cleanup --name {name}` or fix GROUP"
        )


def open_directory(names: PoolNames, group: str | None, *, create: bool, strict: bool = False) -> int:
    """Open (creating it if asked) the pool's directory and prove it is the pool's; return its fd."""
    path = names.directory
    dir_mode, _ = modes(group)
    gid = group_id(group) if group else -1  # a bad GROUP fails before anything exists
    created = False
    if create:
        try:
            os.mkdir(path, 0o700)  # widened below with fchmod, whatever the umask
            created = True
        except FileExistsError:
            pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _OPEN_FLAGS)
    except FileNotFoundError:
        raise LedgerError(f"pool {names.name!r}: no pool directory {path} (is the coordinator running?)") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise PoolPermissionError(f"pool {names.name!r}: {path} is not a directory (a symlink or a file put there by "
                              "someone else?); remove it or pick another NAME") from None
        if exc.errno == errno.EACCES:
            raise PoolPermissionError(f"pool {names.name!r}: no permission to open {path}; {_describe(path)}") from None
        raise
    try:
        if created:
            os.fchmod(fd, dir_mode)
            if group:
                os.fchown(fd, -1, gid)
        check_owned(names.name, os.fstat(fd), path, group, strict=strict)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _describe(path: str) -> str:
    try:
        info = os.lstat(path)
    except OSError:
        return "it vanished"
    return (f"it belongs to {describe_user(info.st_uid)}, group {_group_name(info.st_gid)}, mode {info.st_mode & 0o777:04o}; "
            "set GROUP to share a pool between users, or give this one another NAME")


def open_entry(names: PoolNames, dir_fd: int, entry: str, flags: int, group: str | None, *, owner: int) -> int:
    """Open a file inside the pool directory without following links; prove it is the pool's."""
    _, file_mode = modes(group)
    path = names.path(entry)
    try:
        fd, created = _open_or_create(entry, flags, file_mode, dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PoolPermissionError(f"pool {names.name!r}: {path} is a symlink; refusing to follow it") from None
        if exc.errno == errno.EACCES:
            raise PoolPermissionError(f"pool {names.name!r}: no permission to open {path}; {_describe(path)}") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise LedgerError(f"pool {names.name!r}: {path} is not a regular file")
        if created:
            os.fchmod(fd, file_mode)
            if group:
                os.fchown(fd, -1, group_id(group))
            info = os.fstat(fd)
        check_owned(names.name, info, path, group, owner)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_or_create(entry: str, flags: int, file_mode: int, dir_fd: int) -> tuple[int, bool]:
    """Open ``entry``; with O_CREAT, tell whether this call created it (its mode is then ours to set)."""
    if not flags & os.O_CREAT or flags & os.O_EXCL:
        return os.open(entry, flags | _OPEN_FLAGS, file_mode, dir_fd=dir_fd), bool(flags & os.O_CREAT)
    for _ in range(100):
        try:
            return os.open(entry, flags | os.O_EXCL | _OPEN_FLAGS, file_mode, dir_fd=dir_fd), True
        except FileExistsError:
            pass
        try:
            return os.open(entry, flags & ~os.O_CREAT | _OPEN_FLAGS, dir_fd=dir_fd), False
        except FileNotFoundError:
            continue  # removed between the two opens: create it after all
    raise FileExistsError(errno.EEXIST, "appears and vanishes repeatedly", entry)


# -- open-file-description locks -----------------------------------------------------


def lock_byte(fd: int, offset: int, *, wait: bool = False) -> bool:
    """Take an exclusive OFD lock on one byte; False if another description holds it (no wait)."""
    request = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, request)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def unlock_byte(fd: int, offset: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, offset, 1, 0))


def byte_locked(fd: int, offset: int, length: int = 1) -> bool:
    """Tell whether another open file description holds a lock in the range (its holder is alive).

    ``length`` 0 means every byte from ``offset`` on.
    """
    request = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, length, 0)
    kind = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_OFD_GETLK, request))[0]
    return kind != fcntl.F_UNLCK


def locked_bytes(fd: int, start: int, count: int) -> set[int]:
    """The offsets in [start, start + count) that another open file description holds locked.

    F_OFD_GETLK reports one conflicting lock, not necessarily the lowest, so
    the ranges on both sides of it are asked again: one call per held range
    plus one per gap, not one per byte.
    """
    held: set[int] = set()
    ranges = [(start, start + count)]
    while ranges:
        low, high = ranges.pop()
        if low >= high:
            continue
        request = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, low, high - low, 0)
        kind, _, lock_start, lock_len, _ = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_OFD_GETLK, request))
        if kind == fcntl.F_UNLCK:
            continue
        first = max(lock_start, low)
        stop = high if lock_len == 0 else min(high, lock_start + lock_len)
        held.update(range(first, stop))
        ranges += [(low, first), (stop, high)]
    return held
