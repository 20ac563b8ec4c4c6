#!/usr/bin/env python3
"""Side-by-side load runs: one Django app under gunicorn, several connection strategies.

Each (scenario, strategy) run gets a fresh database (CREATE DATABASE ... TEMPLATE),
its own gunicorn (own process group), its own PgBouncer when the strategy needs
one, and a sampler that counts the server's client backends on the bench
database every 20 ms (pg_stat_activity). Load comes from wrk (a lua script
prints p50/p90/p99 and the error counts). One JSON line per run is appended to
bench/results/<stamp>-<mode>.jsonl; a summary with the targets (pass / FAIL /
not run) goes to <stamp>-<mode>.summary.json and to stdout.

    .venv/bin/python bench/run.py --quick                   # every scenario, short
    .venv/bin/python bench/run.py --scenarios S1,S5 --strategies persistent,pgbouncer
    .venv/bin/python bench/plot.py                          # PNGs of the newest results

PostgreSQL: DATABASE_URL if set (needs CREATE DATABASE rights), else a private
throwaway cluster (devtools.pgcluster.TempCluster) stopped at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import http.client
import json
import os
import platform
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
WRK_SCRIPT = os.path.join(BENCH_DIR, "wrk", "report.lua")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from devtools.pgbouncer import PgBouncer, find_pgbouncer  # noqa: E402
from devtools.pgcluster import free_port  # noqa: E402

STRATEGIES = ["direct", "persistent", "djdbpool", "pgbouncer", "pgbouncer-session", "sharedpool",
              "sharedpool-nofollow"]
DEFAULT_STRATEGIES = STRATEGIES[:-1]  # sharedpool-nofollow only when asked for: it isolates one mechanism
POOL_MODES = {"pgbouncer": "transaction", "pgbouncer-session": "session"}
DB_NAME = "bench"                 # main() makes both unique to the process
TEMPLATE_DB = "bench_template"
ROWS = 10000
SAMPLE_INTERVAL = 0.020

# Scenario table. "views" are separate runs: (label, wrk path spec).
SCENARIOS: dict[str, dict] = {
    "S1": dict(desc="right-sized: sync, workers = budget = 4, read view",
               worker_class="sync", workers=4, threads=1, budget=4,
               views=[("read", "/read")], connections=8),
    "S2": dict(desc="oversubscribed: sync, 8 workers, budget 4; read view and a 10 ms query",
               worker_class="sync", workers=8, threads=1, budget=4,
               views=[("read", "/read"), ("query10ms", "/slow?ms=10")], connections=16),
    "S3": dict(desc="threads with skew: gthread 4 workers x 4 threads, budget 6; "
                    "90% read, 10% a 50 ms query",
               worker_class="gthread", workers=4, threads=4, budget=6,
               views=[("skew", "/read:90,/slow?ms=50:10")], connections=32),
    "S4": dict(desc="reload storm: sync, 8 workers, budget 8, HUP every 2 s, --max-requests 50",
               worker_class="sync", workers=8, threads=1, budget=8,
               views=[("read", "/read")], connections=16, hup_every=2.0, max_requests=50,
               min_duration=5),
    "S5": dict(desc="session features: server-side cursor, SET LOCAL, advisory lock, "
                    "prepared statement (+ plain SET); sync, 8 workers, budget 4",
               worker_class="sync", workers=8, threads=1, budget=4,
               views=[("session", "/session")], connections=16, features=True),
}
FEATURES = ["server_side_cursor", "set_local", "advisory_lock", "prepared_statement",
            "session_set"]
REQUIRED_FEATURES = FEATURES[:4]


def log(msg: str) -> None:
    print(msg, flush=True)


def venv_bin(name: str) -> str:
    cand = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.exists(cand):
        return cand
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"error: {name} not found next to {sys.executable} nor on PATH")
    return found


# --------------------------------------------------------------------------- database

class Server:
    """The PostgreSQL server: DATABASE_URL or a TempCluster we own."""

    def __init__(self):
        from devtools.pgcluster import TempCluster, parse_dsn, url_to_dsn
        self.cluster = None
        url = os.environ.get("DATABASE_URL")
        if url:
            kw = parse_dsn(url_to_dsn(url))
            self.source = "DATABASE_URL"
        else:
            # connection/disconnection lines give the exact server-side peak
            self.cluster = TempCluster(settings={"log_connections": "on",
                                                 "log_disconnections": "on"})
            self.cluster.start()
            kw = parse_dsn(self.cluster.dsn)
            self.source = "devtools.pgcluster.TempCluster"
        self.host = kw.get("host", "127.0.0.1")
        self.port = int(kw.get("port", 5432))
        self.user = kw.get("user", "postgres")
        self.password = kw.get("password", "")
        self.admin_db = kw.get("dbname", "postgres")
        if self.admin_db in (DB_NAME, TEMPLATE_DB):
            self.admin_db = "postgres"

    def connect(self, dbname: str | None = None, app: str = "bench-harness"):
        import psycopg2
        conn = psycopg2.connect(host=self.host, port=self.port, user=self.user,
                                password=self.password or None,
                                dbname=dbname or self.admin_db, application_name=app)
        conn.autocommit = True
        return conn

    def query1(self, sql: str, args=(), dbname: str | None = None):
        conn = self.connect(dbname)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchone()
        finally:
            conn.close()

    def execute(self, *statements: str | tuple[str, tuple], dbname: str | None = None) -> None:
        """Execute statements (SQL, or (SQL, args)) on one autocommit connection."""
        conn = self.connect(dbname)
        try:
            with conn.cursor() as cur:
                for statement in statements:
                    sql, args = statement if isinstance(statement, tuple) else (statement, None)
                    cur.execute(sql, args)
        finally:
            conn.close()

    def make_template(self) -> None:
        self.execute(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)",
                 f"DROP DATABASE IF EXISTS {TEMPLATE_DB} WITH (FORCE)",
                 f"CREATE DATABASE {TEMPLATE_DB}")
        self.execute("CREATE TABLE bench_item (id bigserial PRIMARY KEY,"
                 " name varchar(64) NOT NULL, value integer NOT NULL)",
                 ("INSERT INTO bench_item (name, value)"
                  " SELECT 'item-' || g, (g * 7919) %% 100000"
                  " FROM generate_series(1, %s) g", (ROWS,)),
                 "VACUUM ANALYZE bench_item",
                 dbname=TEMPLATE_DB)

    def fresh_db(self) -> None:
        self.execute(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)",
                 f"CREATE DATABASE {DB_NAME} TEMPLATE {TEMPLATE_DB}")

    def drop_all(self) -> None:
        with contextlib.suppress(Exception):
            self.execute(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)",
                     f"DROP DATABASE IF EXISTS {TEMPLATE_DB} WITH (FORCE)")

    def log_offset(self) -> int | None:
        if self.cluster is None:
            return None
        try:
            return os.path.getsize(self.cluster.logfile)
        except OSError:
            return None

    def exact_peak(self, offset: int | None) -> dict | None:
        """Peak number of concurrent sessions on the bench database, from the
        server log written since `offset` (log_connections/log_disconnections,
        millisecond timestamps; a disconnection and a connection in the same
        millisecond count as not overlapping). None without our own cluster."""
        if offset is None:
            return None
        try:
            with open(self.cluster.logfile, "rb") as f:
                f.seek(offset)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return None
        pat = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) \S+ \[(\d+)\] .*?"
                         r"(connection authorized|disconnection): .*?database=(\S+)", re.M)
        events = []
        for m in pat.finditer(text):
            if m.group(4) != DB_NAME:
                continue
            t = _dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
            events.append((t, 0 if m.group(3) == "disconnection" else 1, m.group(2)))
        events.sort()
        live: set[str] = set()
        peak = opened = 0
        for _t, kind, pid in events:
            if kind:
                live.add(pid)
                opened += 1
                peak = max(peak, len(live))
            else:
                live.discard(pid)
        return {"peak": peak, "sessions": opened}

    def version(self) -> str:
        return self.query1("SELECT version()")[0]

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None


class Sampler(threading.Thread):
    """Counts client backends on the bench database every 20 ms (own
    connection on the admin database, so it is never counted itself)."""

    SQL = ("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
           " AND datname = %s AND pid <> pg_backend_pid()")

    def __init__(self, server: Server):
        super().__init__(daemon=True, name="conn-sampler")
        self.conn = server.connect(app="bench-sampler")
        self.samples: list[tuple[float, int]] = []
        self.t0 = time.monotonic()
        self._halt = threading.Event()

    def run(self) -> None:
        cur = self.conn.cursor()
        nxt = time.monotonic()
        while not self._halt.is_set():
            cur.execute(self.SQL, (DB_NAME,))
            self.samples.append((time.monotonic() - self.t0, cur.fetchone()[0]))
            nxt += SAMPLE_INTERVAL
            delay = nxt - time.monotonic()
            if delay > 0:
                self._halt.wait(delay)
            else:
                nxt = time.monotonic()

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        with contextlib.suppress(Exception):
            self.conn.close()


def sessions_count(server: Server) -> int:
    """pg_stat_database.sessions of the bench database (sessions established
    since the database was created: every run starts from a new database)."""
    row = server.query1("SELECT coalesce(sessions, 0) FROM pg_stat_database WHERE datname = %s",
                        (DB_NAME,))
    return int(row[0]) if row else 0


def wait_no_backends(server: Server, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = server.query1("SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
                          " AND backend_type = 'client backend'", (DB_NAME,))[0]
        if n == 0 or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


# --------------------------------------------------------------------------- processes

def stop_group(proc: subprocess.Popen, sig=signal.SIGTERM, grace: float = 15.0) -> None:
    """Signal the leader, wait, then SIGKILL whatever is left of its group."""
    pgid = proc.pid  # start_new_session=True: pgid == pid
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and group_alive(pgid):
        time.sleep(0.05)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def http_get(port: int, path: str, timeout: float = 30.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------- load

def run_wrk(port: int, paths: str, connections: int, duration: int, timeout_s: int = 30):
    threads = max(1, min(2, connections))
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration}s",
           "--timeout", f"{timeout_s}s", "-s", WRK_SCRIPT, f"http://127.0.0.1:{port}"]
    env = dict(os.environ, BENCH_PATHS=paths)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          timeout=duration + timeout_s + 30)
    m = re.search(r"^BENCH_JSON (\{.*\})$", proc.stdout, re.M)
    if proc.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(m.group(1)), cmd, "BENCH_PATHS=" + shlex.quote(paths)


def run_threads(target, count: int) -> None:
    """Run ``target`` in ``count`` threads at once and wait for all of them."""
    threads = [threading.Thread(target=target) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def python_load(port: int, paths: str, connections: int, duration: int) -> dict:
    """Fallback load generator when wrk is missing: `connections` threads,
    one HTTP request at a time each, for `duration` seconds. Slower than wrk
    (it shares the GIL), so its numbers are not comparable with wrk's."""
    choices = []
    for item in paths.split(","):
        m = re.match(r"^(.*):(\d+)$", item)
        choices.append((m.group(1), int(m.group(2))) if m else (item, 1))
    pool = [p for p, w in choices for _ in range(w)]
    lat: list[float] = []
    errors = {"status": 0, "transport": 0}
    lock = threading.Lock()
    t0 = time.monotonic()
    stop_at = t0 + duration

    def worker():
        rnd = random.Random()
        while time.monotonic() < stop_at:
            t = time.perf_counter()
            try:
                status, _ = http_get(port, rnd.choice(pool), timeout=30)
            except Exception:
                with lock:
                    errors["transport"] += 1
                continue
            dt = time.perf_counter() - t
            with lock:
                lat.append(dt)
                if not 200 <= status < 400:
                    errors["status"] += 1

    run_threads(worker, connections)
    elapsed = time.monotonic() - t0
    return _load_stats(sorted(lat), elapsed, errors, f"python threads x{connections}")


