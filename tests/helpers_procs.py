"""Start, watch and kill the real processes the tests need: coordinators and workers.

Runs in the pytest process. Every worker is a separate interpreter
(``python -c``), never a fork of pytest, so what it holds is what a gunicorn
worker would hold.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator

import psycopg2

from devtools.pgcluster import server_backends
from sharedpool.ledger import Ledger, proc_stat
from sharedpool.names import PoolNames

PYTHON = sys.executable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def close_and_check_no_leak(pools: list, name: str) -> None:
    """Close the pools a test made, then fail if any permit of pool ``name`` is not back."""
    for pool in pools:
        pool.budget.close()
    ledger = Ledger.attach(name)
    try:
        assert wait_until(lambda: ledger.sem.value == ledger.header.budget), "permits leaked"
    finally:
        ledger.close()


def wait_until(predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.005) -> object:
    """Poll ``predicate`` until it is truthy or ``timeout`` passes; return its last value (assert on it)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def sem_free(name: str) -> int:
    ledger = Ledger.attach(name)
    try:
        return ledger.sem.value
    finally:
        ledger.close()


class CoordinatorProc:
    """A ``sharedpool coordinator`` subprocess with its stderr kept in a file."""

    def __init__(self, name: str, budget: int, *extra: str, remove_on_exit: bool = True, wait: bool = True) -> None:
        self.name = name
        self.logfile = tempfile.NamedTemporaryFile(prefix=f"coord-{name}-", suffix=".log", delete=False)
        argv = [PYTHON, "-m", "sharedpool.coordinator", "coordinator", "--name", name, "--budget", str(budget), "-v"]
        if remove_on_exit:
            argv.append("--remove-on-exit")
        argv += list(extra)
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.logfile, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 10.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"coordinator exited with {self.proc.returncode}:\n{self.log()}")
            if not Ledger.exists(self.name):
                return False
            with contextlib.suppress(Exception):
                return "ready, budget" in self.log()
            return False

        assert wait_until(ready, timeout), f"coordinator {self.name} was not ready in {timeout} s"

    def log(self) -> str:
        with open(self.logfile.name, errors="replace") as f:
            return f.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"coordinator did not stop on {sig}:\n{self.log()}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.logfile.close()
        with contextlib.suppress(OSError):
            os.unlink(self.logfile.name)


def remove_pool_objects(name: str) -> None:
    """Remove every object of pool ``name``, in use or not (test teardown only)."""
    names = PoolNames(name)
    shutil.rmtree(names.directory, ignore_errors=True)
    for path in names.stray_semaphores():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def coordinator(name: str, budget: int, *extra: str, **kwargs: object) -> Iterator[CoordinatorProc]:
    """Run a coordinator for the block; kill it and remove the pool's IPC objects after."""
    coord = CoordinatorProc(name, budget, *extra, **kwargs)
    try:
        yield coord
    finally:
        coord.close()
        remove_pool_objects(name)


# A worker that registers, takes permits on command and reports on stdout.
# Commands on stdin, one per line: "acquire K", "release K", "raw K" (sem
# acquire without recording; inflight += K, as if killed mid-acquire), "exit".
GATE_WORKER = textwrap.dedent(
    """
    import os, sys
    from sharedpool.ledger import Ledger
    from sharedpool.permits import PermitGate
    ledger = Ledger.attach(sys.argv[1])
    gate = PermitGate(ledger, os.getpid())
    account = gate.account
    print("registered", gate.slot_index, flush=True)
    for line in sys.stdin:
        verb, _, arg = line.strip().partition(" ")
        n = int(arg or 1)
        if verb == "acquire":
            for _ in range(n):
                gate.acquire(float(sys.argv[2]) if len(sys.argv) > 2 else 5.0)
        elif verb == "release":
            for _ in range(n):
                gate.release()
        elif verb == "raw":
            for _ in range(n):
                with account.lock:
                    account.inflight += 1
                    account.slot.inflight = account.inflight
                    account._seal(account.slot)
                ledger.sem.acquire(10)
        elif verb == "exit":
            gate.deregister()
            break
        print("ok", verb, n, flush=True)
    """
)


