"""Fuzz the LIVE ledger file while real workers and the coordinator run; judge on the server.

Six worker processes loop on the real LocalPool against the real PostgreSQL
(short queries, two threads each, every error of ours or of psycopg2 caught
and counted). Meanwhile the test writes into the ledger file through pwrite:
random bytes in the header and in the slots, the extremes of every header
field and of random slot fields, and truncation (to 0, to the header size, to
a random size; the coordinator must restore the size). A worker that touches
a truncated page dies of SIGBUS (faulthandler prints where); dead workers are
respawned to keep the load, and every death is reported with its message.

Judged on the server: ``pg_stat_activity`` is sampled every few ms (a
real-time process of its own) and never shows more than the budget. The coordinator does not spin (its CPU time stays
well below the wall time) and stops on SIGTERM within seconds; surviving
workers still make progress at the end. Then a second coordinator adopts the
ledger and the pool is correct again: every permit free once the workers are
gone, and a fresh set of workers holds exactly the budget, no more.

``FUZZ_MUTATIONS`` (default 1000) sets the number of mutations; ``make fuzz``
runs more. ``FUZZ_MAX_IDLE`` (default 1 s) sets the workers' MAX_IDLE, hence how
often they heal their slot (MAX_IDLE / 2, at most 30 s). Figures are printed (run with ``-s``) and recorded as properties.
"""
from __future__ import annotations

import collections
import ctypes
import math
import multiprocessing
import os
import random
import signal
import struct
import subprocess
import tempfile
import textwrap
import threading
import time

import pytest

from sharedpool.ledger import HEADER_SIZE, SLOT_SIZE, Header, Ledger, Slot, segment_size
from sharedpool.names import LEDGER_FILE, PoolNames

from helpers_procs import PYTHON, ROOT, CoordinatorProc, PeakSampler, remove_pool_objects, sample_server, wait_until

BUDGET = 3
WORKERS = 6
NSLOTS = 32  # the coordinator's slot count (--slots): workers use the low ones
MUTATIONS = int(os.environ.get("FUZZ_MUTATIONS", "1000"))
INTERVAL = 0.025  # seconds between two mutations
HOT_SLOTS = 16  # slots the mutator aims at: every worker (and respawn) claims one of the lowest free slots
MAX_IDLE = float(os.environ.get("FUZZ_MAX_IDLE", "1.0"))  # workers heal (republish) their slot every MAX_IDLE / 2 (at most 30 s)

# A worker: two threads loop on getconn / short query / putconn; a reporter prints progress.
FUZZ_WORKER = textwrap.dedent(
    """
    import os, random, sys, threading, time, traceback
    import psycopg2
    import sharedpool
    from sharedpool.errors import SharedPoolError

    name, budget, dsn, max_idle = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    os.nice(10)
    pool = sharedpool.LocalPool(
        sharedpool.PoolConfig(name=name, pool_size=budget, max_per_process=2, autostart=False, timeout=2,
                              pre_ping=None, max_idle=max_idle),
        dsn,
    )
    lock = threading.Lock()
    done = [0]
    errors = {}

    def loop(seed):
        rng = random.Random(seed)
        while True:
            try:
                conn = pool.getconn()
                try:
                    with conn.cursor() as cur:
                        if rng.random() < 0.3:
                            cur.execute("SELECT pg_sleep(%s)", (rng.uniform(0, 0.02),))
                        else:
                            cur.execute("SELECT 1")
                        cur.fetchall()
                except BaseException:
                    pool.putconn(conn, discard=True)
                    raise
                pool.putconn(conn, discard=rng.random() < 0.3)
                with lock:
                    done[0] += 1
            except (SharedPoolError, psycopg2.Error) as exc:
                key = type(exc).__name__ + ": " + str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
                with lock:
                    first = key not in errors
                    errors[key] = errors.get(key, 0) + 1
                if first:
                    print("error", key, flush=True)
                time.sleep(0.01)
            except BaseException:
                sys.stderr.write("UNEXPECTED in worker %d:\\n" % os.getpid())
                traceback.print_exc()
                sys.stderr.flush()
                os._exit(3)

    for i in range(2):
        threading.Thread(target=loop, args=(os.getpid() * 2 + i,), daemon=True).start()
    while True:
        with lock:
            print("progress", done[0], sum(errors.values()), flush=True)
        time.sleep(0.2)
    """
)