def _load_stats(lat: list[float], elapsed: float, errors: dict, generator: str) -> dict:
    def pct(p):
        if not lat:
            return 0.0
        return lat[min(len(lat) - 1, int(round(p / 100.0 * (len(lat) - 1))))] * 1000

    return {"generator": generator, "requests": len(lat), "duration_s": elapsed,
            "rps": len(lat) / elapsed if elapsed else 0.0,
            "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
            "max_ms": lat[-1] * 1000 if lat else 0.0,
            "mean_ms": statistics.fmean(lat) * 1000 if lat else 0.0,
            "errors": sum(errors.values()), "errors_detail": errors}


def warm(port: int, path: str, concurrency: int, total: int) -> None:
    left = [total]
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            with contextlib.suppress(Exception):
                http_get(port, path, timeout=30)

    run_threads(worker, concurrency)


def probe_features(port: int, concurrency: int, duration: float) -> dict:
    """S5: call /session sequentially (10 times) then from `concurrency`
    threads for `duration` seconds; tally each feature's failures."""
    tally = {f: {"ok": 0, "failed": 0, "example_error": ""} for f in FEATURES}
    lock = threading.Lock()
    lat: list[float] = []
    errors = {"http_non_200": 0, "transport": 0}

    def one():
        t = time.perf_counter()
        try:
            status, body = http_get(port, "/session", timeout=60)
        except Exception as exc:  # connection reset, timeout
            with lock:
                errors["transport"] += 1
                tally["server_side_cursor"]["example_error"] = (
                    tally["server_side_cursor"]["example_error"] or f"transport: {exc}")
            return
        dt = time.perf_counter() - t
        try:
            data = json.loads(body)
        except ValueError:
            data = {}
        with lock:
            lat.append(dt)
            if status != 200:
                errors["http_non_200"] += 1
            feats = data.get("features") or {}
            for f in FEATURES:
                r = feats.get(f)
                if r is None:
                    tally[f]["failed"] += 1
                    tally[f]["example_error"] = tally[f]["example_error"] or f"HTTP {status}"
                elif r.get("ok"):
                    tally[f]["ok"] += 1
                else:
                    tally[f]["failed"] += 1
                    tally[f]["example_error"] = tally[f]["example_error"] or r.get("error", "")

    for _ in range(10):
        one()
    sequential = {f: dict(v) for f, v in tally.items()}
    t0 = time.monotonic()
    stop_at = t0 + duration

    def worker():
        while time.monotonic() < stop_at:
            one()

    n_before = len(lat)
    run_threads(worker, concurrency)
    elapsed = time.monotonic() - t0
    return {
        "sequential": sequential,
        "total": tally,
        "served_correctly": {f: tally[f]["failed"] == 0 and tally[f]["ok"] > 0 for f in FEATURES},
        "load": _load_stats(sorted(lat[n_before:]), elapsed, errors,
                            f"python threads x{concurrency}"),
    }