class GateWorker:
    """A separate interpreter holding a PermitGate, driven line by line."""

    def __init__(self, name: str, timeout: float = 5.0) -> None:
        self.proc = subprocess.Popen(
            [PYTHON, "-c", GATE_WORKER, name, str(timeout)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
        )
        line = read_line(self.proc)
        if not line.startswith("registered"):
            raise AssertionError(f"worker failed to register: {line!r} {self.proc.stderr.read()}")
        self.slot_index = int(line.split()[1])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def do(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        line = read_line(self.proc)
        if not line.startswith("ok"):
            raise AssertionError(f"worker command {command!r} failed: {line!r} {self.proc.stderr.read()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError):
                stream.close()

    def exit(self) -> None:
        self.proc.stdin.write("exit\n")
        self.proc.stdin.flush()
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError):
                stream.close()


def kill_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
    for proc in procs:
        proc.wait()


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run the ``sharedpool`` command in a separate interpreter."""
    return subprocess.run(
        [PYTHON, "-m", "sharedpool.coordinator", *args],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


# A worker with the real LocalPool. Commands: "get K" (check out K connections
# and keep them), "put K" (return K), "exit" (return all, close the pool).
POOL_WORKER = textwrap.dedent(
    """
    import sys
    import sharedpool
    from sharedpool.pool import close_all
    name, budget, dsn = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    pool = sharedpool.LocalPool(sharedpool.PoolConfig(name=name, pool_size=budget, autostart=False, timeout=5), dsn)
    held = []
    print("ready", flush=True)
    for line in sys.stdin:
        verb, _, arg = line.strip().partition(" ")
        n = int(arg or 1)
        if verb == "get":
            held += [pool.getconn() for _ in range(n)]
            print("ok", *[c.info.backend_pid for c in held[-n:]], flush=True)
            continue
        if verb == "put":
            for _ in range(n):
                pool.putconn(held.pop())
        elif verb == "exit":
            for conn in held:
                pool.putconn(conn)
            close_all()
            break
        print("ok", flush=True)
    """
)


class PoolWorker(GateWorker):
    """A separate interpreter with a LocalPool, driven line by line."""

    def __init__(self, name: str, budget: int, dsn: str) -> None:
        self.proc = subprocess.Popen(
            [PYTHON, "-c", POOL_WORKER, name, str(budget), dsn],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
        )
        line = read_line(self.proc)
        if not line.startswith("ready"):
            raise AssertionError(f"pool worker failed to start: {line!r} {self.proc.stderr.read()}")

    def get(self, n: int) -> list[int]:
        """Check out ``n`` connections; return their backend pids."""
        self.proc.stdin.write(f"get {n}\n")
        line = read_line(self.proc)
        if not line.startswith("ok"):
            raise AssertionError(f"get {n} failed: {line!r} {self.proc.stderr.read()}")
        return [int(p) for p in line.split()[1:]]


# -- torture workers: module-level so a forkserver can run them ------------------------


def _lower_priority() -> None:
    # workers yield the CPU to the server, the coordinator and the test's samplers
    with contextlib.suppress(OSError):
        os.nice(10)


def torture_pool_worker(name: str, budget: int, dsn: str) -> None:
    """Loop on the real LocalPool from two threads: check out, query or sleep, return or discard.

    10% of the holds are server-side sleeps long enough that a killed worker's
    backend outlives it; half the connections are discarded on return, so
    permits churn.
    """
    import random
    import threading

    import sharedpool

    _lower_priority()
    pool = sharedpool.LocalPool(
        sharedpool.PoolConfig(name=name, pool_size=budget, max_per_process=2, autostart=False, timeout=60, pre_ping=None),
        dsn,
    )

    def loop(seed: int) -> None:
        rng = random.Random(seed)
        while True:
            conn = pool.getconn()
            r = rng.random()
            with conn.cursor() as cur:
                if r < 0.1:
                    cur.execute("SELECT pg_sleep(%s)", (rng.uniform(0.05, 0.3),))
                elif r < 0.5:
                    cur.execute("SELECT pg_sleep(%s)", (rng.uniform(0, 0.02),))
                else:
                    cur.execute("SELECT 1")
                    time.sleep(rng.uniform(0, 0.02))
            pool.putconn(conn, discard=rng.random() < 0.5)

    threads = [threading.Thread(target=loop, args=(os.getpid() * 2 + i,), daemon=True) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def torture_gate_worker(name: str, budget: int, dsn: str) -> None:
    """Loop on PermitGate and raw psycopg2: acquire, connect, hold, close synchronously, release.

    The server checks for a dead client every 100 ms, so a killed worker's
    backend in ``pg_sleep`` is gone well within RECLAIM_GRACE.
    """
    import random

    import psycopg2

    from sharedpool.permits import PermitGate
    from sharedpool.closing import close_synchronously

    _lower_priority()
    gate = PermitGate(Ledger.attach(name))
    rng = random.Random(os.getpid())
    while True:
        gate.acquire(60)
        try:
            conn = psycopg2.connect(
                dsn, application_name=f"sharedpool/{name}", options="-c client_connection_check_interval=100ms"
            )
        except BaseException:
            gate.release()
            raise
        with conn.cursor() as cur:
            if rng.random() < 0.3:
                cur.execute("SELECT pg_sleep(%s)", (rng.uniform(0.0, 0.2),))
            else:
                cur.execute("SELECT 1")
                time.sleep(rng.uniform(0, 0.02))
        assert close_synchronously(conn) is None, "the backend did not exit"
        gate.release()


def sample_server(dsn: str, app_name: str, budget: int, stop, results) -> None:
    """Count ``app_name``'s client backends in pg_stat_activity until ``stop`` is set.

    Runs in a process of its own at a raised priority, so neither the test's
    GIL nor the churning workers delay it; puts a dict of results on ``results``.
    """
    import psycopg2

    conn = psycopg2.connect(dsn, application_name="torture-sampler")
    conn.autocommit = True
    try:
        # real-time, so a busy 2-CPU machine cannot stretch the interval (it sleeps between samples)
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except OSError:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, -10)
    with contextlib.suppress(OSError):  # the backend answering us (not real-time: it takes spinlocks)
        os.setpriority(os.PRIO_PROCESS, conn.info.backend_pid, -10)
    samples = peak = late = 0
    over: list = []
    max_gap = 0.0
    last = time.monotonic()
    with conn.cursor() as cur:
        while not stop.is_set():
            cur.execute(
                "SELECT pid, state, backend_start::text, query FROM pg_stat_activity "
                "WHERE backend_type = 'client backend' AND application_name = %s",
                (app_name,),
            )
            rows = cur.fetchall()
            now = time.monotonic()
            max_gap = max(max_gap, now - last)
            late += now - last > 0.020
            last = now
            samples += 1
            peak = max(peak, len(rows))
            if len(rows) > budget and len(over) < 20:
                over.append((now, rows))
            time.sleep(0.002)
    conn.close()
    results.put({"samples": samples, "peak": peak, "over": over, "max_gap": max_gap, "late": late})


def run_in_threads(work: Callable[[], object], count: int) -> list[BaseException]:
    """Run ``work`` in ``count`` threads at once; return what they raised."""
    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - returned to the test
            errors.append(exc)

    threads = [threading.Thread(target=guarded) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def start_worker(code: str, **env: str) -> subprocess.Popen:
    """Start a separate interpreter running ``code``; it talks through stdin/stdout lines."""
    return subprocess.Popen(
        [PYTHON, "-c", textwrap.dedent(code)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
        env={**os.environ, "PYTHONPATH": ROOT, **env}, cwd=ROOT,
    )


def read_line(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    """Read one stdout line, failing with the worker's stderr if it dies or stalls."""
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not result or not result[0]:
        proc.kill()
        raise AssertionError(f"process {proc.pid} said nothing: {proc.stderr.read()[-3000:] if proc.stderr else ''}")
    return result[0].strip()


def finish(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    """Close stdin (the worker's cue to exit) and return its remaining output."""
    out, err = proc.communicate("", timeout=timeout)
    assert proc.returncode == 0, f"worker {proc.pid} exited {proc.returncode}: {err[-3000:]}"
    return out


def backends(dsn: str, name: str) -> int:
    """Count the pool's server connections in pg_stat_activity right now."""
    return server_backends(dsn, f"sharedpool/{name}")


def on_server(dsn: str, backend_pid: int) -> bool:
    """Tell whether the server still lists backend ``backend_pid`` in pg_stat_activity."""
    conn = psycopg2.connect(dsn, application_name="test-probe")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (backend_pid,))
            return cur.fetchone()[0] == 1
    finally:
        conn.close()


def process_gone(pid: int) -> bool:
    """Tell whether ``pid`` has exited (a zombie nobody reaped yet counts as gone)."""
    fields = proc_stat(pid)
    return fields is None or fields[0] in (b"Z", b"X")


class PeakSampler(threading.Thread):
    """Sample the pool's server connections (application_name sharedpool/NAME) every ``interval``.

    ``stop()`` fails the test if sampling broke or never happened: a cap
    check over no samples would pass without evidence.
    """

    def __init__(self, dsn: str, name: str, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.conn = psycopg2.connect(dsn, application_name="test-sampler")
        self.conn.autocommit = True
        self.app_name = f"sharedpool/{name}"
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self.last = 0
        self.seen: set[tuple[int, object]] = set()  # (pid, backend_start) of every backend ever sampled
        self.history: list[tuple[float, int]] = []  # (monotonic time, count) of every sample
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def count(self) -> int:
        with self.conn.cursor() as cur:
            cur.execute(
                "SELECT pid, backend_start FROM pg_stat_activity WHERE backend_type = 'client backend' "
                "AND application_name = %s",
                (self.app_name,),
            )
            rows = cur.fetchall()
        self.seen.update(rows)
        return len(rows)

    def server_now(self) -> object:
        """The server's clock, to compare with backend_start (a separate connection: no thread shares one)."""
        conn = psycopg2.connect(self.conn.dsn, application_name="test-sampler-clock")
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT clock_timestamp()")
                return cur.fetchone()[0]
        finally:
            conn.close()

    def started_since(self, mark: object) -> int:
        """Backends of the pool the server started after ``mark`` (server time), as sampled."""
        return sum(1 for _, started in list(self.seen) if started > mark)

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                self.last = self.count()
                self.history.append((time.monotonic(), self.last))
                self.peak = max(self.peak, self.last)
                self.samples += 1
                self._stop_event.wait(self.interval)
        except BaseException as exc:  # noqa: BLE001 - re-raised in stop()
            self.error = exc

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.conn.close()
        if self.error is not None:
            raise AssertionError(f"the server sampler failed: {self.error!r}") from self.error
        assert self.samples > 0, "the server sampler took no sample"
        return self.peak

    def __enter__(self) -> "PeakSampler":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.is_alive() or not self.conn.closed:
            self.stop()
