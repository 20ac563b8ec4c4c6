"""Lay out, create, attach and read the shared-memory ledger of one pool.

Imported by workers and by the coordinator. The ledger is a regular file in
the pool's directory (names.py), mapped by every process: a fixed
little-endian header, then one slot per worker process. A slot is written
only by its owner's ``SlotAccount`` (account.py), or freed by the coordinator
once the owner is dead. Header fields are published by the coordinator,
which keeps its own copy of each and never trusts what it reads back;
totals folded from freed slots are written under the registry lock.

Nothing read from the mapping is trusted: the size is checked before mapping
and the header before any slot is touched; each process keeps its own copy of
the slot count; a slot's accounting carries a keyed check value, so the
coordinator acts only on numbers their owner wrote.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import mmap
import os
import secrets
import stat
import threading
import time
from collections.abc import Iterator

import posix_ipc

from .errors import LedgerError, SlotsExhausted
from .names import (
    COORDINATOR_BYTE,
    LEDGER_FILE,
    LOCK_FILE,
    REGISTRY_BYTE,
    SLOT_LOCK_BASE,
    PoolNames,
    byte_locked,
    check_owned,
    group_id,
    locked_bytes,
    lock_byte,
    modes,
    open_directory,
    open_entry,
    unlock_byte,
)

MAGIC = int.from_bytes(b"SHPOOL02", "little")
LAYOUT_VERSION = 2
DEFAULT_SLOTS = 256
MAX_SLOTS = 65536
MAX_BACKENDS = 64  # backend pids one slot tracks: also the ceiling of MAX_PER_PROCESS (config.py)
MAX_BUDGET = 100_000

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
        ("token", _u64),  # random per creation: names the semaphore, keys the slot checks
        ("coordinator_pid", _i32),
        ("physical", _u32),  # permits in circulation; above the budget while a cut is retired
        ("coordinator_start", _u64),
        ("heartbeat", _f64),
        ("created", _f64),
        ("retire_debt", _u32),  # permits a returning worker keeps instead of posting (budget cut)
        ("hold", _u32),  # nonzero: waiters poll instead of blocking, so the coordinator can count exactly
        # totals folded in from freed slots (under the registry lock)
        ("grants", _u64),
        ("releases", _u64),
        ("timeouts", _u64),
        ("waits", _u64),
        ("wait_ms", _f64),
        ("sheds", _u64),
        ("opened", _u64),
        ("closed", _u64),
        ("retired", _u64),
        # coordinator-only counters
        ("reclaimed_permits", _u64),
        ("reclaimed_workers", _u64),
        ("audit_fixes", _u64),
        ("reloads", _u64),
        ("dropped_messages", _u64),
    ]


class Slot(ctypes.LittleEndianStructure):
    _fields_ = [
        ("pid", _i32),  # as the owner sees it, in its own PID namespace
        ("state", _u32),
        ("start_time", _u64),
        ("pid_ns", _u64),  # inode of the owner's PID namespace
        ("check", _u32),  # keyed check of pid, held, inflight, waiting (account.seal)
        ("inflight", _u32),  # permit operations under way: each may hold one permit
        ("held", _u32),
        ("idle", _u32),
        ("in_use", _u32),
        ("waiting", _u32),  # threads waiting for a permit
        ("local_waiting", _u32),  # threads queued inside the process (MAX_PER_PROCESS)
        ("flags", _u32),
        ("connecting", _u32),  # connects under way: their backends are not yet recorded
        ("retired", _u32),
        ("wait_since", _f64),
        ("idle_since", _f64),  # when the least recently used idle connection went idle
        ("shed_received", _u64),
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


SUMMED_COUNTERS = ("grants", "releases", "timeouts", "waits", "wait_ms", "sheds", "opened", "closed", "retired")
HEADER_SIZE = ctypes.sizeof(Header)
SLOT_SIZE = ctypes.sizeof(Slot)


def segment_size(nslots: int) -> int:
    return HEADER_SIZE + nslots * SLOT_SIZE


def seal(key: int, pid: int, held: int, inflight: int, waiting: int) -> int:
    """The check value of a slot's permit accounting; random bytes match it once in 2**32."""
    return (key ^ pid * 0x9E3779B1 ^ held * 0x85EBCA77 ^ inflight * 0xC2B2AE3D ^ waiting * 0x27D4EB2F) & 0xFFFFFFFF