# --------------------------------------------------------------------------- one run

class Skip(Exception):
    pass


def sharedpool_available(python: str) -> tuple[bool, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([BENCH_DIR, ROOT]),
               DJANGO_SETTINGS_MODULE="app.settings", BENCH_STRATEGY="persistent")
    code = ("import django; django.setup(); import sharedpool.integrations.django.base;"
            " import sharedpool.integrations.gunicorn")
    p = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True)
    if p.returncode == 0:
        return True, ""
    last = (p.stderr.strip().splitlines() or ["?"])[-1]
    return False, f"import sharedpool.integrations.django failed: {last}"


def pool_name() -> str:
    return ("bench" + format(os.getpid(), "x") + secrets.token_hex(3))[:24]


def shm_entries(name: str) -> list[str]:
    with contextlib.suppress(FileNotFoundError):
        return sorted(e for e in os.listdir("/dev/shm") if name in e)
    return []


def run_one(ctx: dict, scenario: str, view: str, paths: str, strategy: str, rep: int) -> dict:
    sc = SCENARIOS[scenario]
    server: Server = ctx["server"]
    args = ctx["args"]
    duration = max(args.duration, sc.get("min_duration", 0) - (1 if args.quick else 0))
    budget, workers, threads = sc["budget"], sc["workers"], sc["threads"]
    rec: dict = {
        "kind": "run", "run_id": ctx["run_id"], "started_at": _dt.datetime.now(
            _dt.timezone.utc).isoformat(timespec="seconds"),
        "mode": ctx["mode"], "scenario": scenario, "scenario_desc": sc["desc"], "view": view,
        "paths": paths, "strategy": strategy, "repeat": rep, "duration_s": duration,
        "budget": budget, "workers": workers, "threads": threads,
        "worker_class": sc["worker_class"], "max_requests": sc.get("max_requests", 0),
        "hup_every_s": sc.get("hup_every", 0), "notes": [],
    }
    if strategy.startswith("sharedpool") and not ctx["sharedpool_ok"]:
        raise Skip(ctx["sharedpool_reason"])
    if strategy in POOL_MODES and not find_pgbouncer():
        raise Skip("pgbouncer not installed (bench/setup.sh installs it)")

    workdir = tempfile.mkdtemp(prefix="sharedpool-bench-")
    os.chmod(workdir, 0o755)
    bouncer = gun = sampler = None
    name = pool_name() if strategy.startswith("sharedpool") else None
    hup_stop = threading.Event()
    hups = [0]
    try:
        server.fresh_db()
        log_off = server.log_offset()  # the exact peak covers the run from here on
        db_host, db_port = server.host, server.port
        if strategy in POOL_MODES:
            bouncer = PgBouncer(server.host, server.port, server.user, server.password, DB_NAME, budget,
                                workdir, POOL_MODES[strategy])
            db_host, db_port = "127.0.0.1", bouncer.port
            rec["pgbouncer"] = {"pool_mode": POOL_MODES[strategy], "default_pool_size": budget,
                                "max_db_connections": budget, "version": ctx["versions"].get(
                                    "pgbouncer"), "command": shlex.join(bouncer.argv)}
        if strategy == "djdbpool":
            size = max(1, budget // workers)
            rec["djdbpool"] = {"POOL_SIZE": size, "MAX_OVERFLOW": 0,
                               "possible_server_connections": size * workers}
            if size * workers != budget:
                rec["notes"].append(
                    f"djdbpool: a per-process pool of {size} x {workers} workers = "
                    f"{size * workers} connections; cannot express budget {budget}")
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BENCH_", "SHAREDPOOL_"))}
        env.update({
            "PYTHONPATH": os.pathsep.join([BENCH_DIR, ROOT]),
            "DJANGO_SETTINGS_MODULE": "app.settings",
            "BENCH_STRATEGY": strategy, "BENCH_BUDGET": str(budget),
            "BENCH_WORKERS": str(workers), "BENCH_ROWS": str(ROWS),
            "BENCH_DRIVER": args.driver,
            "BENCH_DB_HOST": db_host, "BENCH_DB_PORT": str(db_port), "BENCH_DB_NAME": DB_NAME,
            "BENCH_DB_USER": server.user, "BENCH_DB_PASSWORD": server.password,
        })
        if strategy.startswith("sharedpool"):
            env.update({"SHAREDPOOL_NAME": name, "SHAREDPOOL_POOL_SIZE": str(budget),
                        "BENCH_MAX_PER_PROCESS": str(budget)})
            rec["sharedpool"] = {"NAME": name, "POOL_SIZE": budget, "MAX_PER_PROCESS": budget}
        cmd = [ctx["gunicorn"]]
        if strategy == "sharedpool":
            cmd += ["-c", "python:sharedpool.integrations.gunicorn"]
        elif strategy == "sharedpool-nofollow":
            cmd += ["-c", "python:app.gunicorn_nofollow"]
        cmd += ["--bind", f"127.0.0.1:{port}", "--workers", str(workers),
                "--worker-class", sc["worker_class"], "--timeout", "60",
                "--graceful-timeout", "5", "--log-level", "warning", "--backlog", "2048"]
        if sc["worker_class"] == "gthread":
            cmd += ["--threads", str(threads)]
        if sc.get("max_requests"):
            cmd += ["--max-requests", str(sc["max_requests"])]
        cmd += ["app.wsgi:application"]
        shown_env = {k: ("***" if "PASSWORD" in k and v else v) for k, v in env.items()
                     if k.startswith(("BENCH_", "SHAREDPOOL_", "DJANGO_"))}
        rec["command"] = {"harness": ctx["harness_cmd"], "gunicorn": shlex.join(cmd),
                          "gunicorn_env": shown_env}
        glog = open(os.path.join(workdir, "gunicorn.log"), "wb")
        gun = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=glog,
                               stderr=subprocess.STDOUT, start_new_session=True)
        glog.close()
        ctx["live"].append(gun)
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError, http.client.HTTPException):
                if http_get(port, "/health", timeout=2)[0] == 200:
                    break
            if gun.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("gunicorn did not come up:\n" + tail(workdir, "gunicorn.log"))
            time.sleep(0.1)
        # warm-up: workers import the app and connect (where they keep connections)
        first = paths.split(",")[0]
        warm(port, first.rsplit(":", 1)[0] if re.search(r":\d+$", first) else first,
             workers * threads, 2 * workers * threads)

        sampler = Sampler(server)
        sessions0 = sessions_count(server)
        sampler.start()
        t_load0 = time.monotonic() - sampler.t0

        def hupper():
            while not hup_stop.wait(sc["hup_every"]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(gun.pid, signal.SIGHUP)
                    hups[0] += 1

        hup_thread = None
        if sc.get("hup_every"):
            hup_thread = threading.Thread(target=hupper, daemon=True)
            hup_thread.start()
        if sc.get("features"):
            feat = probe_features(port, sc["connections"], duration)
            load = feat.pop("load")
            rec["features"] = feat
            rec["command"]["load"] = (f"python threads x{sc['connections']} GET /session "
                                      f"for {duration}s (after 10 sequential calls)")
        elif not ctx["wrk"]:
            load = python_load(port, paths, sc["connections"], duration)
            rec["notes"].append("wrk not installed: load from the python fallback generator "
                                "(numbers not comparable with wrk runs)")
            rec["command"]["load"] = (f"python threads x{sc['connections']} GET {paths} "
                                      f"for {duration}s")
        else:
            w, wcmd, wenv = run_wrk(port, paths, sc["connections"], duration)
            secs = w["duration_us"] / 1e6
            errs = {k[7:]: w[k] for k in w if k.startswith("errors_")}
            load = {"generator": "wrk", "requests": w["requests"], "duration_s": secs,
                    "rps": w["requests"] / secs if secs else 0.0,
                    "p50_ms": w["lat_p50_us"] / 1000, "p90_ms": w["lat_p90_us"] / 1000,
                    "p99_ms": w["lat_p99_us"] / 1000, "max_ms": w["lat_max_us"] / 1000,
                    "mean_ms": w["lat_mean_us"] / 1000, "errors": sum(errs.values()),
                    "errors_detail": errs}
            rec["command"]["load"] = wenv + " " + shlex.join(wcmd)
        t_load1 = time.monotonic() - sampler.t0
        hup_stop.set()
        if hup_thread:
            hup_thread.join(5)
        # keep sampling until the server is stopped: connections that outlive
        # the load (or a reload's old workers) still count for the peak
        sessions1 = sessions_count(server)
        # SIGINT: gunicorn's quick shutdown (SIGTERM would wait for workers
        # still booting after a HUP); on_exit hooks still run
        stop_group(gun, signal.SIGINT, grace=10)
        if bouncer:
            bouncer.stop()
            bouncer = None
        time.sleep(0.1)
        sampler.stop()
        left = wait_no_backends(server)
        samples = sampler.samples
        in_load = [n for t, n in samples if t_load0 <= t <= t_load1] or [0]
        rec.update(load)
        rec["hups"] = hups[0]
        new_conns = max(0, sessions1 - sessions0)
        rec.update({
            "conn_peak": max(n for _, n in samples) if samples else 0,
            "conn_peak_load": max(in_load),
            "conn_mean": statistics.fmean(in_load),
            "conn_samples": len(samples),
            "conn_samples_over_budget": sum(1 for _, n in samples if n > budget),
            "new_conns": new_conns,
            "new_conns_per_s": new_conns / (t_load1 - t_load0) if t_load1 > t_load0 else 0.0,
            "load_window_s": [round(t_load0, 3), round(t_load1, 3)],
            "series": [[round(t, 3), n] for t, n in samples],
            "backends_left_after_stop": left,
        })
        exact = server.exact_peak(log_off)
        if exact is not None:
            # from the server log: covers the load and the shutdown, catches
            # spikes shorter than the 20 ms sampling interval
            rec["conn_peak_exact"] = exact["peak"]
            rec["sessions_logged"] = exact["sessions"]
        errs = tail(workdir, "gunicorn.log", 400)
        n_tracebacks = errs.count("Traceback")
        if n_tracebacks:
            rec["notes"].append(f"gunicorn log has {n_tracebacks} tracebacks; last lines: "
                                + " | ".join(errs.strip().splitlines()[-3:])[:600])
        return rec
    finally:
        # every step on its own: one failing must not skip the others
        hup_stop.set()

        def step(fn):
            try:
                fn()
            except Exception as exc:  # noqa: BLE001
                rec["notes"].append(f"cleanup step failed: {type(exc).__name__}: {exc}")

        if sampler is not None and sampler.is_alive():
            step(sampler.stop)
        if gun is not None:
            step(lambda: stop_group(gun, signal.SIGTERM, grace=10))
            with contextlib.suppress(ValueError):
                ctx["live"].remove(gun)
            if group_alive(gun.pid):
                rec["notes"].append(f"process group {gun.pid} still alive after stop")
        if bouncer is not None:
            step(bouncer.stop)
        if name:
            step(lambda: cleanup_ipc(ctx, name, rec))
        shutil.rmtree(workdir, ignore_errors=True)


def cleanup_ipc(ctx: dict, name: str, rec: dict) -> None:
    left = shm_entries(name)
    rec["ipc_left_before_cleanup"] = left
    sp = shutil.which("sharedpool", path=os.path.dirname(ctx["gunicorn"]))
    if sp:
        with contextlib.suppress(Exception):
            subprocess.run([sp, "cleanup", "--name", name], capture_output=True, timeout=30)
    for e in shm_entries(name):  # last resort: the objects are ours by name
        path = os.path.join("/dev/shm", e)
        with contextlib.suppress(OSError):
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)


