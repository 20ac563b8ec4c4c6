"""Lay out, create, attach and read the shared-memory ledger of one pool.

Imported by workers and by the coordinator. The ledger is a fixed
little-endian layout: a header, then one slot per worker process. A slot's
accounting (held, inflight, waiting, counters, backends) is written only by
its owner process, or by the coordinator once the owner is dead; the one
exception is ``shed_requests``, a hint counter that waiting workers of other
processes bump (pressure.py) and nobody relies on for accounting. Header
fields are written by the coordinator, or under the registry lock (an
``fcntl`` lock on the segment, released by the kernel if its holder dies).
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import grp
import mmap
import os
import stat
import threading
import time
from collections.abc import Iterator

import posix_ipc

from .errors import LedgerError, SlotsExhausted

MAGIC = int.from_bytes(b"SHPOOL01", "little")
LAYOUT_VERSION = 1
DEFAULT_SLOTS = 256
MAX_BACKENDS = 64  # backend pids one slot tracks: also the ceiling of MAX_PER_PROCESS (config.py)

SLOT_FREE = 0
SLOT_ACTIVE = 1

FLAG_BACKENDS_LOCAL = 1  # the slot's backends run on this host: /proc shows when they exit

_u32, _u64, _i32, _f64 = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int32, ctypes.c_double


class Header(ctypes.LittleEndianStructure):
    _fields_ = [
        ("magic", _u64),
        ("version", _u32),
        ("header_size", _u32),
        ("slot_size", _u32),
        ("nslots", _u32),
        ("budget", _u32),
        ("slot_hwm", _u32),
        ("epoch", _u64),
        ("coordinator_pid", _i32),
        ("physical", _u32),  # permits in circulation; the coordinator retires the excess after a cut
        ("coordinator_start", _u64),
        ("heartbeat", _f64),
        ("created", _f64),
        # totals folded in from freed slots (under the registry lock)
        ("grants", _u64),
        ("releases", _u64),
        ("timeouts", _u64),
        ("waits", _u64),
        ("wait_ms", _f64),
        ("sheds", _u64),
        ("opened", _u64),
        ("closed", _u64),
        # coordinator-only counters
        ("reclaimed_permits", _u64),
        ("reclaimed_workers", _u64),
        ("audit_fixes", _u64),
        ("reloads", _u64),
    ]


class Slot(ctypes.LittleEndianStructure):
    _fields_ = [
        ("pid", _i32),
        ("state", _u32),
        ("start_time", _u64),
        ("inflight", _u32),  # permit operations under way: each may hold one permit
        ("held", _u32),
        ("idle", _u32),
        ("in_use", _u32),
        ("waiting", _u32),
        ("flags", _u32),
        ("connecting", _u32),  # connects under way: their backends are not yet recorded
        ("reserved", _u32),
        ("wait_since", _f64),
        ("idle_since", _f64),  # when the least recently used idle connection went idle
        ("shed_requests", _u64),
        ("sheds", _u64),
        ("grants", _u64),
        ("releases", _u64),
        ("timeouts", _u64),
        ("waits", _u64),
        ("wait_ms", _f64),
        ("opened", _u64),
        ("closed", _u64),
        ("backends", _i32 * MAX_BACKENDS),
    ]


SUMMED_COUNTERS = ("grants", "releases", "timeouts", "waits", "wait_ms", "sheds", "opened", "closed")


def ipc_names(name: str) -> tuple[str, str]:
    """Return the (shared memory, semaphore) names of a pool."""
    return f"/sharedpool.{name}", f"/sharedpool.{name}"


def lock_path(name: str) -> str:
    """Return the file a pool's coordinator holds an exclusive ``flock`` on for its whole life."""
    return f"/dev/shm/sharedpool.{name}.lock"


def segment_size(nslots: int) -> int:
    return ctypes.sizeof(Header) + nslots * ctypes.sizeof(Slot)


