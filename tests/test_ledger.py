"""The ledger in one process: layout, modes, validation of foreign or broken files, slots, liveness."""
from __future__ import annotations

import ctypes
import os
import stat
import subprocess
import sys

import pytest

from sharedpool.errors import LedgerError, PoolPermissionError, SlotsExhausted
from sharedpool.ledger import (
    LAYOUT_VERSION,
    MAGIC,
    SLOT_ACTIVE,
    Header,
    Ledger,
    is_alive,
    pid_namespace,
    process_start_time,
    seal,
    sealed,
    segment_size,
    slot_key,
)
from sharedpool.names import PoolNames


@pytest.fixture
def ledger(make_ledger):
    return make_ledger(3)


def _me() -> tuple[int, int, int]:
    return os.getpid(), process_start_time(os.getpid()), pid_namespace()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_ledger(names: PoolNames, data: bytes) -> None:
    os.makedirs(names.directory, mode=0o700, exist_ok=True)
    for entry in ("ledger", "locks"):
        fd = os.open(names.path(entry), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, data if entry == "ledger" else b"")
        os.close(fd)


def test_create_lays_out_header_and_private_objects(make_ledger, unique_name):
    old = os.umask(0)  # the modes must not depend on the caller's umask
    try:
        ledger = make_ledger(3)
    finally:
        os.umask(old)
    names = PoolNames(unique_name)
    header = ledger.header
    assert (header.magic, header.version, header.budget, header.physical, header.nslots) == (MAGIC, LAYOUT_VERSION, 3, 3, 8)
    assert header.token and ledger.sem.value == 3
    assert stat.S_IMODE(os.stat(names.directory).st_mode) == 0o700
    for path in (names.path("ledger"), names.path("locks"), names.semaphore_path(header.token)):
        info = os.stat(path)
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.geteuid(), path
    assert os.path.getsize(names.path("ledger")) == segment_size(8)
    with pytest.raises(FileExistsError):
        Ledger.create(unique_name, 3, nslots=8)


def test_attach_sees_the_same_memory(ledger, unique_name):
    other = Ledger.attach(unique_name)
    try:
        ledger.header.heartbeat = 123.5
        assert other.header.heartbeat == 123.5 and other.nslots == 8 and other.token == ledger.token
    finally:
        other.close()


def test_attach_missing_names_the_path(unique_name):
    with pytest.raises(LedgerError, match=rf"pool '{unique_name}': no pool directory /dev/shm/sharedpool\.{unique_name}\.d"):
        Ledger.attach(unique_name)


def _header(**fields) -> bytes:
    values = dict(magic=MAGIC, version=LAYOUT_VERSION, header_size=ctypes.sizeof(Header), slot_size=0, nslots=4,
                  budget=2, token=7)
    from sharedpool.ledger import SLOT_SIZE

    values["slot_size"] = SLOT_SIZE
    values.update(fields)
    return bytes(Header(**values))


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", r"is truncated \(0 bytes"),
        (b"x" * 300, "is not a sharedpool ledger"),
        (_header(version=99) + bytes(segment_size(4)), "has layout version 99"),
        (_header(), r"truncated or corrupt \(4 slots"),
        (_header(nslots=10**6) + bytes(segment_size(4)), "truncated or corrupt"),
        (_header(budget=0) + bytes(segment_size(4)), r"is corrupt \(budget 0"),
    ],
)
def test_attach_refuses_foreign_or_corrupt_ledgers(unique_name, data, message):
    names = PoolNames(unique_name)
    try:
        _write_ledger(names, data)
        with pytest.raises(LedgerError, match=message):
            Ledger.attach(unique_name)
    finally:
        from helpers_procs import remove_pool_objects

        remove_pool_objects(unique_name)


def test_symlinked_ledger_is_not_followed(unique_name, tmp_path):
    names = PoolNames(unique_name)
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    try:
        os.makedirs(names.directory, mode=0o700)
        os.symlink(target, names.path("ledger"))
        with pytest.raises(PoolPermissionError, match="is a symlink; refusing to follow it"):
            Ledger.attach(unique_name)
        with pytest.raises(FileExistsError):  # the coordinator then adopts: attach refuses as above
            Ledger.create(unique_name, 2)
        assert target.read_bytes() == b"precious"
    finally:
        from helpers_procs import remove_pool_objects

        remove_pool_objects(unique_name)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root (CI runs as root)")