def tail(workdir: str, fname: str, n: int = 30) -> str:
    with contextlib.suppress(OSError):
        with open(os.path.join(workdir, fname), errors="replace") as f:
            return "".join(f.readlines()[-n:])
    return ""


# --------------------------------------------------------------------------- metadata

def pkg_version(name: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    cpu = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    mem = 0
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) // 1024
    os_name = ""
    with contextlib.suppress(OSError):
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    os_name = line.split("=", 1)[1].strip().strip('"')
    return {"hostname": socket.gethostname(), "cpus": os.cpu_count(), "cpu_model": cpu,
            "mem_mib": mem, "kernel": platform.release(), "os": os_name,
            "python": platform.python_version()}


def tool_version(argv: list[str], pattern: str) -> str | None:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(pattern, p.stdout + p.stderr)
    return m.group(1) if m else None


def versions(server: Server) -> dict:
    v = {name: pkg_version(name) for name in
         ("Django", "gunicorn", "SQLAlchemy", "psycopg2-binary", "psycopg",
          "django-db-connection-pool", "sharedpool")}
    v["postgresql"] = server.version()
    v["pgbouncer"] = tool_version(["pgbouncer", "--version"], r"PgBouncer (\S+)")
    v["wrk"] = tool_version(["wrk", "--version"], r"wrk (\S+)")
    with contextlib.suppress(Exception):
        v["git_commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"],
                                         capture_output=True, text=True).stdout.strip()
    return v


