"""Workers in other PID (and network) namespaces that share /dev/shm with a coordinator on the host.

This is the shape of a Docker container run with ``--ipc=host`` or a pod
sharing IPC: the container's pids mean nothing on the host, so the
coordinator must tell a live worker by its slot lock (an OFD lock the kernel
drops when the holder dies, whatever its namespace), never by its pid; and
the channels between processes are filesystem sockets in the pool directory,
which work whatever network namespace either side runs in.

Simulated with ``unshare --pid --fork --mount-proc`` (root, or user
namespaces): the new mount namespace is a copy of ours, so /dev/shm is the
same tmpfs. Judged on the server (``pg_stat_activity``) and on the ledger.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import textwrap
import time

import pytest

from sharedpool.ledger import Ledger, pid_namespace

from helpers_procs import PYTHON, ROOT, PeakSampler, coordinator, process_gone, wait_until

UNSHARE = shutil.which("unshare")


def _can_unshare(*flags: str) -> bool:
    if UNSHARE is None:
        return False
    probe = subprocess.run([UNSHARE, *flags, "--fork", "--mount-proc", "true"], capture_output=True, timeout=10)
    return probe.returncode == 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _can_unshare("--pid"), reason="unshare --pid --fork --mount-proc is not permitted here"),
]

# Runs inside the namespace. Commands on stdin: "get" (check out one connection and keep it),
# "put" (return it to the pool: idle), "exit" (return, close the pool, exit cleanly).
NS_WORKER = textwrap.dedent(
    """
    import os, sys
    import sharedpool
    from sharedpool.ledger import pid_namespace
    from sharedpool.pool import close_all
    name, budget, dsn, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    pool = sharedpool.LocalPool(sharedpool.PoolConfig(name=name, pool_size=budget, autostart=False,
                                                      timeout=timeout), dsn)
    print("ready", os.getpid(), pid_namespace(), flush=True)
    held = []
    for line in sys.stdin:
        verb = line.strip()
        if verb == "get":
            conn = pool.getconn()
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
            held.append(conn)
            print("got", conn.info.backend_pid, flush=True)
        elif verb == "put":
            pool.putconn(held.pop())
            print("put", flush=True)
        elif verb == "exit":
            for conn in held:
                pool.putconn(conn)
            close_all()
            print("bye", flush=True)
            break
    """
)

# Runs on the host: take one connection within TIMEOUT or say "timeout"; hold it until stdin closes.
HOST_WORKER = textwrap.dedent(
    """
    import sys, time
    import sharedpool
    from sharedpool.errors import PoolTimeout
    from sharedpool.pool import close_all
    name, budget, dsn, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    pool = sharedpool.LocalPool(sharedpool.PoolConfig(name=name, pool_size=budget, autostart=False,
                                                      timeout=timeout), dsn)
    start = time.monotonic()
    try:
        conn = pool.getconn()
    except PoolTimeout:
        print("timeout", flush=True)
        conn = None
    else:
        print("got", conn.info.backend_pid, round(time.monotonic() - start, 3), flush=True)
    sys.stdin.read()
    if conn is not None:
        pool.putconn(conn)
    close_all()
    """
)


class NamespacedWorker:
    """A worker under ``unshare ... --pid --fork --mount-proc``, behind a shell that is the namespace's init."""

    def __init__(self, flags: list[str], name: str, budget: int, dsn: str, timeout: float = 5.0) -> None:
        # sh is pid 1 of the new namespace; the worker is its child: killing sh ends the namespace
        self.proc = subprocess.Popen(
            [UNSHARE, *flags, "--fork", "--mount-proc", "--", "sh", "-c", 'exec 3<&0; "$@" <&3 3<&- & wait', "sh",
             PYTHON, "-c", NS_WORKER, name, str(budget), dsn, str(timeout)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
            env={**os.environ, "PYTHONPATH": ROOT}, cwd=ROOT,
        )
        verb, ns_pid, ns_inode = self.line().split()
        assert verb == "ready", verb
        self.ns_pid, self.ns_inode = int(ns_pid), int(ns_inode)

    def line(self, timeout: float = 20.0) -> str:
        from helpers_procs import read_line

        return read_line(self.proc, timeout)

    def send(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.line()

    def init_pid(self) -> int:
        """The host pid of the namespace's init (the shell unshare forked)."""
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
            children = f.read().split()
        assert len(children) == 1, children
        return int(children[0])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with_init = None
        try:
            with_init = self.init_pid()
        except (OSError, AssertionError):
            pass
        if with_init is not None:
            try:
                os.kill(with_init, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except OSError:
                pass


def _host_worker(name: str, budget: int, dsn: str, timeout: float) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-c", HOST_WORKER, name, str(budget), dsn, str(timeout)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT}, cwd=ROOT)


def _finish(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.wait(15) == 0, proc.stderr.read()[-2000:]


def test_namespaced_worker_is_never_reclaimed_while_it_lives_and_is_reclaimed_after_sigkill(unique_name, dsn):
    name, budget = unique_name, 1
    with coordinator(name, budget) as coord:
        worker = NamespacedWorker(["--pid"], name, budget, dsn)
        host = None
        try:
            assert worker.ns_inode != pid_namespace(), "the worker runs in our own PID namespace"
            backend = int(worker.send("get").split()[1])
            ledger = Ledger.attach(name, mapped=False)
            try:
                with PeakSampler(dsn, name) as sampler:
                    # a host worker wants the one permit: it must not get it while the namespaced worker lives
                    host = _host_worker(name, budget, dsn, 3.0)
                    checks = 0
                    deadline = time.monotonic() + 3.5
                    while time.monotonic() < deadline:
                        snap = ledger.snapshot()
                        mine = [s for s in snap.slots if s.pid == worker.ns_pid and s.pid_ns == worker.ns_inode]
                        assert len(mine) == 1 and mine[0].alive and mine[0].held == 1, snap.slots
                        assert snap.free == 0, snap
                        assert sampler.last <= budget
                        checks += 1
                        time.sleep(0.05)
                    answer = host.stdout.readline().strip()
                    assert answer == "timeout", f"the host worker got a connection beside the live one: {answer}"
                    _finish(host)
                    host = None
                    assert "died" not in coord.log() and "reclaimed" not in coord.log(), coord.log()
                    held_peak = sampler.peak
                    assert held_peak == 1, held_peak
                    # SIGKILL the namespace's init: the kernel kills the worker with it
                    init = worker.init_pid()
                    killed = time.monotonic()
                    os.kill(init, signal.SIGKILL)
                    backend_gone = permits_back = None
                    while time.monotonic() - killed < 5.0 and (backend_gone is None or permits_back is None):
                        now = time.monotonic() - killed
                        if backend_gone is None and process_gone(backend):
                            backend_gone = now
                        if permits_back is None and ledger.sem.value == budget:
                            permits_back = now
                        time.sleep(0.001)
                    host = _host_worker(name, budget, dsn, 5.0)
                    answer = host.stdout.readline().strip()
                    _finish(host)
                    host = None
                    time.sleep(0.05)
                assert sampler.peak <= budget, f"server peak {sampler.peak} on budget {budget}"
            finally:
                ledger.close()
        finally:
            if host is not None and host.poll() is None:
                host.kill()
                host.wait()
            worker.close()
        log = coord.log()
    print(f"\npid namespace: {checks} checks over 3.5 s, held and never reclaimed while alive; after SIGKILL of the "
          f"namespace's init: backend gone in {backend_gone * 1000:.0f} ms, permit back in "
          f"{permits_back * 1000:.0f} ms; a host worker then got it ({answer})")
    assert backend_gone is not None and permits_back is not None, log
    assert permits_back >= backend_gone, "permit posted before the dead worker's backend exited"
    assert permits_back <= backend_gone + 1.0, f"reclaim took {permits_back:.2f} s (backend gone {backend_gone:.2f} s)"
    assert answer.startswith("got"), answer
    assert "died holding 1 permit" in log and "reclaimed 1 permit" in log, log


@pytest.mark.skipif(not _can_unshare("--net", "--pid"), reason="unshare --net is not permitted here")
def test_worker_in_its_own_network_namespace_talks_to_the_coordinator_and_other_workers(unique_name, pg, dsn):
    """Filesystem sockets cross network namespaces: shed requests, a reload from inside, and a clean exit."""
    if pg.external:
        pytest.skip("needs the local cluster's unix socket (the network namespace has no route to a TCP server)")
    name, budget = unique_name, 1
    socket_dsn = f"host={pg.socket_dir} port={pg.port} user={pg.user} dbname={pg.dbname}"
    with coordinator(name, budget) as coord:
        worker = NamespacedWorker(["--net", "--pid"], name, budget, socket_dsn)
        host = None
        try:
            net_ns = os.readlink(f"/proc/{worker.init_pid()}/ns/net")
            assert net_ns != os.readlink("/proc/self/ns/net"), "the worker shares our network namespace"
            assert worker.send("get").startswith("got")
            assert worker.send("put") == "put"  # idle in the namespaced worker: it holds the one permit
            with PeakSampler(dsn, name) as sampler:
                # a host worker waits: its shed request reaches the namespaced worker's socket, which gives it up
                host = _host_worker(name, budget, dsn, 5.0)
                answer = host.stdout.readline().strip()
                assert answer.startswith("got"), f"no shed across network namespaces: {answer}"
                handed_over = float(answer.split()[2])
                _finish(host)
                host = None
                time.sleep(0.05)
            assert sampler.peak <= budget
            # the control socket from inside the network namespace: a reload to 2
            reload = subprocess.run(
                [UNSHARE, "--net", "--", PYTHON, "-m", "sharedpool.coordinator", "reload", "--name", name,
                 "--budget", "2", "--wait", "5"], capture_output=True, text=True, timeout=30,
                env={**os.environ, "PYTHONPATH": ROOT}, cwd=ROOT,
            )
            assert reload.returncode == 0, reload.stdout + reload.stderr
            assert wait_until(lambda: "budget 1 -> 2" in coord.log(), 5.0), coord.log()
            # a clean exit from the namespace: the slot is freed, nothing is reclaimed
            assert worker.send("exit") == "bye"
            assert worker.proc.wait(10) == 0, worker.proc.stderr.read()
            ledger = Ledger.attach(name, mapped=False)
            try:
                assert wait_until(lambda: not ledger.snapshot().slots and ledger.sem.value == 2, 3.0)
            finally:
                ledger.close()
        finally:
            if host is not None and host.poll() is None:
                host.kill()
                host.wait()
            worker.close()
        log = coord.log()
    print(f"\nnetwork namespace: shed handed the permit over in {handed_over * 1000:.0f} ms; reload from inside: "
          f"{reload.stdout.strip()[:120]!r}")
    assert "died" not in log and "reclaimed" not in log, log