def test_foreign_owner_and_wide_modes_are_refused(ledger, unique_name):
    names = PoolNames(unique_name)
    os.chown(names.path("ledger"), 65534, -1)
    with pytest.raises(PoolPermissionError, match=r"belongs to nobody \(uid 65534\), not to root \(uid 0\)"):
        Ledger.attach(unique_name)
    os.chown(names.path("ledger"), 0, -1)
    os.chmod(names.path("ledger"), 0o666)
    with pytest.raises(PoolPermissionError, match=r"has mode 0666, wider than 0600 \(no GROUP configured\)"):
        Ledger.attach(unique_name)
    os.chmod(names.path("ledger"), 0o600)
    os.chown(names.directory, 65534, -1)
    with pytest.raises(PoolPermissionError, match="set GROUP to a group of both"):
        Ledger.attach(unique_name)
    os.chown(names.directory, 0, -1)
    Ledger.attach(unique_name).close()  # back to ours: accepted


def test_claim_and_free_slots(ledger):
    a, b = ledger.claim_slot(*_me()), ledger.claim_slot(*_me())
    assert (a, b) == (0, 1) and ledger.slots[a].state == SLOT_ACTIVE
    assert ledger.slot_alive(a) is False  # our own lock: only other descriptions see it held
    other = Ledger.attach(ledger.name)
    try:
        assert other.slot_alive(a) and other.slot_alive(b) and not other.slot_alive(2)
        assert other.claim_slot(*_me()) == 2  # a and b are locked by a live holder
        ledger.free_slot(a)
        assert not other.slot_alive(a)
        assert other.claim_slot(*_me()) == a
    finally:
        other.close()


def test_dead_holder_slot_waits_for_reclaim(ledger):
    other = Ledger.attach(ledger.name)
    index = other.claim_slot(_dead_pid(), 1, 1)
    other.slots[index].held = 1
    other.close()  # the "process" dies: its lock goes, its permit is still recorded
    assert not ledger.slot_alive(index)
    assert ledger.claim_slot(*_me()) == index + 1  # not reused before the coordinator reclaims it


def test_slots_exhausted_names_the_pool(ledger, unique_name):
    for _ in range(8):
        ledger.claim_slot(*_me())
    with pytest.raises(SlotsExhausted, match=rf"pool '{unique_name}': all 8 worker slots are taken"):
        ledger.claim_slot(*_me())


def test_check_value_detects_scribbles(ledger):
    index = ledger.claim_slot(*_me())
    slot = ledger.slots[index]
    slot.held = 2
    slot.check = seal(slot_key(ledger.token, slot.start_time), slot.pid, 2, 0, 0)
    assert sealed(ledger.token, slot)
    slot.held = 40
    assert not sealed(ledger.token, slot)
    snap = ledger.snapshot()
    assert [s.verified for s in snap.slots] == [False]


def test_pid_reuse_and_zombies_are_dead():
    pid = os.getpid()
    start = process_start_time(pid)
    assert is_alive(pid, start)
    assert not is_alive(pid, start + 1)  # same pid, another process: a reused pid
    assert not is_alive(_dead_pid(), start)
    assert not is_alive(0, 0) and not is_alive(-1, 0)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        while True:  # wait until it has exited but is not reaped
            with open(f"/proc/{zombie.pid}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
            if fields[0] == b"Z":
                break
        assert not is_alive(zombie.pid, int(fields[19]))
    finally:
        zombie.wait()


def test_bad_group_fails_before_creating_anything(unique_name):
    with pytest.raises(LedgerError, match="GROUP 'no-such-group-xyz' is not a group on this host"):
        Ledger.create(unique_name, 2, nslots=4, group="no-such-group-xyz")
    assert not [e for e in os.listdir("/dev/shm") if unique_name in e]


def test_locked_bytes_finds_every_held_lock(tmp_path):
    """F_OFD_GETLK reports any one conflicting lock: the scan must still find them all (none missed = none
    mistaken for dead)."""
    import random

    from sharedpool.names import lock_byte, locked_bytes

    path = tmp_path / "locks"
    path.write_bytes(b"")
    holder = os.open(path, os.O_RDWR)
    viewer = os.open(path, os.O_RDWR)
    try:
        rng = random.Random(3)
        for _ in range(20):
            wanted = set(rng.sample(range(64, 64 + 256), rng.randint(0, 60)))
            for offset in range(64, 64 + 256):
                from sharedpool.names import unlock_byte

                unlock_byte(holder, offset)
            for offset in wanted:
                assert lock_byte(holder, offset)
            assert locked_bytes(viewer, 64, 256) == wanted
    finally:
        os.close(holder)
        os.close(viewer)