def proc_stat(pid: int) -> list[bytes] | None:
    """Return the fields of /proc/PID/stat after the command name, or None if it is gone."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm may hold spaces and parentheses: fields resume after the last ')'
    return data[data.rindex(b")") + 2 :].split()


def process_start_time(pid: int) -> int | None:
    """Return the kernel start time of ``pid`` in clock ticks, or None if it is gone."""
    fields = proc_stat(pid)
    return None if fields is None else int(fields[19])


def is_alive(pid: int, start_time: int) -> bool:
    """Tell whether the process that registered as (pid, start_time) still runs.

    A zombie (exited, not yet reaped by its parent) is dead: the kernel has
    already closed its descriptors, so its connections are gone.
    """
    fields = proc_stat(pid)
    return fields is not None and fields[0] not in (b"Z", b"X") and int(fields[19]) == start_time


@dataclasses.dataclass(frozen=True)
class SlotView:
    index: int
    pid: int
    start_time: int
    inflight: int
    held: int
    idle: int
    in_use: int
    waiting: int
    wait_since: float
    idle_since: float
    flags: int
    connecting: int
    shed_requests: int
    counters: dict[str, float]
    backends: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A consistent copy of the ledger, for status, metrics and decisions."""

    name: str
    budget: int
    epoch: int
    coordinator_pid: int
    coordinator_start: int
    heartbeat: float
    physical: int
    reloads: int
    nslots: int
    slots: tuple[SlotView, ...]
    totals: dict[str, float]
    reclaimed_permits: int
    reclaimed_workers: int
    audit_fixes: int
    free: int | None = None

    @property
    def held(self) -> int:
        return sum(s.held for s in self.slots)

    @property
    def waiting(self) -> int:
        return sum(s.waiting for s in self.slots)

    def holders_text(self, limit: int = 8) -> str:
        holders = sorted((s for s in self.slots if s.held), key=lambda s: -s.held)
        parts = [f"pid {s.pid} held {s.held} (idle {s.idle}, in use {s.in_use})" for s in holders[:limit]]
        if len(holders) > limit:
            parts.append(f"... {len(holders) - limit} more")
        return "; ".join(parts) or "no holder recorded"