def slot_key(token: int, start_time: int) -> int:
    return (token ^ token >> 32 ^ start_time * 0x165667B1) & 0xFFFFFFFF


def sealed(token: int, slot: Slot) -> bool:
    return slot.check == seal(slot_key(token, slot.start_time), slot.pid, slot.held, slot.inflight, slot.waiting)


# -- processes -------------------------------------------------------------------------


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
    """Tell whether the process that registered as (pid, start_time) still runs (in our PID namespace).

    A zombie (exited, not yet reaped by its parent) is dead: the kernel has
    already closed its descriptors, so its connections are gone.
    """
    fields = proc_stat(pid)
    return fields is not None and fields[0] not in (b"Z", b"X") and int(fields[19]) == start_time


def pid_namespace() -> int:
    """The inode of this process's PID namespace: pids mean something only inside one."""
    return os.stat("/proc/self/ns/pid").st_ino


@dataclasses.dataclass(frozen=True)
class SlotView:
    index: int
    pid: int
    start_time: int
    pid_ns: int
    alive: bool  # its owner holds the slot's lock
    verified: bool  # the permit accounting carries its owner's check value
    inflight: int
    held: int
    idle: int
    in_use: int
    waiting: int
    local_waiting: int
    wait_since: float
    idle_since: float
    flags: int
    connecting: int
    retired: int
    shed_received: int
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
    coordinator_alive: bool
    heartbeat: float
    physical: int
    retire_debt: int
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


def _pread(fd: int, size: int, offset: int) -> bytes:
    """Read at ``offset``; a truncated file reads as zeros past its end (never SIGBUS)."""
    data = os.pread(fd, size, offset)
    return data if len(data) == size else data.ljust(size, b"\0")


class FileHeader:
    """The header through pread/pwrite, field by field: what the coordinator uses instead of a mapping.

    Truncating the file cannot kill a process that never touches the mapping.
    """

    def __init__(self, fd: int) -> None:
        object.__setattr__(self, "_fd", fd)

    def __getattr__(self, name: str):
        field = getattr(Header, name)
        scratch = bytearray(HEADER_SIZE)
        scratch[field.offset : field.offset + field.size] = _pread(self._fd, field.size, field.offset)
        return getattr(Header.from_buffer(scratch), name)

    def __setattr__(self, name: str, value) -> None:
        field = getattr(Header, name)
        scratch = Header()
        setattr(scratch, name, value)
        os.pwrite(self._fd, bytes(scratch)[field.offset : field.offset + field.size], field.offset)