# A worker of the final check: take one connection (TIMEOUT argv[4]) and hold it until stdin closes.
HOLD_WORKER = textwrap.dedent(
    """
    import sys
    import sharedpool
    from sharedpool.errors import PoolTimeout
    from sharedpool.pool import close_all
    name, budget, dsn, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    pool = sharedpool.LocalPool(sharedpool.PoolConfig(name=name, pool_size=budget, autostart=False, timeout=timeout), dsn)
    try:
        conn = pool.getconn()
    except PoolTimeout as exc:
        print("timeout", str(exc).replace(chr(10), " "), flush=True)
        conn = None
    else:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        print("got", conn.info.backend_pid, flush=True)
    sys.stdin.read()
    if conn is not None:
        pool.putconn(conn)
    close_all()
    """
)


class Worker:
    """One fuzz worker process; a thread reads its progress lines."""

    def __init__(self, name: str, dsn: str, logdir: str, serial: int) -> None:
        self.log_path = os.path.join(logdir, f"worker-{serial}.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [PYTHON, "-X", "faulthandler", "-c", FUZZ_WORKER, name, str(BUDGET), dsn, str(MAX_IDLE)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log, text=True,
            env={**os.environ, "PYTHONPATH": ROOT}, cwd=ROOT,
        )
        self.done = 0
        self.errors = 0
        self.error_kinds: list[str] = []
        self.started = time.monotonic()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            verb, _, rest = line.strip().partition(" ")
            if verb == "progress":
                done, errors = rest.split()
                self.done, self.errors = int(done), int(errors)
            elif verb == "error":
                self.error_kinds.append(rest)

    def stderr(self) -> str:
        self._log.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.reader.join(5)
        self.proc.stdout.close()
        self._log.close()


class GapSampler(PeakSampler):
    """PeakSampler that also records the longest gap between samples and every sample above the budget."""

    def __init__(self, dsn: str, name: str, budget: int) -> None:
        super().__init__(dsn, name, interval=0.01)
        self.budget = budget
        self.max_gap = 0.0
        self.late = 0
        self.over: list[tuple[float, int]] = []
        self._last = None

    def run(self) -> None:
        # this thread real-time (root) and its backend favoured, so a busy 2-CPU machine cannot stretch the interval
        try:
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_FIFO, os.sched_param(10))
        except OSError:
            pass
        try:
            os.setpriority(os.PRIO_PROCESS, self.conn.info.backend_pid, -10)
        except OSError:
            pass
        super().run()

    def count(self) -> int:
        n = super().count()
        now = time.monotonic()
        if self._last is not None:
            gap = now - self._last
            self.max_gap = max(self.max_gap, gap)
            self.late += gap > 0.020
        self._last = now
        if n > self.budget:
            self.over.append((now, n))
        return n


# -- mutations ---------------------------------------------------------------------------


def _extremes(ctype) -> list[bytes]:
    size = ctypes.sizeof(ctype)
    if ctype is ctypes.c_double:
        return [struct.pack("<d", v) for v in (0.0, math.inf, -math.inf, math.nan, 1e308, -1.0)]
    values = [bytes(size), b"\xff" * size]  # 0 and the unsigned maximum (-1 for signed)
    if ctype in (ctypes.c_int32, ctypes.c_int64):
        values += [b"\xff" * (size - 1) + b"\x7f", bytes(size - 1) + b"\x80"]  # signed max and min
    else:
        values.append((1).to_bytes(size, "little"))
    return values


