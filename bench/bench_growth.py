"""How sharedpool's costs grow with the number of worker processes.

    .venv/bin/python bench/bench_growth.py [--parts hotpath,coordinator,reclaim,memory,deferral,many]
                                           [--workers 8,64,256] [--seconds 5] [--dsn DSN]

Parts (each prints its figures and appends one JSON line to bench/results/growth.jsonl):

hotpath      with N other worker processes registered in the ledger: warm
             checkout + return through LocalPool (one warm connection) and
             permit try_acquire + release through the gate, median of
             interleaved rounds; also one victim choice (a waiter's ledger
             scan, off the hot path) for scale.
coordinator  the coordinator's CPU (utime + stime from /proc) per second of
             wall time with N registered workers, idle, then under churn: 10 %
             of the workers replaced every second and every worker taking and
             releasing a permit 20 times a second.
reclaim      64 workers each holding an open pooled connection are SIGKILLed
             at once; the time from the kill to each permit's return (p50,
             p99, last), the time the last backend left the server, and
             whether free permits ever ran ahead of the backends that left.
memory       per worker: the ledger slot (bytes of shared memory) and the
             private memory (USS, /proc/self/smaps_rollup) a worker gains by
             registering (listener thread and socket, mapping) and by opening
             one connection.
deferral     gunicorn, 8 sync workers on a budget of 4 (pool_app), 16 wrk
             connections on a 2 ms query for --seconds: the CPU of the
             workers holding a connection and of those deferring their
             accepts to them (what looking at the ledger every DEFER_POLL costs).
many         gunicorn, 200 sync workers on a budget of 100 (pool_app from
             tests/apps, --preload), 250 wrk connections on a 200 ms query for --seconds:
             requests served, errors, server-side peak (pg_stat_activity
             every 10 ms).

Workers are forked from this process after it imported sharedpool (as a
prefork server does). PostgreSQL: --dsn / DATABASE_URL, else a throwaway
cluster with max_connections 400. Every process and IPC object is removed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import psycopg2  # noqa: E402

from sharedpool import LocalPool, PoolConfig  # noqa: E402
from sharedpool.coordinator.lifecycle import remove_pool  # noqa: E402
from sharedpool.ledger import Ledger, Slot, proc_stat  # noqa: E402
from sharedpool.names import PoolNames  # noqa: E402
from sharedpool.permits import PermitGate  # noqa: E402
from tests.helpers_procs import CoordinatorProc  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results", "growth.jsonl")
CLK_TCK = os.sysconf("SC_CLK_TCK")
SLOTS = 512


# -- forked workers ------------------------------------------------------------------------------


class Workers:
    """Forked worker processes of one pool; each runs ``body(ready_fd)`` and exits when told."""

    def __init__(self) -> None:
        self.pids: list[int] = []
        self._release_w: dict[int, int] = {}

    def start(self, body: Callable[[], None], count: int, timeout: float = 60.0) -> None:
        """Fork ``count`` workers; return once each has run ``body`` (registered, connected...)."""
        readies = []
        for _ in range(count):
            ready_r, ready_w = os.pipe()
            release_r, release_w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the worker
                code = 0
                try:
                    os.close(ready_r)
                    os.close(release_w)
                    for fd in [*self._release_w.values(), *readies]:
                        os.close(fd)  # siblings' pipes: a copy here would keep them from ever seeing EOF
                    body()
                    os.write(ready_w, b"r")
                    os.read(release_r, 1)  # until told (or the parent dies)
                    from sharedpool.pool import close_all

                    close_all()
                except BaseException:  # noqa: BLE001 - report by exit status
                    import traceback

                    traceback.print_exc()
                    code = 1
                finally:
                    os._exit(code)
            os.close(ready_w)
            os.close(release_r)
            self.pids.append(pid)
            self._release_w[pid] = release_w
            readies.append(ready_r)
        deadline = time.monotonic() + timeout
        for fd in readies:
            ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
            if not ready or os.read(fd, 1) != b"r":
                raise RuntimeError("a worker failed to start (see its traceback above)")
            os.close(fd)

    def stop(self, pid: int) -> None:
        """Let one worker exit normally and reap it."""
        os.close(self._release_w.pop(pid))
        os.waitpid(pid, 0)
        self.pids.remove(pid)

    def kill_all(self) -> float:
        """SIGKILL every worker at once; return the monotonic time of the first kill."""
        t0 = time.monotonic()
        for pid in self.pids:
            os.kill(pid, signal.SIGKILL)
        for pid in self.pids:
            os.waitpid(pid, 0)
            os.close(self._release_w.pop(pid))
        self.pids.clear()
        return t0

    def close(self) -> None:
        for pid in list(self.pids):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            with contextlib.suppress(OSError):
                os.close(self._release_w.pop(pid))
        self.pids.clear()


@contextlib.contextmanager
def pool(name: str, budget: int) -> Iterator[CoordinatorProc]:
    coordinator = CoordinatorProc(name, budget, "--slots", str(SLOTS))
    try:
        yield coordinator
    finally:
        coordinator.close()
        remove_pool(PoolNames(name), None, force=True)


def registering(name: str) -> Callable[[], None]:
    def body() -> None:
        global _gate
        _gate = PermitGate(Ledger.attach(name))

    return body


_gate: PermitGate | None = None  # a worker's own gate (set after fork)
_pool: LocalPool | None = None


def cpu_seconds(pid: int) -> float:
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def per_op_us(fn: Callable[[int], None], ops: int) -> float:
    start = time.perf_counter_ns()
    fn(ops)
    return (time.perf_counter_ns() - start) / ops / 1000


def record(part: str, data: dict) -> None:
    line = {"bench": "growth", "part": part, **data, "python": platform.python_version(),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus",
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join([os.path.relpath(sys.executable, ROOT), *sys.argv])}
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(line) + "\n")


# -- parts ---------------------------------------------------------------------------------------


def part_hotpath(dsn: str, counts: list[int], rounds: int = 15, ops: int = 20000) -> dict:
    from sharedpool.pressure import choose_victim

    out = {}
    for n in counts:
        name = f"growth{os.getpid()}h{n}"
        workers = Workers()
        with pool(name, 8):
            try:
                workers.start(registering(name), n)
                local = LocalPool(PoolConfig(name=name, pool_size=8), dsn)
                local.putconn(local.getconn())  # one warm connection
                gate = local.budget.gate
                getconn, putconn = local.getconn, local.putconn

                def checkout(k: int) -> None:
                    for _ in range(k):
                        putconn(getconn())

                def permit(k: int) -> None:
                    acquire, release = gate.try_acquire, gate.release
                    for _ in range(k):
                        acquire()
                        release()

                def victim(k: int) -> None:
                    ledger, own = local.budget.ledger, gate.slot_index
                    for _ in range(k):
                        choose_victim(ledger, own)

                runs: dict[str, list[float]] = {"checkout_us": [], "permit_us": [], "victim_scan_us": []}
                for _ in range(rounds):  # interleaved rounds
                    runs["checkout_us"].append(per_op_us(checkout, ops))
                    runs["permit_us"].append(per_op_us(permit, ops))
                    runs["victim_scan_us"].append(per_op_us(victim, max(ops // 20, 100)))
                local.close()
                local.budget.close()
            finally:
                workers.close()
        out[n] = {k: {"median": round(statistics.median(v), 3), "min": round(min(v), 3),
                      "max": round(max(v), 3)} for k, v in runs.items()}
        print(f"hotpath, {n:>3} workers registered: checkout+return {out[n]['checkout_us']['median']:.2f} us, "
              f"permit acquire+release {out[n]['permit_us']['median']:.2f} us, "
              f"victim choice (waiters only) {out[n]['victim_scan_us']['median']:.1f} us", flush=True)
    record("hotpath", {"rounds": rounds, "ops": ops, "results": out})
    return out


def part_coordinator(counts: list[int], seconds: float) -> dict:
    out = {}
    for n in counts:
        name = f"growth{os.getpid()}c{n}"
        workers = Workers()
        budget = max(n // 2, 1)
        with pool(name, budget) as coordinator:
            try:
                workers.start(registering(name), n)
                time.sleep(1.0)  # registrations settle
                c0, t0 = cpu_seconds(coordinator.pid), time.monotonic()
                time.sleep(seconds)
                idle = (cpu_seconds(coordinator.pid) - c0) / (time.monotonic() - t0)
                workers.close()

                def churning() -> None:
                    registering(name)()
                    threading.Thread(target=_permit_churn, daemon=True).start()

                workers = Workers()
                workers.start(churning, n)
                replaced = 0
                c0, t0 = cpu_seconds(coordinator.pid), time.monotonic()
                while time.monotonic() - t0 < seconds:
                    tick = time.monotonic()
                    for pid in workers.pids[: max(n // 10, 1)]:
                        workers.stop(pid)
                        replaced += 1
                    workers.start(churning, max(n // 10, 1))
                    time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
                churn = (cpu_seconds(coordinator.pid) - c0) / (time.monotonic() - t0)
            finally:
                workers.close()
        out[n] = {"idle_cpu_per_s": round(idle, 4), "churn_cpu_per_s": round(churn, 4),
                  "replaced_per_s": round(replaced / seconds, 1)}
        print(f"coordinator, {n:>3} workers: CPU {idle * 100:.2f} % idle, {churn * 100:.2f} % under churn "
              f"({replaced / seconds:.0f} workers replaced/s, each taking and releasing a permit 20/s)",
              flush=True)
    record("coordinator", {"seconds": seconds, "results": out})
    return out


def _permit_churn() -> None:
    """In a worker: take and release a permit 20 times a second (an idle server's trickle)."""
    while True:
        if _gate.try_acquire():
            time.sleep(0.001)
            _gate.release()
        time.sleep(0.05)


def part_reclaim(dsn: str, n: int = 64, budget: int = 64) -> dict:
    name = f"growth{os.getpid()}r"
    app = f"sharedpool/{name}"
    workers = Workers()

    def holding() -> None:
        global _pool
        _pool = LocalPool(PoolConfig(name=name, pool_size=budget), dsn)
        conn = _pool.getconn()
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        conn.commit()  # idle in the server, checked out in the worker

    probe = psycopg2.connect(dsn, application_name="growth-probe")
    probe.autocommit = True

    def backends() -> int:
        with probe.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,))
            return cur.fetchone()[0]

    with pool(name, budget):
        ledger = Ledger.attach(name)
        try:
            workers.start(holding, n)
            assert ledger.sem.value == budget - n and backends() == n, (ledger.sem.value, backends())
            series_backends: list[tuple[float, int]] = []
            series_free: list[tuple[float, int]] = [(time.monotonic(), ledger.sem.value)]
            done = threading.Event()

            def watch_backends() -> None:
                while not done.is_set():
                    series_backends.append((time.monotonic(), backends()))

            def watch_permits() -> None:
                while not done.is_set():
                    free = ledger.sem.value
                    if free != series_free[-1][1]:
                        series_free.append((time.monotonic(), free))
                    time.sleep(0.0002)

            watchers = [threading.Thread(target=f, daemon=True) for f in (watch_backends, watch_permits)]
            for thread in watchers:
                thread.start()
            t_kill = workers.kill_all()
            deadline = t_kill + 10
            while series_free[-1][1] < budget and time.monotonic() < deadline:
                time.sleep(0.01)
            done.set()
            for thread in watchers:
                thread.join()
            returns: list[float] = []
            last = series_free[0][1]
            for t, free in series_free[1:]:
                returns += [t - t_kill] * max(free - last, 0)
                last = free
        finally:
            workers.close()
            ledger.close()
            probe.close()
    returns.sort()
    gone = next((t - t_kill for t, b in series_backends if b == 0), None)
    half_gone = next((t - t_kill for t, b in series_backends if t > t_kill and b <= n // 2), None)
    # free permits must never run ahead of the backends that left: free <= budget - backends still there
    ahead = 0
    for t, free in series_free:
        before = [b for tb, b in series_backends if tb <= t]
        if before and free > budget - before[-1]:
            ahead += 1
    result = {
        "workers_killed": n, "budget": budget, "permits_back": len(returns),
        "p50_ms": round(statistics.median(returns) * 1000, 1) if returns else None,
        "p99_ms": round(returns[min(len(returns) - 1, int(len(returns) * 0.99))] * 1000, 1) if returns else None,
        "last_ms": round(returns[-1] * 1000, 1) if returns else None,
        "backends_gone_ms": None if gone is None else round(gone * 1000, 1),
        "backends_half_gone_ms": None if half_gone is None else round(half_gone * 1000, 1),
        "free_ahead_of_backends_samples": ahead,
    }
    print(f"reclaim, {n} workers SIGKILLed at once: {len(returns)}/{n} permits back, p50 {result['p50_ms']} ms, "
          f"p99 {result['p99_ms']} ms, last {result['last_ms']} ms; half the backends gone from the server after "
          f"{result['backends_half_gone_ms']} ms, the last after {result['backends_gone_ms']} ms; "
          f"free permits ahead of departed backends: {ahead} samples", flush=True)
    record("reclaim", result)
    return result


def _uss_kb() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith(("Private_Clean", "Private_Dirty")))


def part_memory(dsn: str) -> dict:
    name = f"growth{os.getpid()}m"
    r, w = os.pipe()

    def measure() -> None:
        before = _uss_kb()
        local = LocalPool(PoolConfig(name=name, pool_size=4), dsn)
        local.budget.ensure_ready()
        registered = _uss_kb()
        local.putconn(local.getconn())
        connected = _uss_kb()
        os.write(w, json.dumps({"register_kb": registered - before, "connection_kb": connected - registered}).encode())

    workers = Workers()
    with pool(name, 4):
        try:
            workers.start(measure, 1)
            data = json.loads(os.read(r, 4096))
        finally:
            workers.close()
            os.close(r)
            os.close(w)
    import ctypes

    result = {"slot_bytes": ctypes.sizeof(Slot), **data}
    print(f"memory per worker: ledger slot {result['slot_bytes']} B shared; registering adds "
          f"{data['register_kb']} kB private (listener thread, socket, mapping); one connection "
          f"{data['connection_kb']} kB (libpq)", flush=True)
    record("memory", result)
    return result


def _gunicorn(dsn: str, name: str, budget: int, workers: int, *extra: str) -> tuple[subprocess.Popen, int, object]:
    """Start gunicorn with sharedpool's hooks on tests/apps/pool_app.py; return (process, port, log file)."""
    from apps.loadtools import wait_http
    from devtools.pgcluster import free_port

    port = free_port()
    env = {**os.environ, "TEST_DSN": dsn, "SHAREDPOOL_NAME": name, "SHAREDPOOL_POOL_SIZE": str(budget),
           "SHAREDPOOL_TIMEOUT": "60",
           "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "tests", "apps"), ROOT])}
    cmd = [sys.executable, "-m", "gunicorn", "-c", "python:sharedpool.integrations.gunicorn", *extra,
           "--bind", f"127.0.0.1:{port}", "--workers", str(workers), "--backlog", "2048", "--timeout", "120",
           "--log-level", "warning", "--no-control-socket", "pool_app:application"]
    log = tempfile.TemporaryFile()  # gunicorn's output, shown only if it fails to start
    proc = subprocess.Popen(cmd, cwd=os.path.join(ROOT, "tests", "apps"), env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(port, process=proc, timeout=120)
    except AssertionError:
        from apps.loadtools import stop_server

        stop_server(proc)
        log.seek(0)
        raise AssertionError(log.read()[-4000:].decode(errors="replace")) from None
    proc.command = " ".join(cmd)
    return proc, port, log


def part_deferral(dsn: str, seconds: float) -> dict:
    from apps.loadtools import Load, stop_server

    name = f"growth{os.getpid()}d"
    proc, port, log = _gunicorn(dsn, name, 4, 8)
    wrk = shutil.which("wrk")
    try:
        load = None
        if wrk:
            runner = subprocess.Popen([wrk, "-t", "2", "-c", "16", "-d", f"{int(seconds) + 2}s",
                                       f"http://127.0.0.1:{port}/sleep?ms=2"], stdout=subprocess.DEVNULL)
        else:
            load = Load(port, "/sleep?ms=2", 16).start()
        time.sleep(1.0)
        pids = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                               text=True).stdout.split()]
        ledger = Ledger.attach(name)
        try:
            coordinator = ledger.header.coordinator_pid
            workers = [p for p in pids if p != coordinator]
            cpu0, t0 = {p: cpu_seconds(p) for p in workers}, time.monotonic()
            time.sleep(seconds)
            cpu = {p: (cpu_seconds(p) - cpu0[p]) / (time.monotonic() - t0) for p in workers}
            held = {s.pid: s.held for s in ledger.snapshot().slots}
        finally:
            ledger.close()
        if load is not None:
            load.stop()
        else:
            runner.wait()
    finally:
        stop_server(proc)
        log.close()
    holders = sorted(cpu[p] * 100 for p in workers if held.get(p))
    deferring = sorted(cpu[p] * 100 for p in workers if not held.get(p))
    result = {"workers": 8, "budget": 4, "seconds": seconds, "load": "wrk" if wrk else "python threads",
              "holders_cpu_pct": [round(x, 1) for x in holders], "deferring_cpu_pct": [round(x, 1) for x in deferring],
              "command": proc.command}
    print(f"deferral: CPU of the {len(holders)} workers holding a connection {result['holders_cpu_pct']} %, "
          f"of the {len(deferring)} deferring to them {result['deferring_cpu_pct']} % of one core", flush=True)
    record("deferral", result)
    return result


def part_many(dsn: str, seconds: float, workers: int = 200, budget: int = 100, clients: int = 250) -> dict:
    from apps.loadtools import Load, stop_server
    from helpers_procs import PeakSampler

    name = f"growth{os.getpid()}n"
    path = "/sleep?ms=200"  # long enough that 250 clients keep all 100 permits busy
    proc, port, log = _gunicorn(dsn, name, budget, workers, "--preload")
    wrk = shutil.which("wrk")
    try:
        with PeakSampler(dsn, name) as sampler:
            if wrk:
                out = subprocess.run([wrk, "-t", "2", "-c", str(clients), "-d", f"{int(seconds)}s",
                                      "--timeout", "60s", f"http://127.0.0.1:{port}{path}"],
                                     capture_output=True, text=True).stdout
                served = int(next(l for l in out.splitlines() if "requests in" in l).split()[0])
                errors = sum(int(x) for l in out.splitlines() if "Non-2xx" in l for x in l.split()[-1:])
                load_text = out
            else:
                load = Load(port, path, clients).start()
                time.sleep(seconds)
                load.stop()
                served, errors = load.statuses.get(200, 0), sum(v for k, v in load.statuses.items() if k != 200)
                load_text = load.summary()
            peak = sampler.stop()
    finally:
        stop_server(proc)
        log.close()
    result = {"workers": workers, "budget": budget, "clients": clients, "seconds": seconds, "path": path,
              "served": served, "errors": errors, "server_peak": peak,
              "command": proc.command, "load": "wrk" if wrk else "python threads"}
    print(f"many: {workers} gunicorn workers, budget {budget}, {clients} clients for {seconds:.0f} s: "
          f"{served} requests, {errors} errors, server peak {peak}\n{load_text}", flush=True)
    record("many", result)
    return result


def plot(path: str = RESULTS) -> str | None:
    """Draw the newest hotpath and coordinator records of ``path`` into growth.png; return its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    newest: dict[str, dict] = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            newest[rec["part"]] = rec
    if "hotpath" not in newest and "coordinator" not in newest:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    if "hotpath" in newest:
        res = newest["hotpath"]["results"]
        counts = sorted(int(n) for n in res)
        for key, label in (("checkout_us", "warm checkout + return"), ("permit_us", "permit acquire + release"),
                           ("victim_scan_us", "victim choice (only when waiting)")):
            left.plot(counts, [res[str(n)][key]["median"] for n in counts], marker="o", label=label)
        left.set_xscale("log", base=2)
        left.set_xlabel("registered worker processes")
        left.set_ylabel("µs per operation (median)")
        left.set_title("hot path vs workers")
        left.legend(fontsize=8)
    if "coordinator" in newest:
        res = newest["coordinator"]["results"]
        counts = sorted(int(n) for n in res)
        right.plot(counts, [res[str(n)]["idle_cpu_per_s"] * 100 for n in counts], marker="o", label="idle")
        right.plot(counts, [res[str(n)]["churn_cpu_per_s"] * 100 for n in counts], marker="o",
                   label="churn (10 %/s replaced, permits 20/s per worker)")
        right.set_xscale("log", base=2)
        right.set_xlabel("registered worker processes")
        right.set_ylabel("coordinator CPU, % of one core")
        right.set_title("coordinator vs workers")
        right.legend(fontsize=8)
    fig.tight_layout()
    out = os.path.join(os.path.dirname(path), "growth.png")
    fig.savefig(out, dpi=100)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="hotpath,coordinator,reclaim,memory,deferral,many")
    parser.add_argument("--workers", default="8,64,256", help="registered worker counts (hotpath, coordinator)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each timed phase")
    parser.add_argument("--dsn", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--reclaim-rounds", type=int, default=3, help="times the reclaim part runs")
    parser.add_argument("--plot-only", action="store_true", help="only redraw growth.png from the results file")
    args = parser.parse_args()
    if args.plot_only:
        print(plot() or "nothing to plot (no results, or no matplotlib)")
        return 0
    counts = [int(x) for x in args.workers.split(",")]
    parts = args.parts.split(",")
    with contextlib.ExitStack() as stack:
        dsn = args.dsn
        if not dsn:
            from devtools.pgcluster import TempCluster

            dsn = stack.enter_context(TempCluster(settings={"max_connections": 400})).dsn
        if "hotpath" in parts:
            part_hotpath(dsn, counts)
        if "coordinator" in parts:
            part_coordinator(counts, args.seconds)
        if "reclaim" in parts:
            for _ in range(args.reclaim_rounds):
                part_reclaim(dsn)
        if "memory" in parts:
            part_memory(dsn)
        if "deferral" in parts:
            part_deferral(dsn, args.seconds)
        if "many" in parts:
            part_many(dsn, max(args.seconds, 5.0))
    drawn = plot()
    if drawn:
        print(f"plot: {os.path.relpath(drawn, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