# --------------------------------------------------------------------------- summary

def median_of(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if key in r]
    return statistics.median(vals) if vals else None


def summarize(runs: list[dict], skipped: list[dict]) -> dict:
    by: dict[tuple, list[dict]] = {}
    for r in runs:
        by.setdefault((r["scenario"], r["view"], r["strategy"]), []).append(r)

    def m(sc, view, strat, key):
        rs = by.get((sc, view, strat))
        return median_of(rs, key) if rs else None

    def peak(sc, view, strat):
        """The highest peak of any repetition: the sampled one, or the exact
        one from the server log when there is one (whichever is higher)."""
        rs = by.get((sc, view, strat))
        return max(max(r["conn_peak"], r.get("conn_peak_exact", 0)) for r in rs) if rs else None

    targets = []
    ran = {sc for sc, _, _ in by} | {s["scenario"] for s in skipped}
    ran_views = {(sc, v) for sc, v, _ in by} | {(s["scenario"], s["view"]) for s in skipped}

    def add(tid, text, ok, detail, missing=None):
        status = "not run" if missing else ("pass" if ok else "FAIL")
        if missing:
            reasons = {s["reason"] for s in skipped if s["strategy"] in missing}
            if reasons:
                missing += " (skipped: " + "; ".join(sorted(reasons))[:300] + ")"
        targets.append({"id": tid, "target": text, "status": status,
                        "detail": missing or detail})

    def paired(sc, view, a, b, key):
        """Median over repetitions of a/b, each ratio taken within one
        repetition (the two runs were adjacent in time): the machine's slow
        drift cancels out. Also the medians of a and b."""
        ra = {r["repeat"]: r[key] for r in by.get((sc, view, a), [])}
        rb = {r["repeat"]: r[key] for r in by.get((sc, view, b), [])}
        ratios = [ra[k] / rb[k] for k in ra if k in rb and rb[k]]
        if not ratios:
            return None
        return statistics.median(ratios), statistics.median(ra.values()), \
            statistics.median(rb.values()), len(ratios), min(ratios), max(ratios)

    def ratio_text(r, unit):
        return (f"{r[1]:.{2 if unit == 'ms' else 0}f} vs {r[2]:.{2 if unit == 'ms' else 0}f} {unit}; "
                f"paired ratio {r[0]:.3f}x [{r[4]:.2f}-{r[5]:.2f}] (n={r[3]})")

    # S1
    if "S1" in ran:
        tp = paired("S1", "read", "sharedpool", "persistent", "rps")
        lat = paired("S1", "read", "sharedpool", "persistent", "p99_ms")
        miss = None if tp and lat else "needs S1 sharedpool and persistent runs"
        add("S1-throughput", "S1: sharedpool >= 0.98x persistent throughput",
            tp is not None and tp[0] >= 0.98,
            tp and ratio_text(tp, "req/s"), miss)
        add("S1-p99", "S1: sharedpool p99 <= 1.1x persistent p99",
            lat is not None and lat[0] <= 1.1,
            lat and ratio_text(lat, "ms"), miss)
    # S2
    for view in [v for v, _ in SCENARIOS["S2"]["views"] if ("S2", v) in ran_views]:
        b = SCENARIOS["S2"]["budget"]
        pk = peak("S2", view, "sharedpool")
        add(f"S2-{view}-cap", f"S2 {view}: sharedpool peak server connections <= budget {b}",
            pk is not None and pk <= b, f"peak {pk}",
            None if pk is not None else "needs S2 sharedpool run")
        for other, want in (("pgbouncer", 1.1), ("pgbouncer-session", 1.0)):
            tp = paired("S2", view, "sharedpool", other, "rps")
            add(f"S2-{view}-vs-{other}", f"S2 {view}: sharedpool >= {want}x {other} throughput",
                tp is not None and tp[0] >= want, tp and ratio_text(tp, "req/s"),
                None if tp else f"needs S2 sharedpool and {other} runs")
        lat = paired("S2", view, "sharedpool", "pgbouncer", "p99_ms")
        add(f"S2-{view}-p99", f"S2 {view}: sharedpool p99 <= PgBouncer transaction mode's",
            lat is not None and lat[0] <= 1.0, lat and ratio_text(lat, "ms"),
            None if lat else "needs S2 sharedpool and pgbouncer runs")
    # S3
    if "S3" in ran:
        tp = paired("S3", "skew", "sharedpool", "pgbouncer", "rps")
        lat = paired("S3", "skew", "sharedpool", "pgbouncer", "p99_ms")
        miss = None if tp and lat else "needs S3 sharedpool and pgbouncer runs"
        add("S3-throughput", "S3: sharedpool >= 1.0x PgBouncer throughput",
            tp is not None and tp[0] >= 1.0, tp and ratio_text(tp, "req/s"), miss)
        add("S3-p99", "S3: sharedpool p99 <= PgBouncer's", lat is not None and lat[0] <= 1.0,
            lat and ratio_text(lat, "ms"), miss)
    # S4
    b = SCENARIOS["S4"]["budget"]
    for strat, want_le in (("sharedpool", True), ("pgbouncer", True), ("persistent", False)):
        if "S4" not in ran:
            break
        pk = peak("S4", "read", strat)
        text = (f"S4: {strat} peak server connections <= budget {b}" if want_le
                else f"S4: {strat} peak server connections exceed budget {b}")
        add(f"S4-{strat}", text, pk is not None and ((pk <= b) if want_le else (pk > b)),
            f"peak {pk}", None if pk is not None else f"needs S4 {strat} run")
    # S5
    feats = {}
    for strat in STRATEGIES:
        rs = by.get(("S5", "session", strat))
        if rs:
            feats[strat] = {f: all(r["features"]["served_correctly"][f] for r in rs)
                            for f in FEATURES}
    if "S5" not in ran:
        pass
    elif "sharedpool" in feats:
        bad = [f for f in REQUIRED_FEATURES if not feats["sharedpool"][f]]
        add("S5-sharedpool", "S5: sharedpool serves every session feature", not bad,
            "all served" if not bad else "broken: " + ", ".join(bad))
    else:
        add("S5-sharedpool", "S5: sharedpool serves every session feature", False, "",
            "needs S5 sharedpool run")
    ratios = []
    for (sc, v, st) in sorted(by):
        if st == "sharedpool":
            for other in STRATEGIES:
                tp, lat = paired(sc, v, st, other, "rps"), paired(sc, v, st, other, "p99_ms")
                if other != st and tp and lat:
                    ratios.append({"scenario": sc, "view": v, "vs": other, "n": tp[3],
                                   "rps_ratio": tp[0], "rps_ratio_range": [tp[4], tp[5]],
                                   "p99_ratio": lat[0], "p99_ratio_range": [lat[4], lat[5]]})
    pgb_broken = None
    if "pgbouncer" in feats:
        pgb_broken = [f for f in FEATURES if not feats["pgbouncer"][f]]
    return {"kind": "summary", "targets": targets, "features": feats, "paired_ratios": ratios,
            "pgbouncer_transaction_mode_breaks": pgb_broken,
            "skipped": skipped,
            "table": [
                {"scenario": sc, "view": v, "strategy": st,
                 "rps": median_of(rs, "rps"), "p50_ms": median_of(rs, "p50_ms"),
                 "p99_ms": median_of(rs, "p99_ms"), "errors": sum(r["errors"] for r in rs),
                 "conn_peak": max(r["conn_peak"] for r in rs),
                 "conn_peak_exact": max((r["conn_peak_exact"] for r in rs
                                         if "conn_peak_exact" in r), default=None),
                 "conn_mean": median_of(rs, "conn_mean"),
                 "new_conns_per_s": median_of(rs, "new_conns_per_s"), "runs": len(rs)}
                for (sc, v, st), rs in sorted(by.items())]}


