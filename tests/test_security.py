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
    User,
    UserPoolWorker,
    owned_in_shm,
    run_cli_as,
    start_as,
    start_tool,
    stop_process,
    tool_results,
    tree_state,
    try_as,
)
from helpers_procs import (
    PYTHON,
    PeakSampler,
    PoolWorker,
    coordinator,
    remove_pool_objects,
    run_cli,
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
        path = f"/dev/shm/{entry}"
        with contextlib.suppress(OSError):
            if os.path.isdir(path) and not os.path.islink(path):
                remove_planted(path)
            else:
                os.unlink(path)
    assert not left, f"objects of the test users left in /dev/shm: {left}"


def pool_worker(name: str, dsn: str, host: HostUsers | None = None, user: User | None = None,
                group: str | None = None) -> PoolWorker:
    """A worker with a plain ``PoolConfig(...)``: as root or ``user``, with SHAREDPOOL_GROUP set for ``group``."""
    if host is None:
        return PoolWorker(name, BUDGET, dsn)
    return UserPoolWorker(host, user, name, BUDGET, dsn, **({"SHAREDPOOL_GROUP": group} if group else {}))


@contextlib.contextmanager
def idle_holder(dsn: str, name: str, *coordinator_args: str, host: HostUsers | None = None, user: User | None = None,
                group: str | None = None, **coordinator_kwargs: object):
    """A coordinator, a server sampler, and a worker holding every permit as idle connections."""
    if group:
        coordinator_args += ("--group", group)
    with coordinator(name, BUDGET, *coordinator_args, **coordinator_kwargs) as coord, PeakSampler(dsn, name) as sampler:
        holder = pool_worker(name, dsn, host, user, group)
        try:
            holder.get(BUDGET)
            holder.do(f"put {BUDGET}")
            assert sem_free(name, group) == 0
            yield coord, sampler, holder
        finally:
            holder.kill()


def sem_free(name: str, group: str | None = None) -> int:
    ledger = Ledger.attach(name, group=group, mapped=False)
    try:
        return ledger.sem.value
    finally:
        ledger.close()


def slot_of(name: str, pid: int) -> int:
    ledger = Ledger.attach(name, mapped=False)
    try:
        return next(s.index for s in ledger.snapshot().slots if s.pid == pid)
    finally:
        ledger.close()


def assert_pool_serves(dsn: str, name: str, sampler: PeakSampler, holder: PoolWorker,
                       host: HostUsers | None = None, user: User | None = None, group: str | None = None) -> None:
    """A waiter gets the idle holder's permit within 1 s; cap held on the server; nothing hoarded."""
    waiter = pool_worker(name, dsn, host, user, group)
    try:
        started = time.monotonic()
        [backend] = waiter.get(1)
        handoff = time.monotonic() - started
        assert handoff < 1.0, f"the waiter got the idle permit after {handoff:.2f} s"
        assert wait_until(lambda: backend in {pid for pid, _ in sampler.seen}, 2), "the sampler never saw the waiter's connection"
        waiter.exit()
        holder.exit()
    finally:
        waiter.kill()
    assert wait_until(lambda: sem_free(name, group) == BUDGET, 3), \
        f"permits hoarded: {sem_free(name, group)} of {BUDGET} free"
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


# -- 2. squatting the worker sockets and the pool directory ----------------------------------

CHECKOUT = """
import sys
import sharedpool
name, dsn = sys.argv[1], sys.argv[2]
try:
    pool = sharedpool.LocalPool(sharedpool.PoolConfig(name=name, pool_size=2, timeout=3), dsn)
    pool.putconn(pool.getconn())
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}")
else:
    print("connected")
"""


def checkout_as_root(name: str, dsn: str) -> str:
    """One checkout with AUTOSTART (the default) in a fresh root worker; what it printed."""
    done = subprocess.run([PYTHON, "-c", CHECKOUT, name, dsn], capture_output=True, text=True, timeout=30)
    assert "Traceback" not in done.stderr, done.stderr
    return done.stdout.strip()


def checkout_as(host: HostUsers, user: User, name: str, dsn: str) -> str:
    """The same, in a worker of another user."""
    proc = start_as(host, user, ["-c", CHECKOUT, name, dsn])
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        stop_process(proc)
    assert "Traceback" not in err, err
    return out.strip()


def assert_refused(done: subprocess.CompletedProcess, *fragments: str) -> str:
    """A command failed cleanly: exit 1, no traceback, every fragment in its message."""
    assert done.returncode == 1, f"exit {done.returncode}: {done.stdout} {done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    for fragment in fragments:
        assert fragment in done.stderr, f"{fragment!r} not in {done.stderr!r}"
    return done.stderr


def remove_planted(*paths: str) -> None:
    for path in paths:
        if os.path.islink(path) or os.path.isfile(path):
            os.unlink(path)
        elif os.path.isdir(path):
            for entry in os.listdir(path):
                os.unlink(os.path.join(path, entry))
            os.rmdir(path)


def test_nobody_can_squat_worker_sockets_or_the_pool_directory(dsn, unique_name, users, sentinel):
    names = PoolNames(unique_name)
    attacker = users.attacker
    # a live pool: nothing can be created in its directory, under any worker's socket name
    with idle_holder(dsn, unique_name) as (coord, sampler, holder):
        before = tree_state(names.directory)
        targets = [names.path(PoolNames.worker_socket(i)) for i in range(8)]
        results = try_as(users, attacker, [["bind", path] for path in targets] + [
            ["create", names.path("w9")], ["mkdir", names.path("w10"), 0o777],
            ["symlink", sentinel, names.path("w11")], ["unlink", names.path(PoolNames.worker_socket(0))],
        ] + [["bind_abstract", f"sharedpool.{unique_name}.{pid}"] for pid in range(os.getpid(), os.getpid() + 50)])
        assert results[:12] == ["EACCES"] * 12
        assert set(results[12:]) == {"ok"}  # the old abstract addresses are free for anyone and mean nothing now
        assert {p: (s.ino, s.uid, s.mode) for p, s in tree_state(names.directory).items()} == \
            {p: (s.ino, s.uid, s.mode) for p, s in before.items()}  # the same objects (the ledger's content moves)
        assert checkout_as_root(unique_name, dsn) == "connected"
        assert_pool_serves(dsn, unique_name, sampler, holder)

    # the pool directory itself, made by the attacker before the pool exists
    for planted in ("dir", "symlink"):
        try:
            if planted == "dir":
                assert try_as(users, attacker, [["mkdir", names.directory, 0o777],
                                                ["create", names.path("ledger")]]) == ["ok", "ok"]
            else:
                assert try_as(users, attacker, [["mkdir", f"/dev/shm/{unique_name}-elsewhere", 0o777],
                                                ["symlink", f"/dev/shm/{unique_name}-elsewhere",
                                                 names.directory]]) == ["ok", "ok"]
            before = {**tree_state(names.directory), **tree_state(f"/dev/shm/{unique_name}-elsewhere")} \
                if planted == "symlink" else tree_state(names.directory)
            done = run_cli("coordinator", "--name", unique_name, "--budget", str(BUDGET), timeout=20)
            if planted == "dir":
                assert_refused(done, f"pool {unique_name!r}: {names.directory} belongs to {attacker.name} "
                               f"(uid {attacker.uid}), not to root (uid 0)", "GROUP", "another NAME")
                assert checkout_as_root(unique_name, dsn).startswith(
                    f"PoolPermissionError: pool {unique_name!r}: {names.directory} belongs to {attacker.name}")
                assert checkout_as(users, users.member, unique_name, dsn).startswith(
                    f"PoolPermissionError: pool {unique_name!r}: {names.directory} belongs to {attacker.name}")
                os.chmod(names.directory, 0o700)  # closed: a non-root worker cannot even look inside
                assert checkout_as(users, users.member, unique_name, dsn).startswith(
                    f"PoolPermissionError: pool {unique_name!r}: no permission to open {names.directory}; it belongs "
                    f"to {attacker.name}")
                os.chmod(names.directory, 0o777)
            else:
                assert_refused(done, f"{names.directory} is not a directory (a symlink")
                assert checkout_as_root(unique_name, dsn).startswith(
                    f"PoolPermissionError: pool {unique_name!r}: {names.directory} is not a directory")
            after = {**tree_state(names.directory), **tree_state(f"/dev/shm/{unique_name}-elsewhere")} \
                if planted == "symlink" else tree_state(names.directory)
            assert after == before, "the coordinator or the worker touched the attacker's directory"
            assert not names.stray_semaphores()
        finally:
            remove_planted(names.directory, f"/dev/shm/{unique_name}-elsewhere")


def test_a_worker_whose_socket_cannot_bind_still_serves(dsn, unique_name, sentinel):
    names = PoolNames(unique_name)
    with coordinator(unique_name, BUDGET), PeakSampler(dsn, unique_name) as sampler:
        for index in range(4):  # whatever slot the worker gets, its socket name is taken (by the owner: nobody else can)
            os.mkdir(names.path(PoolNames.worker_socket(index)))
        try:
            worker = PoolWorker(unique_name, BUDGET, dsn)
            try:
                worker.get(BUDGET)
                worker.do(f"put {BUDGET}")
                worker.get(BUDGET)
                worker.proc.stdin.write("exit\n")
                worker.proc.stdin.flush()
                assert worker.proc.wait(10) == 0
                err = worker.proc.stderr.read()
            finally:
                worker.kill()
        finally:
            for index in range(4):
                os.rmdir(names.path(PoolNames.worker_socket(index)))
        assert "Traceback" not in err
        assert f"pool {unique_name!r}: cannot listen for shed requests" in err
        assert "this worker keeps serving" in err
        assert wait_until(lambda: sem_free(unique_name) == BUDGET, 3)
        assert sampler.stop() <= BUDGET


# -- 3. the coordinator's control socket -----------------------------------------------------


def test_the_control_socket_cannot_be_squatted_and_an_unbindable_coordinator_touches_nothing(dsn, unique_name, users,
                                                                                             sentinel):
    names = PoolNames(unique_name)
    control = names.path(CONTROL_SOCKET)
    # a running coordinator: its socket can be neither replaced nor reached
    with idle_holder(dsn, unique_name, "--slots", "8", remove_on_exit=False) as (coord, sampler, holder):
        results = try_as(users, users.attacker, [
            ["unlink", control], ["bind", control], ["send", control, "budget 100"],
            ["bind_abstract", f"sharedpool.{unique_name}.control"], ["bind_abstract", f"sharedpool.{unique_name}"],
        ])
        assert results == ["EACCES", "EACCES", "EACCES", "ok", "ok"]
        done = run_cli("reload", "--name", unique_name, "--budget", "1", "--wait", "10")
        assert done.returncode == 0, done.stderr
        assert "budget 1 (within it after" in done.stdout  # the real coordinator got it and the holder shed
        done = run_cli("reload", "--name", unique_name, "--budget", str(BUDGET))
        assert done.returncode == 0, done.stderr
        holder.get(1)  # the permit given back by the cut is recreated by the raise
        holder.do("put 1")
        assert_pool_serves(dsn, unique_name, sampler, holder)
        coord.proc.send_signal(15)  # stop it, leaving the ledger for the adoption case below
        coord.proc.wait(10)
        # a directory left by a stopped coordinator: still nobody else's to squat before the next one starts
        assert try_as(users, users.attacker, [["bind", control], ["create", control]]) == ["EACCES", "EACCES"]

    # a coordinator that cannot bind (the name is taken by a directory of the owner's) creates nothing ...
    try:
        os.mkdir(names.directory, 0o700)
        os.mkdir(control)
        before = tree_state(names.directory)
        done = run_cli("coordinator", "--name", unique_name, "--budget", str(BUDGET), timeout=20)
        assert_refused(done, f"pool {unique_name!r}: cannot bind the control socket {control}", "Is a directory")
        assert sorted(os.listdir(names.directory)) == ["control", "locks"]  # the lock it took, no ledger
        assert not names.stray_semaphores()
        # ... and an AUTOSTART worker does not carry on without a coordinator
        out = checkout_as_root(unique_name, dsn)
        assert out.startswith(f"PoolUnavailable: pool {unique_name!r}: the coordinator exited with code 1 before "
                              "creating the ledger"), out
        with open(names.path("coordinator.log")) as log:
            assert "cannot bind the control socket" in log.read()
        assert not names.stray_semaphores() and not os.path.exists(names.path("ledger"))
        assert tree_state(control) == {control: before[control]}
    finally:
        remove_pool_objects(unique_name)

    # ... nor adopts an existing ledger: the ledger is byte for byte as it was
    with coordinator(unique_name, BUDGET, remove_on_exit=False) as coord:
        coord.stop()
        assert not os.path.lexists(control)  # a stopping coordinator removes its socket
        os.mkdir(control)
        with open(names.path("ledger"), "rb") as f:
            ledger_before = f.read()
        sem_before = FileState.of(names.stray_semaphores()[0])
        done = run_cli("coordinator", "--name", unique_name, "--budget", "5", timeout=20)
        assert_refused(done, f"pool {unique_name!r}: cannot bind the control socket {control}")
        with open(names.path("ledger"), "rb") as f:
            assert f.read() == ledger_before
        assert FileState.of(names.stray_semaphores()[0]) == sem_before


# -- 4. symlinks planted where the lock file and the ledger go --------------------------------


@pytest.fixture
def symlinks_followed():
    """fs.protected_symlinks = 0 for the test (the kernel's own guard off), restored after."""
    path = "/proc/sys/fs/protected_symlinks"
    with open(path) as f:
        old = f.read().strip()
    with open(path, "w") as f:
        f.write("0")
    try:
        yield
    finally:
        with open(path, "w") as f:
            f.write(old)


def start_group_dir(names: PoolNames, group: str) -> None:
    """The pool directory as a root coordinator with GROUP makes it (root, 2770), before anything is in it."""
    from sharedpool.names import open_directory

    os.close(open_directory(names, group, create=True, strict=True))
    info = os.stat(names.directory)
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o2770)