def _fields(structure) -> list[tuple[str, int, list[bytes]]]:
    out = []
    for name, ctype in structure._fields_:
        field = getattr(structure, name)
        if hasattr(ctype, "_length_"):  # an array (a slot's backend pids): its elements' extremes
            extremes = _extremes(ctype._type_)
            width = ctypes.sizeof(ctype._type_)
            for i in range(ctype._length_):
                out.append((f"{name}[{i}]", field.offset + i * width, extremes))
        else:
            out.append((name, field.offset, _extremes(ctype)))
    return out


HEADER_FIELDS = _fields(Header)
SLOT_FIELDS = _fields(Slot)


class Mutator(threading.Thread):
    """Write into the live ledger file every INTERVAL through pwrite; never map it (no SIGBUS here)."""

    def __init__(self, name: str, count: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.fd = os.open(PoolNames(name).path(LEDGER_FILE), os.O_RDWR | os.O_CLOEXEC)
        self.size = segment_size(NSLOTS)
        assert os.fstat(self.fd).st_size == self.size
        self.rng = random.Random(seed)
        self.count = count
        self.kinds = collections.Counter()
        self.restore_times: list[float] = []
        self.unrestored = 0
        self.done = 0
        self.error: BaseException | None = None
        self.stop_event = threading.Event()
        # every extreme of every header field at least once, and every kind of truncation a few times
        plan: list[tuple] = [("header-extreme", name_, offset, value)
                             for name_, offset, values in HEADER_FIELDS for value in values]
        truncations = max(9, count // 100)
        plan += [("truncate", ("zero", "header", "random")[i % 3]) for i in range(truncations)]
        plan += [("random",)] * max(0, count - len(plan))
        self.rng.shuffle(plan)
        self.plan = plan

    def mutate(self, step: tuple) -> None:
        rng, fd = self.rng, self.fd
        if step[0] == "header-extreme":
            _, _, offset, value = step
            os.pwrite(fd, value, offset)
            self.kinds["header-extreme"] += 1
            return
        if step[0] == "truncate":
            target = {"zero": 0, "header": HEADER_SIZE,
                      "random": rng.randrange(1, self.size)}[step[1]]
            os.ftruncate(fd, target)
            self.kinds[f"truncate-{step[1]}"] += 1
            started = time.monotonic()
            # the coordinator restores the size; wait for it (writing meanwhile would grow the file for it)
            while os.fstat(fd).st_size < self.size and time.monotonic() - started < 3.0:
                time.sleep(0.002)
            if os.fstat(fd).st_size < self.size:
                self.unrestored += 1
            else:
                self.restore_times.append(time.monotonic() - started)
            return
        r = rng.random()
        if r < 0.25:
            offset = rng.randrange(HEADER_SIZE)
            data = rng.randbytes(rng.randint(1, 8))
            self.kinds["header-random"] += 1
        elif r < 0.35:
            _, offset, values = rng.choice(HEADER_FIELDS)
            data = rng.choice(values)
            self.kinds["header-extreme"] += 1
        elif r < 0.65:
            index = rng.randrange(HOT_SLOTS)
            offset = HEADER_SIZE + index * SLOT_SIZE + rng.randrange(SLOT_SIZE)
            data = rng.randbytes(rng.randint(1, 16))
            self.kinds["slot-random"] += 1
        elif r < 0.95:
            index = rng.randrange(HOT_SLOTS)
            _, field_offset, values = rng.choice(SLOT_FIELDS)
            offset = HEADER_SIZE + index * SLOT_SIZE + field_offset
            data = rng.choice(values)
            self.kinds["slot-extreme"] += 1
        else:
            index = rng.randrange(HOT_SLOTS)
            offset = HEADER_SIZE + index * SLOT_SIZE
            data = rng.randbytes(SLOT_SIZE)
            self.kinds["slot-whole"] += 1
        # never write past the current end: that would grow a truncated file instead of the coordinator
        end = min(offset + len(data), os.fstat(fd).st_size)
        if end > offset:
            os.pwrite(fd, data[: end - offset], offset)

    def run(self) -> None:
        try:
            for step in self.plan:
                if self.stop_event.is_set():
                    break
                self.mutate(step)
                self.done += 1
                time.sleep(INTERVAL)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test
            self.error = exc
        finally:
            os.close(self.fd)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _death(worker: Worker) -> str:
    code = worker.proc.returncode
    how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
    text = worker.stderr()
    lines = [line for line in text.splitlines() if line.strip()]
    first = next((line for line in lines if "Fatal Python error" in line or "Error" in line), lines[0] if lines else "")
    return f"{how}: {first.strip()[:200] or '(no message)'}"


@pytest.mark.slow
def test_fuzz_live_ledger_never_over_grants(unique_name, dsn, record_property):
    name = unique_name
    logdir = tempfile.mkdtemp(prefix=f"fuzz-{name}-")
    workers: list[Worker] = []
    dead: list[Worker] = []
    serial = 0
    coord = coord2 = sampler = None
    hold_procs: list[subprocess.Popen] = []

    def spawn() -> Worker:
        nonlocal serial
        serial += 1
        return Worker(name, dsn, logdir, serial)

    try:
        coord = CoordinatorProc(name, BUDGET, "--slots", str(NSLOTS), remove_on_exit=False)
        # the server sampler is a process of its own (real-time): the test's GIL and forks cannot stretch it
        ctx = multiprocessing.get_context("spawn")
        stop_sampling, results = ctx.Event(), ctx.Queue()
        sampler = ctx.Process(target=sample_server, args=(dsn, f"sharedpool/{name}", BUDGET, stop_sampling, results),
                              daemon=True)
        sampler.start()
        assert wait_until(lambda: _sampling(dsn), 30.0), "the server sampler did not start"
        workers = [spawn() for _ in range(WORKERS)]
        assert wait_until(lambda: all(w.done > 0 for w in workers), 30.0), \
            "workers did not start working: " + " | ".join(w.stderr()[-500:] for w in workers)
        mutator = Mutator(name, MUTATIONS, seed=int.from_bytes(os.urandom(4), "little"))
        cpu_before, wall_before = _cpu_seconds(coord.pid), time.monotonic()
        mutator.start()
        while mutator.is_alive():
            for i, worker in enumerate(workers):
                if worker.proc.poll() is not None:
                    dead.append(worker)
                    workers[i] = spawn()
            time.sleep(0.05)
        mutator.join()
        fuzz_wall = time.monotonic() - wall_before
        if mutator.error is not None:
            raise mutator.error
        # the mutator stopped: the coordinator heals, the workers republish; they must go on working
        time.sleep(1.5)
        for i, worker in enumerate(workers):
            if worker.proc.poll() is not None:
                dead.append(worker)
                workers[i] = spawn()
        settle_mark = {id(w): w.done for w in workers}
        time.sleep(3.0)
        progress = {w.proc.pid: w.done - settle_mark[id(w)] for w in workers if w.proc.poll() is None}
        snap = _snapshot(name)
        cpu = _cpu_seconds(coord.pid) - cpu_before
        wall = time.monotonic() - wall_before
        # SIGTERM while the workers still run: it must answer at once
        sent = time.monotonic()
        coord.proc.send_signal(signal.SIGTERM)
        try:
            coord_rc = coord.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            coord_rc = None
        stop_seconds = time.monotonic() - sent
        coord_log = coord.log()
        for worker in workers:
            if worker.proc.poll() is not None:
                dead.append(worker)
            worker.stop()
        time.sleep(0.3)  # the sampler sees the last backends go
        stop_sampling.set()
        server = results.get(timeout=30)
        sampler.join(10)

        deaths = collections.Counter(_death(w) for w in dead)
        error_kinds = collections.Counter(k.split(":")[0] for w in dead + workers for k in w.error_kinds)
        report = (
            f"{mutator.done} mutations in {fuzz_wall:.1f} s ({dict(mutator.kinds)}); "
            f"size restored after truncation in max {max(mutator.restore_times, default=0) * 1000:.0f} ms "
            f"({mutator.unrestored} not within 3 s); server peak {server['peak']} on budget {BUDGET} over "
            f"{server['samples']} samples (max gap {server['max_gap'] * 1000:.0f} ms, {server['late']} gaps > 20 ms), "
            f"{len(server['over'])} samples over budget; {len(dead)} worker deaths {dict(deaths)}; "
            f"worker error kinds {dict(error_kinds)}; queries {sum(w.done for w in dead + workers)}; "
            f"progress in the last 3 s {sorted(progress.values())}; coordinator CPU {cpu:.2f} s over {wall:.1f} s, "
            f"stopped {stop_seconds:.2f} s after SIGTERM (rc {coord_rc}); coordinator log: "
            f"{coord_log.count('someone truncated')} truncations seen, {coord_log.count('died holding')} deaths, "
            f"{coord_log.count('without a record')} deaths with a lost record and live backends, "
            f"{coord_log.count('audit returned')} exact-count returns, {coord_log.count('exceeds')} take-backs"
        )
        print("\n" + report)
        for key, value in (("mutations", mutator.done), ("server_peak", server["peak"]),
                           ("over_budget_samples", len(server["over"])), ("server_samples", server["samples"]), ("worker_deaths", len(dead)),
                           ("coordinator_cpu_s", round(cpu, 2)), ("sigterm_stop_s", round(stop_seconds, 2))):
            record_property(key, value)
        assert mutator.done >= MUTATIONS, report
        assert not server["over"] and server["peak"] <= BUDGET, f"over-grant on the server: {server['over'][:3]}; {report}"
        assert server["samples"] * 0.020 > fuzz_wall, f"too few server samples: {report}"
        assert coord_rc == 0 and stop_seconds < 5.0, f"coordinator did not stop on SIGTERM: {report}\n{coord_log[-3000:]}"
        assert cpu < 0.5 * wall, f"the coordinator spins: {report}"
        assert "Traceback" not in coord_log, coord_log[-5000:]
        assert progress and all(n > 0 for n in progress.values()), f"a worker made no progress at the end: {report}\n{snap}\n{coord_log[-4000:]}"
        for worker in dead:
            # allowed: SIGBUS from a truncated page (faulthandler names it); anything else is a bug
            assert worker.proc.returncode == -signal.SIGBUS, f"worker died otherwise: {_death(worker)}\n{worker.stderr()[-3000:]}"
            assert "Bus error" in worker.stderr(), worker.stderr()[-2000:]

        # -- a new coordinator adopts what is left and puts the pool right --------------------
        coord2 = CoordinatorProc(name, BUDGET, "--slots", str(NSLOTS))
        assert "adopted existing ledger" in coord2.log(), coord2.log()
        ledger = Ledger.attach(name, mapped=False)
        try:
            assert wait_until(lambda: ledger.sem.value == BUDGET and not ledger.snapshot().slots, 10.0), \
                f"free {ledger.sem.value} on budget {BUDGET} after adoption: {ledger.snapshot().holders_text()}\n{coord2.log()}"
        finally:
            ledger.close()
        with PeakSampler(dsn, name) as final:
            for _ in range(BUDGET + 1):
                hold_procs.append(subprocess.Popen(
                    [PYTHON, "-c", HOLD_WORKER, name, str(BUDGET), dsn, "2"], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT},
                ))
            answers = [proc.stdout.readline().strip() for proc in hold_procs]
            holding = final.count()
            for proc in hold_procs:
                proc.stdin.close()
            for proc in hold_procs:
                assert proc.wait(15) == 0, proc.stderr.read()[-2000:]
            time.sleep(0.1)
        got = [a for a in answers if a.startswith("got")]
        print(f"after adoption: {len(got)} of {BUDGET + 1} fresh workers got a connection, server count "
              f"{holding}, peak {final.peak}; answers {[a[:60] for a in answers]}")
        assert len(got) == BUDGET and holding == BUDGET and final.peak == BUDGET, answers
        assert sum(a.startswith("timeout") for a in answers) == 1, answers
        assert wait_until(lambda: _free(name) == BUDGET, 3.0)
        assert coord2.stop() == 0
        assert not os.path.exists(PoolNames(name).directory), "the pool was not removed on exit"
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.kill()
            sampler.join()
        for proc in hold_procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for worker in workers:
            worker.stop()
        for c in (coord, coord2):
            if c is not None:
                c.close()
        remove_pool_objects(name)
        for entry in os.listdir(logdir):
            os.unlink(os.path.join(logdir, entry))
        os.rmdir(logdir)


def _sampling(dsn: str) -> bool:
    import psycopg2

    conn = psycopg2.connect(dsn, application_name="test-probe")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'torture-sampler'")
            return cur.fetchone()[0] > 0
    finally:
        conn.close()


def _snapshot(name: str) -> str:
    ledger = Ledger.attach(name, mapped=False)
    try:
        snap = ledger.snapshot()
        return (f"free {snap.free}, physical {snap.physical}, budget {snap.budget}, hold {ledger.header.hold}, "
                f"slots: " + "; ".join(f"#{s.index} pid {s.pid} alive {s.alive} verified {s.verified} held {s.held} "
                                       f"inflight {s.inflight} waiting {s.waiting}" for s in snap.slots))
    finally:
        ledger.close()


def _free(name: str) -> int:
    ledger = Ledger.attach(name, mapped=False)
    try:
        return ledger.sem.value
    finally:
        ledger.close()


# A worker whose connection runs a long query with CHECK_INTERVAL off: its backend outlives it.
LONG_QUERY_WORKER = textwrap.dedent(
    """
    import sys
    import sharedpool
    name, budget, dsn = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    pool = sharedpool.LocalPool(sharedpool.PoolConfig(name=name, pool_size=budget, autostart=False, timeout=5,
                                                      check_interval=None), dsn)
    conn = pool.getconn()
    print("backend", conn.info.backend_pid, flush=True)
    with conn.cursor() as cur:
        cur.execute("SELECT pg_sleep(4)")
    """
)


def _backend_running(dsn: str, pid: int) -> bool:
    import psycopg2

    conn = psycopg2.connect(dsn, application_name="test-probe")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,))
            row = cur.fetchone()
    finally:
        conn.close()
    return row is not None and row[0] == "active"