def print_summary(summary: dict) -> None:
    log("")
    log(f"{'scenario':<14}{'strategy':<12}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'errors':>8}{'peak':>6}{'exact':>6}{'mean':>7}{'new/s':>8}")
    for row in summary["table"]:
        ex = row.get("conn_peak_exact")
        log(f"{row['scenario'] + '/' + row['view']:<14}{row['strategy']:<12}"
            f"{row['rps']:>9.0f}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}"
            f"{row['errors']:>8}{row['conn_peak']:>6}{'-' if ex is None else ex:>6}"
            f"{row['conn_mean']:>7.1f}{row['new_conns_per_s']:>8.1f}")
    log("(peak: sampled every 20 ms; exact: from the server's connection log)")
    if summary.get("paired_ratios"):
        log("")
        log("sharedpool / other, median of paired ratios [min-max] over repetitions:")
        for r in summary["paired_ratios"]:
            log(f"  {r['scenario'] + '/' + r['view']:<14} vs {r['vs']:<19} req/s {r['rps_ratio']:5.2f}x "
                f"[{r['rps_ratio_range'][0]:.2f}-{r['rps_ratio_range'][1]:.2f}]  p99 {r['p99_ratio']:5.2f}x "
                f"[{r['p99_ratio_range'][0]:.2f}-{r['p99_ratio_range'][1]:.2f}]  n={r['n']}")
    if summary["features"]:
        log("")
        log("S5 session features served correctly:")
        for strat, fs in summary["features"].items():
            log(f"  {strat:<12}" + "  ".join(f"{f}={'yes' if ok else 'NO'}"
                                              for f, ok in fs.items()))
    if summary["pgbouncer_transaction_mode_breaks"] is not None:
        log("PgBouncer transaction mode breaks: "
            + (", ".join(summary["pgbouncer_transaction_mode_breaks"]) or "nothing"))
    log("")
    log("Targets:")
    for t in summary["targets"]:
        log(f"  [{t['status']:>7}] {t['target']}: {t['detail']}")
    for s in summary["skipped"]:
        log(f"  skipped {s['scenario']}/{s['view']} {s['strategy']}: {s['reason']}")