def test_symlinks_planted_for_the_lock_file_and_ledger_are_refused(dsn, unique_name, users, sentinel,
                                                                    symlinks_followed):
    names = PoolNames(unique_name)
    target = FileState.of(sentinel)
    legacy = [f"/dev/shm/sharedpool.{unique_name}", f"/dev/shm/sharedpool.{unique_name}.lock"]
    try:
        # in a directory of the attacker's: refused before anything in it is opened
        assert try_as(users, users.attacker, [
            ["mkdir", names.directory, 0o777], ["symlink", sentinel, names.path("locks")],
            ["symlink", sentinel, names.path("ledger")],
        ] + [["symlink", sentinel, path] for path in legacy]) == ["ok"] * 5
        done = run_cli("coordinator", "--name", unique_name, "--budget", str(BUDGET), timeout=20)
        assert_refused(done, f"{names.directory} belongs to {users.attacker.name}")
        remove_planted(names.directory)
        # the old layout's flat names, planted as symlinks, are nothing to the new one
        with idle_holder(dsn, unique_name) as (coord, sampler, holder):
            assert_pool_serves(dsn, unique_name, sampler, holder)
        assert all(os.path.islink(path) for path in legacy)

        # in the pool's own directory, shared with GROUP: a member plants them (nobody else can)
        group = users.group_name
        for planted in ("locks", "ledger"):
            start_group_dir(names, group)
            assert try_as(users, users.member, [["symlink", sentinel, names.path(planted)]]) == ["ok"]
            done = run_cli("coordinator", "--name", unique_name, "--budget", str(BUDGET), "--group", group,
                           timeout=20)
            assert_refused(done, f"pool {unique_name!r}: {names.path(planted)} is a symlink; refusing to follow it")
            assert os.readlink(names.path(planted)) == sentinel
            assert not os.path.exists(names.path("ledger")) or planted == "ledger"
            assert not names.stray_semaphores()
            remove_pool_objects(unique_name)
        # a symlink where the control socket goes is removed (never followed), and the pool starts
        start_group_dir(names, group)
        assert try_as(users, users.member, [["symlink", sentinel, names.path(CONTROL_SOCKET)]]) == ["ok"]
        with idle_holder(dsn, unique_name, host=users, group=group) as (coord, sampler, holder):
            assert stat.S_ISSOCK(os.lstat(names.path(CONTROL_SOCKET)).st_mode)
            assert_pool_serves(dsn, unique_name, sampler, holder, users, group=group)
    finally:
        remove_planted(names.directory, *legacy)
        remove_pool_objects(unique_name)
    assert FileState.of(sentinel) == target, "the root-only target of the symlinks changed"