@pytest.mark.parametrize("loss", ["truncate", "zero-backends", "random-slot"])
def test_a_dead_workers_lost_record_never_over_grants(unique_name, dsn, loss):
    """A worker dies after its slot record was lost, while its backend still runs a query.

    ``truncate``: it dies while the ledger is truncated (its slot comes back
    as zeros when the coordinator restores the size). ``zero-backends``: its
    backend pids were overwritten with zeros (the rest of the slot, and its
    check value, intact). ``random-slot``: its whole slot was overwritten.
    The dead worker's permit must not be posted while its backend runs.
    """
    name, budget = unique_name, 1
    hold = None
    with _coordinator(name, budget) as coord:
        victim = subprocess.Popen([PYTHON, "-c", LONG_QUERY_WORKER, name, str(budget), dsn], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT})
        try:
            backend = int(victim.stdout.readline().split()[1])
            assert wait_until(lambda: _backend_running(dsn, backend), 5.0)
            with GapSampler(dsn, name, budget) as sampler:
                fd = os.open(PoolNames(name).path(LEDGER_FILE), os.O_RDWR | os.O_CLOEXEC)
                try:
                    time.sleep(0.3)  # the coordinator has looked at the worker's intact slot
                    if loss == "truncate":
                        os.ftruncate(fd, HEADER_SIZE)
                    elif loss == "zero-backends":
                        os.pwrite(fd, bytes(Slot.backends.size), HEADER_SIZE + Slot.backends.offset)  # slot 0: its own
                        time.sleep(0.3)  # the coordinator looks at the slot meanwhile
                    else:
                        os.pwrite(fd, random.randbytes(SLOT_SIZE), HEADER_SIZE)
                        time.sleep(0.3)
                    victim.kill()  # as SIGBUS would, touching a slot before the coordinator restores the size
                    victim.wait()
                    killed = time.monotonic()
                    assert wait_until(lambda: os.fstat(fd).st_size == segment_size(8), 3.0), "size not restored"
                finally:
                    os.close(fd)
                hold = subprocess.Popen([PYTHON, "-c", HOLD_WORKER, name, str(budget), dsn, "10"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env={**os.environ, "PYTHONPATH": ROOT})
                answer = hold.stdout.readline().strip()
                got_after = time.monotonic() - killed
                backend_gone = wait_until(lambda: not _backend_running(dsn, backend), 10.0)
                gone_after = time.monotonic() - killed
                time.sleep(0.1)
            hold.stdin.close()
            assert hold.wait(15) == 0, hold.stderr.read()
        finally:
            for proc in (victim, hold):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
        log = coord.log()
    print(f"\nlost record ({loss}): a new worker got a connection {got_after:.2f} s after the death, the dead worker's "
          f"backend ended {gone_after:.2f} s after it; server peak {sampler.peak} on budget {budget} "
          f"({len(sampler.over)} samples over)")
    assert backend_gone
    assert answer.startswith("got"), answer
    assert not sampler.over, f"over-grant: {sampler.over[:5]}; got after {got_after:.2f} s, backend gone after " \
                             f"{gone_after:.2f} s\n{log[-3000:]}"


def _coordinator(name: str, budget: int):
    from helpers_procs import coordinator

    return coordinator(name, budget, "--slots", "8")


@pytest.mark.parametrize("forged", [{"physical": 40}, {"budget": 40}, {"physical": 40, "budget": 40},
                                    {"retire_debt": 37}, {"physical": 40, "retire_debt": 37}])
def test_adoption_never_trusts_forged_header_totals(unique_name, dsn, forged):
    """The header is overwritten while no coordinator runs; the next one adopts it with waiters queued.

    Workers keep working without a coordinator: three hold the budget and two
    wait when the new coordinator adopts the forged header. It must not post
    phantom permits: the waiters time out and the server never sees more
    than the budget.
    """
    name, budget = unique_name, 3
    first = CoordinatorProc(name, budget, "--slots", "8", remove_on_exit=False)
    second = None
    holders: list[subprocess.Popen] = []
    try:
        assert first.stop() == 0
        fd = os.open(PoolNames(name).path(LEDGER_FILE), os.O_RDWR | os.O_CLOEXEC)
        try:
            for field, value in forged.items():
                os.pwrite(fd, value.to_bytes(getattr(Header, field).size, "little"), getattr(Header, field).offset)
        finally:
            os.close(fd)
        answers: dict[int, str] = {}

        def read(i: int, proc: subprocess.Popen) -> None:
            answers[i] = proc.stdout.readline().strip()

        readers = []
        # a forged budget makes workers refuse to attach (POOL_SIZE disagrees): they start after the adoption
        early = "budget" not in forged
        with GapSampler(dsn, name, budget) as sampler:
            if not early:
                second = CoordinatorProc(name, budget, "--slots", "8")
            for i in range(budget + 2):
                holders.append(subprocess.Popen(
                    [PYTHON, "-c", HOLD_WORKER, name, str(budget), dsn, "6"], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT}))
                readers.append(threading.Thread(target=read, args=(i, holders[-1]), daemon=True))
                readers[-1].start()
            assert wait_until(lambda: sum(a.startswith("got") for a in answers.values()) == budget, 20.0), answers
            if early:
                time.sleep(0.3)  # the other two wait on the semaphore
                second = CoordinatorProc(name, budget, "--slots", "8")
            for reader in readers:
                reader.join(20)
            free_after = _free(name)
            for proc in holders:
                proc.stdin.close()
            for proc in holders:
                proc.wait(15)
        log = second.log()
    finally:
        for proc in holders:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for c in (first, second):
            if c is not None:
                c.close()
        remove_pool_objects(name)
    answers = list(answers.values())
    got = sum(a.startswith("got") for a in answers)
    print(f"\nforged {forged}: {got} of {budget + 2} workers got a connection, free {free_after} after the "
          f"waiters gave up, server peak {sampler.peak}")
    assert got == budget and sampler.peak <= budget, (answers, log)
    assert free_after == 0, f"{free_after} free permits while {budget} are held on budget {budget}\n{log}"
