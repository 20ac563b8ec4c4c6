"""The ledger in one process: layout, validation of foreign or broken segments, slots, liveness."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import posix_ipc
import pytest

from sharedpool.errors import LedgerError, SlotsExhausted
from sharedpool.ledger import (
    LAYOUT_VERSION,
    MAGIC,
    SLOT_ACTIVE,
    Header,
    Ledger,
    Slot,
    ipc_names,
    is_alive,
    permit_counts,
    process_start_time,
    segment_size,
    unlink,
)


@pytest.fixture
def ledger(make_ledger):
    return make_ledger(3)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_create_lays_out_header_and_exclusive_objects(ledger, unique_name):
    h = ledger.header
    assert (h.magic, h.version, h.budget, h.physical, h.epoch, h.nslots) == (MAGIC, LAYOUT_VERSION, 3, 3, 1, 8)
    assert ledger.sem.value == 3
    shm, sem = ipc_names(unique_name)
    assert os.stat(f"/dev/shm/{shm[1:]}").st_mode & 0o777 == 0o600
    assert os.stat(f"/dev/shm/sem.{sem[1:]}").st_mode & 0o777 == 0o600
    assert os.stat(f"/dev/shm/{shm[1:]}").st_size == segment_size(8)
    with pytest.raises(posix_ipc.ExistentialError):
        Ledger.create(unique_name, 3)
    assert Ledger.exists(unique_name) and ledger.is_current()


def test_attach_sees_the_same_memory(ledger, unique_name):
    other = Ledger.attach(unique_name)
    try:
        index = other.claim_slot(os.getpid(), process_start_time(os.getpid()))
        other.slots[index].held = 2
        assert ledger.snapshot().held == 2
        assert ledger.snapshot().slots[0].pid == os.getpid()
    finally:
        other.close()


def test_attach_missing_names_the_path(unique_name):
    with pytest.raises(LedgerError, match=rf"pool '{unique_name}': no ledger at /dev/shm/sharedpool\.{unique_name}"):
        Ledger.attach(unique_name)


def _write_segment(name: str, data: bytes) -> None:
    shm = posix_ipc.SharedMemory(ipc_names(name)[0], posix_ipc.O_CREX, mode=0o600, size=len(data) or 1)
    os.pwrite(shm.fd, data, 0)
    if not data:
        os.ftruncate(shm.fd, 0)
    os.close(shm.fd)


def _valid_header(nslots: int = 4, **changes) -> bytes:
    header = Header(magic=MAGIC, version=LAYOUT_VERSION, header_size=ctypes.sizeof(Header),
                    slot_size=ctypes.sizeof(Slot), nslots=nslots, budget=2, physical=2, epoch=1)
    for key, value in changes.items():
        setattr(header, key, value)
    return bytes(header) + bytes(nslots * ctypes.sizeof(Slot))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", r"is truncated \(0 bytes, header needs \d+\)"),
        (b"\x7fELF" + bytes(200), r"is not a sharedpool ledger \(bad magic 0x00000000464c457f\)"),
        (_valid_header(version=LAYOUT_VERSION + 1), rf"has layout version {LAYOUT_VERSION + 1}, this sharedpool reads version {LAYOUT_VERSION}"),
        (_valid_header(slot_size=12), r"has header/slot sizes \d+/12, expected"),
        (_valid_header()[: ctypes.sizeof(Header) + 100], r"is truncated or corrupt \(4 slots, \d+ bytes\)"),
        (_valid_header(nslots=0), r"is truncated or corrupt \(0 slots"),
        (_valid_header(budget=0), r"is corrupt \(budget 0, slot_hwm 0\)"),
        (_valid_header(slot_hwm=99), r"is corrupt \(budget 2, slot_hwm 99\)"),
    ],
    ids=["empty", "foreign", "version", "slot-size", "truncated-slots", "no-slots", "zero-budget", "bad-hwm"],
)
def test_attach_refuses_foreign_or_corrupt_segments(unique_name, data, message):
    _write_segment(unique_name, data)
    sem = posix_ipc.Semaphore(ipc_names(unique_name)[1], posix_ipc.O_CREX, mode=0o600, initial_value=2)
    sem.close()
    try:
        with pytest.raises(LedgerError, match=rf"pool '{unique_name}': /dev/shm/sharedpool\.{unique_name} " + message):
            Ledger.attach(unique_name)
    finally:
        unlink(unique_name)


def test_attach_without_semaphore_says_so(unique_name):
    _write_segment(unique_name, _valid_header())
    try:
        with pytest.raises(LedgerError, match=r"exists but its semaphore /dev/shm/sem\.sharedpool\..* is missing"):
            Ledger.attach(unique_name)
    finally:
        unlink(unique_name)


def test_foreign_owner_is_refused(unique_name):
    if os.geteuid() != 0:
        pytest.skip("needs root to make a segment owned by someone else")
    led = Ledger.create(unique_name, 2)
    try:
        os.fchown(led._fd, 65534, -1)
        # root may read anything: the check is for other users; simulate one in a child
        code = (
            "import os, sys\n"
            "from sharedpool.ledger import Ledger\n"
            "from sharedpool.errors import LedgerError\n"
            "os.setgid(65533); os.setuid(65533)\n"
            "try:\n    Ledger.attach(sys.argv[1])\nexcept LedgerError as e:\n    print(e)\n"
        )
        out = subprocess.run([sys.executable, "-c", code, unique_name], capture_output=True, text=True, timeout=30)
        assert "no permission" in out.stdout or "owned by uid 65534" in out.stdout, out
    finally:
        led.close()
        unlink(unique_name)


def test_claim_and_free_slots(ledger):
    me = (os.getpid(), process_start_time(os.getpid()))
    a = ledger.claim_slot(*me)
    b = ledger.claim_slot(*me)
    assert (a, b) == (0, 1) and ledger.header.slot_hwm == 2
    ledger.slots[a].grants = 5
    ledger.free_slot(a)
    assert ledger.slots[a].state == 0 and ledger.header.grants == 5
    assert ledger.claim_slot(*me) == a  # the lowest free slot is reused


def test_claim_reuses_dead_empty_slot_but_not_dead_holder(ledger):
    dead = _dead_pid()
    holder = ledger.claim_slot(dead, 1)
    ledger.slots[holder].held = 1  # the coordinator must reclaim this one first
    inflight = ledger.claim_slot(dead, 1)
    ledger.slots[inflight].inflight = 1  # and this one (the audit settles it)
    empty = ledger.claim_slot(dead, 1)
    assert (holder, inflight, empty) == (0, 1, 2)
    me = os.getpid(), process_start_time(os.getpid())
    assert ledger.claim_slot(*me) == empty
    assert ledger.claim_slot(*me) == 3


def test_slots_exhausted_names_the_pool(ledger, unique_name):
    me = os.getpid(), process_start_time(os.getpid())
    for _ in range(8):
        ledger.claim_slot(*me)
    with pytest.raises(SlotsExhausted, match=rf"pool '{unique_name}': all 8 worker slots are taken"):
        ledger.claim_slot(*me)


def test_pid_reuse_and_zombies_are_dead():
    pid = os.getpid()
    start = process_start_time(pid)
    assert is_alive(pid, start)
    assert not is_alive(pid, start + 1)  # same pid, another process: a reused pid
    assert not is_alive(_dead_pid(), start)
    assert not is_alive(0, 0) and not is_alive(-1, 0)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        zstart = None
        while True:  # wait until it has exited but is not reaped
            with open(f"/proc/{zombie.pid}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
            zstart = int(fields[19])
            if fields[0] == b"Z":
                break
        assert process_start_time(zombie.pid) == zstart
        assert not is_alive(zombie.pid, zstart)
    finally:
        zombie.wait()


def test_process_start_time_survives_odd_command_names():
    code = "open('/proc/self/comm', 'w').write('a) b (c 1 2'); print(flush=True); import time; time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        proc.stdout.readline()
        with open(f"/proc/{proc.pid}/comm") as f:
            assert f.read().strip() == "a) b (c 1 2"
        start = process_start_time(proc.pid)
        assert start and is_alive(proc.pid, start)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_snapshot_and_permit_counts(ledger):
    me = os.getpid(), process_start_time(os.getpid())
    a, b = ledger.claim_slot(*me), ledger.claim_slot(*me)
    ledger.slots[a].held, ledger.slots[a].inflight = 2, 1
    ledger.slots[b].held, ledger.slots[b].inflight, ledger.slots[b].waiting = 0, 1, 1
    ledger.slots[b].backends[3] = 4242
    snap = ledger.snapshot()
    assert snap.held == 2 and snap.waiting == 1 and snap.free == 3 and snap.budget == 3
    assert snap.slots[1].backends == (4242,)
    assert "pid %d held 2" % os.getpid() in snap.holders_text()
    raw = ledger.raw_slots()
    held, inflight, waiting, key = permit_counts(raw)
    assert (held, inflight, waiting) == (2, 2, 1)
    ledger.slots[b].shed_requests += 1  # a hint, not accounting: the key does not move
    assert permit_counts(ledger.raw_slots())[3] == key
    ledger.slots[b].grants += 1
    assert permit_counts(ledger.raw_slots())[3] != key
    assert ledger.slots[a].state == SLOT_ACTIVE


def test_unlink_reports_what_it_removed(unique_name):
    Ledger.create(unique_name, 1).close()
    removed = unlink(unique_name)
    assert removed == [f"/dev/shm/sharedpool.{unique_name}", f"/dev/shm/sem.sharedpool.{unique_name}"]
    assert unlink(unique_name) == []


def test_bad_group_fails_before_creating_anything(unique_name, shm_prefix):
    from sharedpool.errors import LedgerError

    with pytest.raises(LedgerError, match="GROUP 'no-such-group-xyz' is not a group on this host"):
        Ledger.create(unique_name, 2, nslots=4, group="no-such-group-xyz")
    assert not [e for e in os.listdir("/dev/shm") if unique_name in e]