# -- 5. a foreign ledger, pre-created semaphores ----------------------------------------------


def forged_ledger(budget: int = 6) -> str:
    """A valid-looking ledger (hex) that promises more permits than the pool's budget."""
    from sharedpool.ledger import HEADER_SIZE, LAYOUT_VERSION, MAGIC, SLOT_SIZE, Header, segment_size

    header = Header(magic=MAGIC, version=LAYOUT_VERSION, header_size=HEADER_SIZE, slot_size=SLOT_SIZE, nslots=8,
                    budget=budget, physical=budget, epoch=1, token=0x5EC)
    return bytes(header).ljust(segment_size(8), b"\0").hex()


def test_a_foreign_ledger_is_refused_and_presquatted_semaphores_cannot_block(dsn, unique_name, users, sentinel):
    names = PoolNames(unique_name)
    attacker, member = users.attacker, users.member
    try:
        # the attacker's directory and ledger, mode 0666, there before the pool
        assert try_as(users, attacker, [["mkdir", names.directory, 0o777],
                                        ["write", names.path("ledger"), forged_ledger(), 0o666]]) == ["ok", "ok"]
        before = tree_state(names.directory)
        done = run_cli("coordinator", "--name", unique_name, "--budget", str(BUDGET), timeout=20)
        assert_refused(done, f"{names.directory} belongs to {attacker.name} (uid {attacker.uid})", "its mode is 0777",
                       "GROUP", "another NAME")
        assert tree_state(names.directory) == before
        remove_planted(names.directory)

        # in the pool's own GROUP directory, a member's ledger (0666): root does not adopt it either
        start_group_dir(names, users.group_name)
        assert try_as(users, member, [["write", names.path("ledger"), forged_ledger(), 0o666]]) == ["ok"]
        before = tree_state(names.path("ledger"))
        done = run_cli("coordinator", "--name", unique_name, "--budget", str(BUDGET), "--group", users.group_name,
                       timeout=20)
        assert_refused(done, f"{names.path('ledger')} belongs to {member.name} (uid {member.uid}), not to root (uid 0)",
                       "its mode is 0666")
        assert tree_state(names.path("ledger")) == before and not names.stray_semaphores()
        remove_pool_objects(unique_name)

        # the owner's own ledger, but opened to everyone: refused too, naming the mode
        os.mkdir(names.directory, 0o700)
        fd = os.open(names.path("ledger"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, bytes.fromhex(forged_ledger()))
        os.fchmod(fd, 0o666)
        os.close(fd)
        done = run_cli("coordinator", "--name", unique_name, "--budget", str(BUDGET), timeout=20)
        assert_refused(done, f"{names.path('ledger')} has mode 0666, wider than 0600 (no GROUP configured); "
                       "owner root (uid 0)")
        remove_pool_objects(unique_name)

        # semaphore names made by the attacker first (random tokens, the old fixed name): no effect
        squats = [f"/dev/shm/sem.sharedpool.{unique_name}.{secrets.token_hex(8)}" for _ in range(5)]
        squats.append(f"/dev/shm/sem.sharedpool.{unique_name}")
        assert try_as(users, attacker, [["write", path, "00" * 32, 0o666] for path in squats]) == ["ok"] * 6
        before = {path: FileState.of(path) for path in squats}
        with idle_holder(dsn, unique_name) as (coord, sampler, holder):
            ledger = Ledger.attach(unique_name, mapped=False)
            try:
                assert ledger.names.semaphore_path(ledger.token) not in squats
            finally:
                ledger.close()
            assert_pool_serves(dsn, unique_name, sampler, holder)
            assert coord.stop() == 0  # with --remove-on-exit: it removes its own objects, not the attacker's
            assert {path: FileState.of(path) for path in squats} == before
            assert not os.path.exists(names.directory)
        # cleanup removes the pool's own objects only, whoever runs it (the test helper above took them all)
        assert try_as(users, attacker, [["write", path, "00" * 32, 0o666] for path in squats[:5]]) == ["ok"] * 5
        before = {path: FileState.of(path) for path in squats}
        done = run_cli("cleanup", "--name", unique_name)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.count(f"it belongs to {attacker.name} (uid {attacker.uid}), not to the pool's owner root "
                                 "(uid 0)") == 5, done.stderr
        assert {path: FileState.of(path) for path in squats} == before
    finally:
        for path in [f"/dev/shm/sem.sharedpool.{unique_name}"] + names.stray_semaphores():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        remove_planted(names.directory)
        remove_pool_objects(unique_name)


# -- 6. floods of the control socket -------------------------------------------------------


def test_control_floods_cost_little_and_reload_and_status_still_work(dsn, unique_name, users, sentinel):
    names = PoolNames(unique_name)
    control = names.path(CONTROL_SOCKET)
    bogus = ["hello", "budget abc", "budget 0", "budget -1", "x" * 200, "exit 1", "\x00\xff" * 40, "stop", "shed"]
    with idle_holder(dsn, unique_name) as (coord, sampler, holder):
        log_before = len(coord.log())
        attacker = start_tool(users, users.attacker, [["flood", control, ["budget 100", "stop"], 3.0]])
        flooder = start_tool(users, None, [["flood", control, bogus, 3.0]])  # same user: trusted, but nonsense
        time.sleep(0.3)
        answers = []
        for budget in (3, 1, 2):
            started = time.monotonic()
            done = run_cli("reload", "--name", unique_name, "--budget", str(budget), "--wait", "10")
            answers.append((done.returncode, done.stdout + done.stderr, time.monotonic() - started))
            done = run_cli("status", "--name", unique_name, "--json", "--rate-window", "0")
            answers.append((done.returncode, done.stdout[:80] + done.stderr, 0.0))
            if done.returncode == 0:
                answers.append((json.loads(done.stdout)["budget"] - budget, "budget shown - budget asked", 0.0))
        [attacked] = tool_results(attacker)
        [flooded] = tool_results(flooder)
        assert set(attacked) == {"EACCES"}, attacked  # the attacker cannot even connect
        assert flooded.get("ok", 0) > 1000, flooded  # the flood was real
        assert all(code == 0 for code, _, _ in answers), "\n".join(map(repr, answers))
        log = coord.log()[log_before:]
        assert len(log) < 4000, f"the flood grew the log by {len(log)} bytes:\n{log[-2000:]}"
        assert 1 <= log.count(f"pool {unique_name!r}: ignored ") <= 6, log  # a burst of lines, then one per interval
        holder.get(1)  # the permit the cut to 1 retired is back after the raise to 2
        holder.do("put 1")
        assert_pool_serves(dsn, unique_name, sampler, holder)

    # defence in depth: with the directory and socket opened to everyone by mistake, the kernel-checked
    # credentials still drop every datagram of the attacker's, logged once per interval with a count
    with idle_holder(dsn, unique_name) as (coord, sampler, holder):
        os.chmod(names.directory, 0o711)
        os.chmod(control, 0o666)
        try:
            [flooded] = try_as(users, users.attacker, [["flood", control, ["budget 100", "stop", "shed"], 1.0]])
        finally:
            os.chmod(control, 0o600)
            os.chmod(names.directory, 0o700)
        assert flooded.get("ok", 0) > 100, flooded
        assert wait_until(lambda: "from untrusted senders" in coord.log(), 2), coord.log()
        dropped = [line for line in coord.log().splitlines() if "from untrusted senders" in line]
        assert len(dropped) == 1 and f"{control}: dropped" in dropped[0], dropped
        ledger = Ledger.attach(unique_name, mapped=False)
        try:
            assert ledger.header.budget == BUDGET
        finally:
            ledger.close()
        assert_pool_serves(dsn, unique_name, sampler, holder)


# -- 7. GROUP from a shell ----------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_group_from_a_shell_shares_the_pool_and_everyone_else_gets_a_clear_refusal(dsn, unique_name, users, sentinel):
    names = PoolNames(unique_name)
    group, member, attacker = users.group_name, users.member, users.attacker
    old_umask = os.umask(0o022)  # a coordinator started from a login shell
    try:
        holder_context = idle_holder(dsn, unique_name, host=users, user=member, group=group, remove_on_exit=False)
        coord, sampler, holder = holder_context.__enter__()
    finally:
        os.umask(old_umask)
    try:
        # modes set with fchmod whatever the umask; the group everywhere
        ledger = Ledger.attach(unique_name, group=group, mapped=False)
        try:
            sem_path = names.semaphore_path(ledger.token)
        finally:
            ledger.close()
        expected = {names.directory: 0o2770, names.path("ledger"): 0o660, names.path("locks"): 0o660,
                    names.path(CONTROL_SOCKET): 0o660, sem_path: 0o660}
        for path, mode in expected.items():
            info = os.lstat(path)
            assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (mode, 0, users.gid), path
        # a member's worker (plain PoolConfig(...), SHAREDPOOL_GROUP in its environment) holds the permits idle;
        # a root worker waiting gets one from it, and a member waiting gets one from a root holder
        assert_pool_serves(dsn, unique_name, sampler, holder, users, None, group)
        sampler = PeakSampler(dsn, unique_name)
        sampler.start()
        holder = pool_worker(unique_name, dsn, users, None, group)
        holder.get(BUDGET)
        holder.do(f"put {BUDGET}")
        assert_pool_serves(dsn, unique_name, sampler, holder, users, member, group)

        # the commands honour --group and SHAREDPOOL_GROUP for a member
        for how in (("--group", group), ()):
            env = {} if how else {"SHAREDPOOL_GROUP": group}
            done = run_cli_as(users, member, "status", "--name", unique_name, "--json", "--rate-window", "0", *how,
                              **env)
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["budget"] == BUDGET
            done = run_cli_as(users, member, "reload", "--name", unique_name, "--budget", "3", *how, **env)
            assert done.returncode == 0 and "budget 3" in done.stdout, done.stderr
            done = run_cli_as(users, member, "reload", "--name", unique_name, "--budget", str(BUDGET), *how, **env)
            assert done.returncode == 0, done.stderr
            done = run_cli_as(users, member, "cleanup", "--name", unique_name, *how, **env)  # let in, but not root
            assert_refused(done, f"pool {unique_name!r}: {names.directory} belongs to root (uid 0) (mode 0770); only "
                           f"its owner or root can remove the pool, and this process runs as {member.name}")
        port = free_port()
        metrics = start_as(users, member, ["-m", "sharedpool.coordinator", "metrics", "--name", unique_name,
                                           "--port", str(port)], SHAREDPOOL_GROUP=group)
        try:
            def scrape() -> str:
                with contextlib.suppress(OSError):
                    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
                assert metrics.poll() is None, metrics.stderr.read()
                return ""

            page = wait_until(scrape, 15, 0.05)
            assert f'"{unique_name}"' in page, page[:500]
        finally:
            stop_process(metrics)
        # without the group a member is told what to set; another user is told who owns it, and its mode
        done = run_cli_as(users, member, "status", "--name", unique_name)
        assert_refused(done, f"{names.directory} belongs to root (uid 0), not to {member.name}", "its mode is 0770",
                       "set GROUP")
        for command in (["status"], ["reload", "--budget", "5"], ["cleanup"]):
            done = run_cli_as(users, attacker, command[0], "--name", unique_name, *command[1:])
            assert_refused(done, f"pool {unique_name!r}: no permission to open {names.directory}; it belongs to "
                           f"root (uid 0), group {group} (gid {users.gid}), mode 0770")
        # a stopped pool: a member may not remove root's pool; it is told why, and nothing is removed
        assert coord.stop() == 0
        before = {**tree_state(names.directory), sem_path: FileState.of(sem_path)}
        done = run_cli_as(users, member, "cleanup", "--name", unique_name, "--group", group)
        assert_refused(done, f"{names.directory} belongs to root (uid 0)", "mode 0770")
        assert {**tree_state(names.directory), sem_path: FileState.of(sem_path)} == before
        done = run_cli_as(users, None, "cleanup", "--name", unique_name, "--group", group)
        assert done.returncode == 0, done.stderr
        assert not os.path.exists(names.directory) and not os.path.exists(sem_path)
    finally:
        holder.kill()
        with contextlib.suppress(AssertionError):
            sampler.stop()
        holder_context.__exit__(None, None, None)
