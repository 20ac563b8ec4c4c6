"""Nobody else on the host can steer, starve or squat a pool (issue 11), tried as real other users.

Runs as root (CI does): the module creates an unprivileged attacker, a group
and a member of that group (supplementary, as ``usermod -aG`` makes them),
runs each attack in a child process with their uid, and removes them after.
After every attack the pool keeps its cap on the server (pg_stat_activity),
a waiting process gets an idle holder's permit within 1 s, no permit is
hoarded, and a root-only file outside the pool is untouched.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import subprocess
import time
import urllib.request

import pytest

from attacker import (
    FileState,
    HostUsers,
    owned_in_shm,
    run_cli_as,
    start_as,
    stop_process,
    tree_state,
    try_as,
)
from helpers_procs import (
    PYTHON,
    CoordinatorProc,
    PeakSampler,
    PoolWorker,
    coordinator,
    read_line,
    remove_pool_objects,
    run_cli,
    sem_free,
    wait_until,
)
from sharedpool import channel
from sharedpool.ledger import Ledger
from sharedpool.names import CONTROL_SOCKET, PoolNames

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create the attacking users (CI runs as root)")

BUDGET = 2


@pytest.fixture(scope="module")
def users():
    host = HostUsers()
    try:
        yield host
    finally:
        host.remove()


@pytest.fixture
def sentinel(users):
    """A root-only file outside any pool: no attack may change it. Also fails the test on attacker leftovers."""
    path = f"/dev/shm/sp-sentinel-{secrets.token_hex(4)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"root only, not a pool's\n")
    os.fchmod(fd, 0o600)
    os.close(fd)
    before = FileState.of(path)
    try:
        yield path
        assert FileState.of(path) == before, "a file outside the pool was touched"
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    left = owned_in_shm({users.attacker.uid, users.member.uid})
    for entry in left:
        remove_pool_objects(entry)  # not a pool name: removes nothing; the unlink below does
        with contextlib.suppress(OSError):
            os.unlink(f"/dev/shm/{entry}")
    assert not left, f"objects of the test users left in /dev/shm: {left}"


@contextlib.contextmanager
def idle_holder(dsn: str, name: str, *coordinator_args: str):
    """A coordinator, a server sampler, and a worker holding every permit as idle connections."""
    with coordinator(name, BUDGET, *coordinator_args) as coord, PeakSampler(dsn, name) as sampler:
        holder = PoolWorker(name, BUDGET, dsn)
        try:
            holder.get(BUDGET)
            holder.do(f"put {BUDGET}")
            assert sem_free(name) == 0
            yield coord, sampler, holder
        finally:
            holder.kill()


def slot_of(name: str, pid: int) -> int:
    ledger = Ledger.attach(name, mapped=False)
    try:
        return next(s.index for s in ledger.snapshot().slots if s.pid == pid)
    finally:
        ledger.close()


def assert_pool_serves(dsn: str, name: str, sampler: PeakSampler, holder: PoolWorker) -> None:
    """A waiter gets the idle holder's permit within 1 s; cap held on the server; nothing hoarded."""
    waiter = PoolWorker(name, BUDGET, dsn)
    try:
        started = time.monotonic()
        [backend] = waiter.get(1)
        handoff = time.monotonic() - started
        assert handoff < 1.0, f"the waiter got the idle permit after {handoff:.2f} s"
        assert wait_until(lambda: backend in sampler.seen, 2), "the sampler never saw the waiter's connection"
        waiter.exit()
        holder.exit()
    finally:
        waiter.kill()
    assert wait_until(lambda: sem_free(name) == BUDGET, 3), f"permits hoarded: {sem_free(name)} of {BUDGET} free"
    assert sampler.stop() <= BUDGET, f"server saw {sampler.peak} connections on budget {BUDGET}"


# -- 1. forged stop / shed datagrams -------------------------------------------------------


def test_forged_stop_and_shed_datagrams_cannot_reach_a_worker(dsn, unique_name, users, sentinel):
    names = PoolNames(unique_name)
    with idle_holder(dsn, unique_name) as (coord, sampler, holder):
        index = slot_of(unique_name, holder.pid)
        worker_socket = names.path(PoolNames.worker_socket(index))
        assert stat.S_ISSOCK(os.lstat(worker_socket).st_mode)
        results = try_as(users, users.attacker, [
            ["send", worker_socket, "stop"],
            ["send", worker_socket, "shed"],
            ["connect", worker_socket],
            ["listdir", names.directory],
            ["flood", worker_socket, ["shed", "stop"], 1.0],
        ])
        assert results[:4] == ["EACCES"] * 4
        assert set(results[4]) == {"EACCES"} and results[4]["EACCES"] > 100  # every one refused by the kernel
        # even a trusted sender cannot stop the listener through its socket: only a private socket pair does
        assert channel.send(names, PoolNames.worker_socket(index), b"stop")
        time.sleep(0.2)
        assert len(sampler.seen) == BUDGET, "the forged sheds made the holder churn connections"
        assert_pool_serves(dsn, unique_name, sampler, holder)
        assert len(sampler.seen) == BUDGET + 1  # one connection shed and one opened for the waiter, no churn