class FileSlots:
    """Copies of slots through pread (coordinator): reading one never faults on a truncated file."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __getitem__(self, index: int) -> Slot:
        return Slot.from_buffer_copy(_pread(self._fd, SLOT_SIZE, HEADER_SIZE + index * SLOT_SIZE))


class Ledger:
    """A ledger, its lock file and its semaphore. Open lazily, in the process that uses it.

    Workers map it (``mapped``): the hot path writes their slot in place.
    The coordinator and the commands read and write through the file
    (FileHeader, FileSlots), so a truncated ledger cannot kill them.
    """

    def __init__(self, names: PoolNames, dir_fd: int, fd: int, locks_fd: int, sem: posix_ipc.Semaphore,
                 nslots: int, token: int, group: str | None, mapped: bool = True) -> None:
        self.names = names
        self.name = names.name
        self.group = group
        self.dir_fd = dir_fd
        self.sem = sem
        self.nslots = nslots  # our own copy: the header's may be overwritten by anyone
        self.token = token
        self.size = segment_size(nslots)
        self._fd = fd
        self.locks_fd = locks_fd
        self._inode = os.fstat(fd).st_ino
        self._owner = os.fstat(dir_fd).st_uid
        self.mapped = mapped
        if mapped:
            self._map = mmap.mmap(fd, self.size)
            self.header = Header.from_buffer(self._map)
            self.slots = (Slot * nslots).from_buffer(self._map, HEADER_SIZE)
        else:
            self._map = None
            self.header = FileHeader(fd)
            self.slots = FileSlots(fd)
        self._thread_lock = threading.Lock()
        self._claimed: set[int] = set()  # slots locked through our own description: locking them again succeeds
        self._old_sems: list[posix_ipc.Semaphore] = []
        self._sem_inode = _inode(names.semaphore_path(token))

    # -- creation and attachment -------------------------------------------------

    @classmethod
    def create(cls, name: str, budget: int, *, nslots: int = DEFAULT_SLOTS, group: str | None = None,
               dir_fd: int | None = None, mapped: bool = True) -> "Ledger":
        """Create the ledger file and a semaphore with a fresh token (coordinator, under its lock).

        Raises FileExistsError when a ledger file is already there (adopt it instead).
        """
        names = PoolNames(name)
        own_dir = dir_fd is None
        if own_dir:
            dir_fd = open_directory(names, group, create=True)
        owner = os.fstat(dir_fd).st_uid
        fd = locks_fd = -1
        sem = None
        try:
            fd = open_entry(names, dir_fd, LEDGER_FILE, os.O_RDWR | os.O_CREAT | os.O_EXCL, group, owner=owner)
            locks_fd = open_entry(names, dir_fd, LOCK_FILE, os.O_RDWR | os.O_CREAT, group, owner=owner)
            os.ftruncate(fd, segment_size(nslots))
            token = secrets.randbits(64) or 1
            sem = posix_ipc.Semaphore(names.semaphore(token), posix_ipc.O_CREX, mode=modes(group)[1],
                                      initial_value=budget)
            _fix_semaphore_mode(names, token, group)
            header = Header(
                version=LAYOUT_VERSION, header_size=HEADER_SIZE, slot_size=SLOT_SIZE, nslots=nslots,
                budget=budget, physical=budget, epoch=1, token=token, created=time.time(),
            )
            os.pwrite(fd, bytes(header), 0)
            # the magic last: readers trust nothing before it is there
            os.pwrite(fd, MAGIC.to_bytes(8, "little"), Header.magic.offset)
            return cls(names, dir_fd, fd, locks_fd, sem, nslots, token, group, mapped)
        except BaseException:
            if sem is not None:
                sem.unlink()
                sem.close()
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.unlink(LEDGER_FILE, dir_fd=dir_fd)
                os.close(fd)
            if locks_fd >= 0:
                os.close(locks_fd)
            if own_dir:
                os.close(dir_fd)
            raise

    @classmethod
    def attach(cls, name: str, *, group: str | None = None, mapped: bool = True) -> "Ledger":
        """Open an existing ledger and validate it before trusting any field."""
        names = PoolNames(name)
        dir_fd = open_directory(names, group, create=False)
        fd = locks_fd = -1
        try:
            owner = os.fstat(dir_fd).st_uid
            try:
                fd = open_entry(names, dir_fd, LEDGER_FILE, os.O_RDWR, group, owner=owner)
            except FileNotFoundError:
                raise LedgerError(f"pool {name!r}: no ledger in {names.directory} (is the coordinator running?)") from None
            header = validate_segment(names, fd)
            locks_fd = open_entry(names, dir_fd, LOCK_FILE, os.O_RDWR, group, owner=owner)
            sem = open_semaphore(names, header.token, group, owner)
            return cls(names, dir_fd, fd, locks_fd, sem, header.nslots, header.token, group, mapped)
        except FileNotFoundError as exc:
            raise LedgerError(f"pool {name!r}: {exc.filename or 'a file'} vanished while attaching") from None
        except BaseException:
            for handle in (fd, locks_fd, dir_fd):
                if handle >= 0:
                    os.close(handle)
            raise

    @classmethod
    def exists(cls, name: str) -> bool:
        return os.path.lexists(PoolNames(name).path(LEDGER_FILE))

    def is_current(self) -> bool:
        """Tell whether the name still points at this ledger (not removed, not recreated)."""
        try:
            return os.stat(self.names.path(LEDGER_FILE), follow_symlinks=False).st_ino == self._inode
        except FileNotFoundError:
            return False

    def intact(self) -> bool:
        """Tell whether the file still covers our mapping (touching a truncated page is SIGBUS)."""
        return os.fstat(self._fd).st_size >= self.size

    def restore_size(self) -> None:
        """Grow a truncated ledger back to its size (coordinator); lost pages come back as zeros."""
        os.ftruncate(self._fd, self.size)

    def reopen_semaphore(self) -> posix_ipc.Semaphore:
        """Follow the semaphore name to the object a coordinator recreated; return the current one.

        The old handle stays open: another thread may be blocked on it.
        """
        inode = _inode(self.names.semaphore_path(self.token))
        if inode is None or inode == self._sem_inode:
            return self.sem
        try:
            sem = open_semaphore(self.names, self.token, self.group, self._owner)
        except LedgerError:
            return self.sem
        self._old_sems.append(self.sem)
        self.sem, self._sem_inode = sem, inode
        return sem

    def after_fork_in_child(self) -> None:
        """Take our own lock-file description: the inherited one is shared with the parent's locks."""
        self._thread_lock = threading.Lock()
        self._claimed = set()
        old = self.locks_fd
        try:
            self.locks_fd = os.open(LOCK_FILE, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd)
        except OSError:
            self.locks_fd = -1  # the pool was removed meanwhile: this ledger is of no use to the child
        os.close(old)  # the parent's description (and its locks) lives on in the parent

    # -- registry ----------------------------------------------------------------

    @contextlib.contextmanager
    def registry_lock(self) -> Iterator[None]:
        """Serialise slot claims, frees and header totals across processes and threads."""
        with self._thread_lock:
            lock_byte(self.locks_fd, REGISTRY_BYTE, wait=True)
            try:
                yield
            finally:
                unlock_byte(self.locks_fd, REGISTRY_BYTE)

    def claim_slot(self, pid: int, start_time: int, pid_ns: int) -> int:
        """Take a free slot (its lock byte free and nothing recorded in it); return its index.

        Taking the slot's lock is the claim: it stays held for the life of
        this process, and the kernel drops it when the process dies.
        """
        with self.registry_lock():
            header = self.header
            for index in range(self.nslots):
                if index in self._claimed or not lock_byte(self.locks_fd, SLOT_LOCK_BASE + index):
                    continue  # a live owner
                slot = self.slots[index]
                if slot.state != SLOT_FREE and (slot.held or slot.inflight or slot.connecting):
                    unlock_byte(self.locks_fd, SLOT_LOCK_BASE + index)  # dead, not yet reclaimed
                    continue
                self._retire(index)
                slot.pid = pid
                slot.start_time = start_time
                slot.pid_ns = pid_ns
                slot.state = SLOT_ACTIVE
                if not index < header.slot_hwm <= self.nslots:
                    header.slot_hwm = max(index + 1, min(header.slot_hwm, self.nslots))
                self._claimed.add(index)
                return index
        raise SlotsExhausted(f"pool {self.name!r}: all {self.nslots} worker slots are taken")

    def free_slot(self, index: int) -> None:
        """Fold the slot's counters into the header, free it and drop its lock (its owner, at exit)."""
        with self.registry_lock():
            self._retire(index)
            unlock_byte(self.locks_fd, SLOT_LOCK_BASE + index)
            self._claimed.discard(index)

    def retire_dead_slot(self, index: int) -> None:
        """Free the slot of a dead owner (coordinator, under the registry lock, its permits dealt with)."""
        if not self.slot_alive(index):
            self._retire(index)

    def _retire(self, index: int) -> None:
        """Fold a slot's counters into the header totals and zero it (under the registry lock)."""
        if self.mapped:
            slot, header = self.slots[index], self.header
            for counter in SUMMED_COUNTERS:
                setattr(header, counter, getattr(header, counter) + getattr(slot, counter))
            ctypes.memset(ctypes.addressof(slot), 0, SLOT_SIZE)
            return
        slot, header = self.slots[index], Header.from_buffer_copy(_pread(self._fd, HEADER_SIZE, 0))
        for counter in SUMMED_COUNTERS:
            setattr(self.header, counter, getattr(header, counter) + getattr(slot, counter))
        os.pwrite(self._fd, bytes(SLOT_SIZE), HEADER_SIZE + index * SLOT_SIZE)

    def slot_alive(self, index: int) -> bool:
        """Tell whether a live process holds slot ``index`` (any PID namespace)."""
        return byte_locked(self.locks_fd, SLOT_LOCK_BASE + index)

    def coordinator_alive(self) -> bool:
        return byte_locked(self.locks_fd, COORDINATOR_BYTE)

    def scan_limit(self) -> int:
        """How many slots to scan: the published high-water mark, never past our own slot count."""
        hwm = self.header.slot_hwm
        return hwm if hwm <= self.nslots else self.nslots

    # -- reading -------------------------------------------------------------------

    def read_slot(self, index: int) -> Slot:
        """Copy one slot, repeating until two reads agree."""
        offset = HEADER_SIZE + index * SLOT_SIZE
        data = _pread(self._fd, SLOT_SIZE, offset)
        for _ in range(1000):
            again = _pread(self._fd, SLOT_SIZE, offset)
            if again == data:
                break
            data = again
        return Slot.from_buffer_copy(data)

    def raw_slots(self) -> bytes:
        return _pread(self._fd, self.nslots * SLOT_SIZE, HEADER_SIZE)

    def read_header(self) -> Header:
        return Header.from_buffer_copy(_pread(self._fd, HEADER_SIZE, 0))

    def stable_slots(self) -> tuple[bytes, int, set[int]]:
        """The raw slots, the free permits and the live slots, read until the slots were identical around
        the other two reads (no permit operation completed in between)."""
        for _ in range(100):
            raw = self.raw_slots()
            alive = {offset - SLOT_LOCK_BASE for offset in locked_bytes(self.locks_fd, SLOT_LOCK_BASE, self.nslots)}
            free = self.sem.value
            if self.raw_slots() == raw:
                break
        return raw, free, alive

    def snapshot(self) -> Snapshot:
        """A consistent view, for status, metrics and timeouts' messages."""
        raw, free, alive_slots = self.stable_slots()
        header = self.read_header()
        views = []
        totals = {counter: getattr(header, counter) for counter in SUMMED_COUNTERS}
        for index in range(self.nslots):
            slot = Slot.from_buffer_copy(raw, index * SLOT_SIZE)
            alive = index in alive_slots or index in self._claimed
            if slot.state == SLOT_FREE and not alive:
                continue
            view = view_of(index, slot, alive, sealed(self.token, slot))
            for counter, value in view.counters.items():
                totals[counter] += value
            views.append(view)
        return Snapshot(
            name=self.name,
            budget=header.budget,
            epoch=header.epoch,
            coordinator_pid=header.coordinator_pid,
            coordinator_start=header.coordinator_start,
            coordinator_alive=self.coordinator_alive(),
            heartbeat=header.heartbeat,
            physical=header.physical,
            retire_debt=header.retire_debt,
            reloads=header.reloads,
            nslots=self.nslots,
            slots=tuple(views),
            totals=totals,
            reclaimed_permits=header.reclaimed_permits,
            reclaimed_workers=header.reclaimed_workers,
            audit_fixes=header.audit_fixes,
            free=free,
        )

    # -- teardown ------------------------------------------------------------------

    def close(self) -> None:
        """Unmap and close this process's handles; the objects stay for others."""
        self.header = self.slots = None
        if self._map is not None:
            with contextlib.suppress(BufferError, ValueError):
                self._map.close()
        for fd in (self._fd, self.locks_fd, self.dir_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(posix_ipc.ExistentialError):
            self.sem.close()

    def unlink_own(self) -> list[str]:
        """Remove this ledger's objects, but only while the names still point at them."""
        removed = []
        if self.is_current():
            for entry in os.listdir(self.dir_fd):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry, dir_fd=self.dir_fd)
            with contextlib.suppress(OSError):
                os.rmdir(self.names.directory)
                removed.append(self.names.directory)
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_semaphore(self.names.semaphore(self.token))
            removed.append(self.names.semaphore_path(self.token))
        return removed