class Ledger:
    """A mapped ledger and its semaphore. Open lazily, in the process that uses it."""

    def __init__(self, name: str, shm: posix_ipc.SharedMemory, sem: posix_ipc.Semaphore) -> None:
        self.name = name
        self.sem = sem
        self._fd = shm.fd
        self._inode = os.fstat(self._fd).st_ino
        self._map = mmap.mmap(shm.fd, shm.size)
        self.header = Header.from_buffer(self._map)
        self.slots = (Slot * self.header.nslots).from_buffer(self._map, ctypes.sizeof(Header))
        self._thread_lock = threading.Lock()
        self._old_sems: list[posix_ipc.Semaphore] = []
        self._sem_inode = _sem_inode(name)

    # -- creation and attachment -------------------------------------------------

    @classmethod
    def create(cls, name: str, budget: int, *, nslots: int = DEFAULT_SLOTS, group: str | None = None) -> "Ledger":
        """Create the semaphore and the segment exclusively (coordinator only)."""
        shm_name, sem_name = ipc_names(name)
        mode = 0o660 if group else 0o600
        gid = group_id(group) if group else -1  # a bad GROUP fails before anything exists
        sem = posix_ipc.Semaphore(sem_name, posix_ipc.O_CREX, mode=mode, initial_value=budget)
        try:
            shm = posix_ipc.SharedMemory(shm_name, posix_ipc.O_CREX, mode=mode, size=segment_size(nslots))
        except BaseException:
            sem.unlink()
            sem.close()
            raise
        if gid != -1:
            os.fchown(shm.fd, -1, gid)
            os.chown(f"/dev/shm/sem.{sem_name[1:]}", -1, gid)
        header = Header(
            version=LAYOUT_VERSION,
            header_size=ctypes.sizeof(Header),
            slot_size=ctypes.sizeof(Slot),
            nslots=nslots,
            budget=budget,
            physical=budget,
            epoch=1,
            created=time.time(),
        )
        os.pwrite(shm.fd, bytes(header), 0)
        # the magic last: readers trust nothing before it is there
        os.pwrite(shm.fd, MAGIC.to_bytes(ctypes.sizeof(_u64), "little"), Header.magic.offset)
        return cls(name, shm, sem)

    @classmethod
    def attach(cls, name: str, *, group: str | None = None) -> "Ledger":
        """Open an existing ledger and validate it before trusting any field."""
        shm_name, sem_name = ipc_names(name)
        path = f"/dev/shm/{shm_name[1:]}"
        try:
            shm = posix_ipc.SharedMemory(shm_name)
        except posix_ipc.ExistentialError:
            raise LedgerError(f"pool {name!r}: no ledger at {path} (is the coordinator running?)") from None
        except posix_ipc.PermissionsError:
            raise LedgerError(f"pool {name!r}: no permission to open {path}") from None
        try:
            validate_segment(name, shm.fd, path, group)
            try:
                sem = posix_ipc.Semaphore(sem_name)
            except posix_ipc.ExistentialError:
                raise LedgerError(
                    f"pool {name!r}: ledger {path} exists but its semaphore /dev/shm/sem.{sem_name[1:]} is missing"
                ) from None
            return cls(name, shm, sem)
        except BaseException:
            os.close(shm.fd)
            raise

    @classmethod
    def exists(cls, name: str) -> bool:
        return os.path.exists(f"/dev/shm/{ipc_names(name)[0][1:]}")

    def is_current(self) -> bool:
        """Tell whether the name still points at this segment (not unlinked and recreated)."""
        try:
            return os.stat(f"/dev/shm/{ipc_names(self.name)[0][1:]}").st_ino == self._inode
        except FileNotFoundError:
            return False

    def reopen_semaphore(self) -> posix_ipc.Semaphore:
        """Follow the semaphore name to the object a coordinator recreated; return the current one.

        The old handle stays open: another thread may be blocked on it.
        """
        inode = _sem_inode(self.name)
        if inode is None or inode == self._sem_inode:
            return self.sem
        try:
            sem = posix_ipc.Semaphore(ipc_names(self.name)[1])
        except posix_ipc.Error:
            return self.sem
        self._old_sems.append(self.sem)
        self.sem, self._sem_inode = sem, inode
        return sem

    def after_fork_in_child(self) -> None:
        """The mapping stays valid; a lock another thread held at fork would not."""
        self._thread_lock = threading.Lock()

    # -- registry ----------------------------------------------------------------

    @contextlib.contextmanager
    def registry_lock(self) -> Iterator[None]:
        """Serialise slot claims, frees and header totals across processes and threads."""
        with self._thread_lock:
            fcntl.lockf(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def claim_slot(self, pid: int, start_time: int) -> int:
        """Take a free slot, or one whose dead owner holds nothing; return its index."""
        with self.registry_lock():
            header = self.header
            for index in range(header.nslots):
                slot = self.slots[index]
                if slot.state == SLOT_ACTIVE:
                    if slot.held or slot.inflight or is_alive(slot.pid, slot.start_time):
                        continue
                    self._retire(slot)
                ctypes.memset(ctypes.addressof(slot), 0, ctypes.sizeof(Slot))
                slot.pid = pid
                slot.start_time = start_time
                slot.state = SLOT_ACTIVE
                if index >= header.slot_hwm:
                    header.slot_hwm = index + 1
                return index
        raise SlotsExhausted(f"pool {self.name!r}: all {self.header.nslots} worker slots are taken")

    def free_slot(self, index: int) -> None:
        """Fold the slot's counters into the header and free it."""
        with self.registry_lock():
            self._retire(self.slots[index])

    def _retire(self, slot: Slot) -> None:
        header = self.header
        for counter in SUMMED_COUNTERS:
            setattr(header, counter, getattr(header, counter) + getattr(slot, counter))
        ctypes.memset(ctypes.addressof(slot), 0, ctypes.sizeof(Slot))

    # -- reading -------------------------------------------------------------------

    def read_slot(self, index: int) -> Slot:
        """Copy one slot, repeating until two reads agree."""
        size = ctypes.sizeof(Slot)
        offset = ctypes.sizeof(Header) + index * size
        data = self._map[offset : offset + size]
        for _ in range(1000):
            again = self._map[offset : offset + size]
            if again == data:
                break
            data = again
        return Slot.from_buffer_copy(data)

    def raw_slots(self) -> bytes:
        start = ctypes.sizeof(Header)
        return self._map[start : start + self.header.slot_hwm * ctypes.sizeof(Slot)]

    def snapshot(self) -> Snapshot:
        header = Header.from_buffer_copy(self._map[: ctypes.sizeof(Header)])
        views = []
        totals = {counter: getattr(header, counter) for counter in SUMMED_COUNTERS}
        for index in range(header.slot_hwm):
            slot = self.read_slot(index)
            if slot.state != SLOT_ACTIVE:
                continue
            counters = {counter: getattr(slot, counter) for counter in SUMMED_COUNTERS}
            for counter, value in counters.items():
                totals[counter] += value
            views.append(
                SlotView(
                    index=index,
                    pid=slot.pid,
                    start_time=slot.start_time,
                    inflight=slot.inflight,
                    held=slot.held,
                    idle=slot.idle,
                    in_use=slot.in_use,
                    waiting=slot.waiting,
                    wait_since=slot.wait_since,
                    idle_since=slot.idle_since,
                    flags=slot.flags,
                    connecting=slot.connecting,
                    shed_requests=slot.shed_requests,
                    counters=counters,
                    backends=tuple(pid for pid in slot.backends if pid),
                )
            )
        return Snapshot(
            name=self.name,
            budget=header.budget,
            epoch=header.epoch,
            coordinator_pid=header.coordinator_pid,
            coordinator_start=header.coordinator_start,
            heartbeat=header.heartbeat,
            physical=header.physical,
            reloads=header.reloads,
            nslots=header.nslots,
            slots=tuple(views),
            totals=totals,
            reclaimed_permits=header.reclaimed_permits,
            reclaimed_workers=header.reclaimed_workers,
            audit_fixes=header.audit_fixes,
            free=self.sem.value,
        )

    # -- teardown ------------------------------------------------------------------

    def close(self) -> None:
        """Unmap and close this process's handles; the objects stay for others."""
        self.header = self.slots = None
        with contextlib.suppress(BufferError, ValueError):
            self._map.close()
        with contextlib.suppress(OSError):
            os.close(self._fd)
        with contextlib.suppress(posix_ipc.ExistentialError):
            self.sem.close()

    def unlink(self) -> None:
        """Remove the names; mapped processes keep their mapping until they close it."""
        unlink(self.name)


def unlink(name: str) -> list[str]:
    """Remove a pool's segment, semaphore and coordinator lock file; return those that existed.

    A coordinator that still runs keeps its lock on the removed file: only
    remove the names of a pool whose coordinator is gone (or is exiting).
    """
    shm_name, sem_name = ipc_names(name)
    removed = []
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_shared_memory(shm_name)
        removed.append(f"/dev/shm/{shm_name[1:]}")
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_semaphore(sem_name)
        removed.append(f"/dev/shm/sem.{sem_name[1:]}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(lock_path(name))
        removed.append(lock_path(name))
    return removed


def permit_counts(raw_slots: bytes) -> tuple[int, int, int, tuple]:
    """Sum held, inflight and blocked waiters of the active slots, and key their accounting state.

    The key holds only the fields permit operations change (and the slot's
    owner), not hints such as shed requests, so it stays equal while no
    permit moves.
    """
    held = inflight = waiting = 0
    key = []
    for offset in range(0, len(raw_slots), ctypes.sizeof(Slot)):
        slot = Slot.from_buffer_copy(raw_slots, offset)
        if slot.state == SLOT_ACTIVE:
            held += slot.held
            inflight += slot.inflight
            waiting += slot.waiting
            key.append((slot.pid, slot.start_time, slot.held, slot.inflight, slot.waiting, slot.grants, slot.releases))
        else:
            key.append(None)
    return held, inflight, waiting, tuple(key)


def validate_segment(name: str, fd: int, path: str, group: str | None = None) -> None:
    """Refuse a segment that is foreign, truncated, of another version or wrongly owned."""
    info = os.fstat(fd)
    euid = os.geteuid()
    if info.st_uid != euid and euid != 0:
        allowed = group is not None and info.st_gid == group_id(group) and info.st_mode & stat.S_IRWXG
        if not allowed:
            raise LedgerError(
                f"pool {name!r}: {path} is owned by uid {info.st_uid}, not by this user (uid {euid}); "
                "set GROUP to share a pool between users"
            )
    head = ctypes.sizeof(Header)
    if info.st_size < head:
        raise LedgerError(f"pool {name!r}: {path} is truncated ({info.st_size} bytes, header needs {head})")
    header = Header.from_buffer_copy(os.pread(fd, head, 0))
    if header.magic != MAGIC:
        raise LedgerError(f"pool {name!r}: {path} is not a sharedpool ledger (bad magic {header.magic:#018x})")
    if header.version != LAYOUT_VERSION:
        raise LedgerError(
            f"pool {name!r}: {path} has layout version {header.version}, this sharedpool reads version {LAYOUT_VERSION}"
        )
    if header.header_size != head or header.slot_size != ctypes.sizeof(Slot):
        raise LedgerError(f"pool {name!r}: {path} has header/slot sizes {header.header_size}/{header.slot_size}, expected {head}/{ctypes.sizeof(Slot)}")
    if not 0 < header.nslots <= 65536 or info.st_size < segment_size(header.nslots):
        raise LedgerError(
            f"pool {name!r}: {path} is truncated or corrupt ({header.nslots} slots, {info.st_size} bytes)"
        )
    if header.budget == 0 or header.slot_hwm > header.nslots:
        raise LedgerError(f"pool {name!r}: {path} is corrupt (budget {header.budget}, slot_hwm {header.slot_hwm})")


def _sem_inode(name: str) -> int | None:
    try:
        return os.stat(f"/dev/shm/sem.{ipc_names(name)[1][1:]}").st_ino
    except FileNotFoundError:
        return None


def group_id(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise LedgerError(f"GROUP {group!r} is not a group on this host") from None


def coordinator_ready(name: str, group: str | None = None) -> bool:
    """Tell whether a valid ledger exists and a live coordinator has claimed it."""
    try:
        ledger = Ledger.attach(name, group=group)
    except LedgerError:
        return False
    try:
        header = ledger.header
        return bool(header.coordinator_pid) and is_alive(header.coordinator_pid, header.coordinator_start)
    finally:
        ledger.close()