# --------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Run the same Django app under gunicorn with each connection strategy "
                    "and report throughput, latency and the server's real connection count.",
        epilog="Scenarios: " + "; ".join(f"{k}: {v['desc']}" for k, v in SCENARIOS.items()))
    ap.add_argument("--quick", action="store_true",
                    help="short runs (2 s each, S4 4 s, S2 only the 10 ms view, one repetition) "
                         "to finish in ~4 min")
    ap.add_argument("--scenarios", default=None,
                    help="comma list of " + ",".join(SCENARIOS) + " (default: all)")
    ap.add_argument("--strategies", default=None,
                    help="comma list of " + ",".join(STRATEGIES) + " (default: all but "
                         "sharedpool-nofollow, which turns off the deferral of accepts to workers "
                         "holding connections)")
    ap.add_argument("--duration", type=int, default=None,
                    help="seconds of load per run (default 10, --quick 2; S4 at least 5)")
    ap.add_argument("--repeat", type=int, default=None,
                    help="repeat every run N times, interleaved, strategy order rotated; the "
                         "summary uses medians and paired ratios (default 3, --quick 1)")
    ap.add_argument("--driver", choices=["psycopg2", "psycopg"], default="psycopg2",
                    help="DB-API driver of every strategy, sharedpool's ENGINE included "
                         "(default psycopg2)")
    ap.add_argument("--load", choices=["auto", "wrk", "python"], default="auto",
                    help="load generator: wrk (default when installed) or a python fallback")
    ap.add_argument("--out", default=None,
                    help="results file (default bench/results/<utc stamp>-<mode>.jsonl)")
    ap.add_argument("--no-summary", action="store_true", help="skip the summary file")
    args = ap.parse_args(argv)
    args.scenarios = [s.strip().upper() for s in (args.scenarios or ",".join(SCENARIOS)).split(",")
                      if s.strip()]
    args.strategies = [s.strip().lower() for s in
                       (args.strategies or ",".join(DEFAULT_STRATEGIES)).split(",") if s.strip()]
    for s in args.scenarios:
        if s not in SCENARIOS:
            ap.error(f"unknown scenario {s!r}; known: {', '.join(SCENARIOS)}")
    for s in args.strategies:
        if s not in STRATEGIES:
            ap.error(f"unknown strategy {s!r}; known: {', '.join(STRATEGIES)}")
    if args.duration is None:
        args.duration = 2 if args.quick else 10
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.duration < 1 or args.repeat < 1:
        ap.error("--duration and --repeat must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    global DB_NAME, TEMPLATE_DB
    DB_NAME, TEMPLATE_DB = f"bench_{os.getpid()}", f"bench_{os.getpid()}_template"
    if args.load == "wrk" and not shutil.which("wrk"):
        log("error: wrk not found; run bench/setup.sh")
        return 2
    if args.load == "auto" and not shutil.which("wrk"):
        log("warning: wrk not found (bench/setup.sh installs it); using the slower python "
            "load generator")
    mode = "quick" if args.quick else "full"
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    os.makedirs(RESULTS_DIR, exist_ok=True)
    out = args.out or os.path.join(RESULTS_DIR, f"{stamp}-{mode}.jsonl")
    ctx: dict = {"args": args, "mode": mode, "run_id": f"{stamp}-{mode}",
                 "gunicorn": venv_bin("gunicorn"), "live": [],
                 "wrk": bool(shutil.which("wrk")) and args.load != "python",
                 "harness_cmd": shlex.join([os.path.relpath(sys.executable, ROOT)
                                            if sys.executable.startswith(ROOT) else sys.executable,
                                            os.path.relpath(os.path.abspath(sys.argv[0]), ROOT),
                                            *(sys.argv[1:] if argv is None else argv)])}
    ok, reason = sharedpool_available(sys.executable)
    ctx["sharedpool_ok"], ctx["sharedpool_reason"] = ok, reason
    if "sharedpool" in args.strategies and not ok:
        log(f"note: skipping strategy sharedpool: {reason}")

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    plan = []
    for rep in range(1, args.repeat + 1):
        for sc in args.scenarios:
            views = SCENARIOS[sc]["views"]
            if args.quick and sc == "S2":
                views = [v for v in views if v[0] == "query10ms"]
            for view, paths in views:
                k = (rep - 1) % len(args.strategies)  # rotate the order per repetition
                for strat in args.strategies[k:] + args.strategies[:k]:
                    plan.append((sc, view, paths, strat, rep))
    t_start = time.monotonic()
    server = None
    runs, skipped = [], []
    try:
        log(f"bench: {len(plan)} runs x {args.duration}s, results -> {os.path.relpath(out)}")
        server = Server()
        ctx["server"] = server
        log(f"bench: PostgreSQL from {server.source} at {server.host}:{server.port}")
        server.make_template()
        ctx["versions"] = versions(server)
        ctx["machine"] = machine_info()
        for i, (sc, view, paths, strat, rep) in enumerate(plan, 1):
            label = f"[{i:>2}/{len(plan)}] {sc}/{view:<9} {strat:<10}"
            log(f"{label} running ({args.duration}s) ...")
            t0 = time.monotonic()
            try:
                rec = run_one(ctx, sc, view, paths, strat, rep)
            except Skip as e:
                skipped.append({"scenario": sc, "view": view, "strategy": strat,
                                "reason": str(e)})
                log(f"{label} skipped: {e}")
                continue
            except KeyboardInterrupt:
                raise
            except Exception as e:  # one broken run must not lose the others
                skipped.append({"scenario": sc, "view": view, "strategy": strat,
                                "reason": f"run failed: {type(e).__name__}: {e}"[:2000]})
                log(f"{label} FAILED: {type(e).__name__}: {str(e)[:1500]}")
                continue
            rec["machine"] = ctx["machine"]
            rec["versions"] = ctx["versions"]
            rec["wall_s"] = round(time.monotonic() - t0, 2)
            with open(out, "a") as f:
                f.write(json.dumps(rec, sort_keys=True) + "\n")
            runs.append(rec)
            extra = ""
            if "features" in rec:
                bad = [f for f, ok in rec["features"]["served_correctly"].items() if not ok]
                extra = "  broken: " + (", ".join(bad) if bad else "none")
            ex = rec.get("conn_peak_exact")
            log(f"{label} {rec['rps']:8.0f} req/s  p50 {rec['p50_ms']:6.2f} ms  "
                f"p99 {rec['p99_ms']:7.2f} ms  err {rec['errors']:<5} conns peak "
                f"{rec['conn_peak']:>2} (exact {'-' if ex is None else ex}) mean "
                f"{rec['conn_mean']:5.1f}  new/s {rec['new_conns_per_s']:7.1f}{extra}")
    except KeyboardInterrupt:
        log("bench: interrupted; cleaning up")
        return 130
    finally:
        for p in list(ctx["live"]):
            stop_group(p, signal.SIGKILL, grace=1)
        if server is not None:
            server.drop_all()
            server.stop()
        if runs and not args.no_summary:
            summary = summarize(runs, skipped)
            summary.update({"run_id": ctx["run_id"], "results": os.path.relpath(out, ROOT),
                            "machine": ctx.get("machine"), "versions": ctx.get("versions"),
                            "command": ctx["harness_cmd"],
                            "wall_s": round(time.monotonic() - t_start, 1)})
            spath = out[:-len(".jsonl")] + ".summary.json" if out.endswith(".jsonl") \
                else out + ".summary.json"
            with open(spath, "w") as f:
                json.dump(summary, f, indent=1, sort_keys=True)
            print_summary(summary)
            log(f"\nbench: {len(runs)} runs in {time.monotonic() - t_start:.0f}s; "
                f"results {os.path.relpath(out)}, summary {os.path.relpath(spath)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