def view_of(index: int, slot: Slot, alive: bool, verified: bool) -> SlotView:
    return SlotView(
        index=index, pid=slot.pid, start_time=slot.start_time, pid_ns=slot.pid_ns, alive=alive,
        verified=verified, inflight=slot.inflight, held=slot.held, idle=slot.idle, in_use=slot.in_use,
        waiting=slot.waiting, local_waiting=slot.local_waiting, wait_since=slot.wait_since,
        idle_since=slot.idle_since, flags=slot.flags, connecting=slot.connecting, retired=slot.retired,
        shed_received=slot.shed_received,
        counters={counter: getattr(slot, counter) for counter in SUMMED_COUNTERS},
        backends=tuple(pid for pid in slot.backends if pid > 0),
    )


def validate_segment(names: PoolNames, fd: int) -> Header:
    """Refuse a ledger file that is foreign, truncated or of another version; return its header."""
    path = names.path(LEDGER_FILE)
    size = os.fstat(fd).st_size
    if size < HEADER_SIZE:
        raise LedgerError(f"pool {names.name!r}: {path} is truncated ({size} bytes, the header needs {HEADER_SIZE})")
    header = Header.from_buffer_copy(os.pread(fd, HEADER_SIZE, 0))
    if header.magic != MAGIC:
        raise LedgerError(f"pool {names.name!r}: {path} is not a sharedpool ledger (bad magic {header.magic:#018x})")
    if header.version != LAYOUT_VERSION:
        raise LedgerError(
            f"pool {names.name!r}: {path} has layout version {header.version}, this sharedpool reads version {LAYOUT_VERSION}"
        )
    if header.header_size != HEADER_SIZE or header.slot_size != SLOT_SIZE:
        raise LedgerError(f"pool {names.name!r}: {path} has header/slot sizes {header.header_size}/"
                          f"{header.slot_size}, expected {HEADER_SIZE}/{SLOT_SIZE}")
    if not 0 < header.nslots <= MAX_SLOTS or size < segment_size(header.nslots):
        raise LedgerError(f"pool {names.name!r}: {path} is truncated or corrupt ({header.nslots} slots, {size} bytes)")
    if not 0 < header.budget <= MAX_BUDGET or header.token == 0:
        raise LedgerError(f"pool {names.name!r}: {path} is corrupt (budget {header.budget}, token {header.token:#x})")
    return header


def open_semaphore(names: PoolNames, token: int, group: str | None, owner: int) -> posix_ipc.Semaphore:
    """Open the pool's semaphore after proving its file is the owner's and no wider than configured."""
    path = names.semaphore_path(token)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise LedgerError(f"pool {names.name!r}: the ledger's semaphore {path} is missing") from None
    if not stat.S_ISREG(info.st_mode):
        raise LedgerError(f"pool {names.name!r}: {path} is not a semaphore file")
    check_owned(names.name, info, path, group, owner)
    try:
        return posix_ipc.Semaphore(names.semaphore(token))
    except posix_ipc.PermissionsError:
        raise LedgerError(f"pool {names.name!r}: no permission to open {path}") from None
    except posix_ipc.ExistentialError:
        raise LedgerError(f"pool {names.name!r}: the ledger's semaphore {path} is missing") from None


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _fix_semaphore_mode(names: PoolNames, token: int, group: str | None) -> None:
    """Set the semaphore file's mode and group whatever the umask (sem_open applies it)."""
    path = names.semaphore_path(token)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(fd, modes(group)[1])
        if group:
            os.fchown(fd, -1, group_id(group))
    finally:
        os.close(fd)
