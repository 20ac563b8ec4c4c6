"""`make demo`: the same Django site under gunicorn, with sharedpool, with PgBouncer and with the stock backend.

    python examples/demo/run_demo.py [--seconds 20] [--workers 8] [--budget 4] [--clients 32]

1. PostgreSQL: DATABASE_URL if given, else a throwaway cluster
   (``python -m devtools.pgcluster start/stop --dir D``).
2. sharedpool run: ``sharedpool coordinator --name demoNNN --budget B``, then
   gunicorn with more workers than the budget (examples/demo/gunicorn.conf.py
   imports sharedpool's hooks); load for ``--seconds`` with progress, a live
   ``sharedpool status`` table, and pg_stat_activity sampled every 10 ms.
3. PgBouncer run: the stock ENGINE through a PgBouncer of its own in
   transaction mode with ``default_pool_size = max_db_connections`` = the
   budget (the alternative that holds the same cap; installed with apt-get
   when missing, as PostgreSQL is); ``--skip-pgbouncer`` leaves it out.
4. stock run: the same app, ENGINE django.db.backends.postgresql, same load.
5. Summary side by side: requests, errors, p50/p99, peak server connections
   against the budget. Everything started is stopped; nothing is left in /dev/shm.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import unquote, urlsplit, urlunsplit

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BIN = os.path.dirname(sys.executable)
sys.path[:0] = [HERE, ROOT]

import psycopg2  # noqa: E402

from loadgen import Load  # noqa: E402
from devtools.pgbouncer import PgBouncer, ensure_installed  # noqa: E402
from devtools.pgcluster import free_port  # noqa: E402
from sharedpool.embedded import coordinator_ready  # noqa: E402


def say(text: str = "") -> None:
    print(text, flush=True)


class PeakSampler(threading.Thread):
    """Count the run's backends in pg_stat_activity every 10 ms; keep the peak."""

    def __init__(self, url: str, app_name: str) -> None:
        super().__init__(daemon=True)
        self.conn = psycopg2.connect(url, application_name="demo-sampler")
        self.conn.autocommit = True
        self.app_name = app_name
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        with self.conn.cursor() as cur:
            while not self.done.is_set():
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                            "AND application_name = %s", (self.app_name,))
                self.peak = max(self.peak, cur.fetchone()[0])
                self.done.wait(0.01)

    def stop(self) -> int:
        self.done.set()
        self.join()
        self.conn.close()
        return self.peak


class Processes:
    """Every process the demo starts, stopped in reverse order whatever happens."""

    def __init__(self) -> None:
        self.started: list[tuple[str, subprocess.Popen]] = []

    def start(self, label: str, argv: list[str], **kw) -> subprocess.Popen:
        process = subprocess.Popen(argv, start_new_session=True, **kw)
        self.started.append((label, process))
        return process

    def stop(self, process: subprocess.Popen, timeout: float = 20.0) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def stop_all(self) -> None:
        while self.started:
            self.stop(self.started.pop()[1])


def wait_http(port: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"gunicorn exited with {process.returncode}")
        with contextlib.suppress(OSError):
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        time.sleep(0.05)
    raise SystemExit("gunicorn did not start")


def prepare_schema(url: str) -> None:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS demo_item")
        cur.execute("CREATE TABLE demo_item (id int PRIMARY KEY, name text NOT NULL, hits int NOT NULL DEFAULT 0)")
        cur.execute("INSERT INTO demo_item SELECT i, 'item ' || i, 0 FROM generate_series(1, 100) i")
    conn.close()


def run(args, url: str, backend: str, pool: str, procs: Processes, logdir: str) -> dict:
    """One run: gunicorn with ``args.workers`` sync workers, load, sampling; returns the summary."""
    env = {**os.environ, "DATABASE_URL": url, "DEMO_BACKEND": backend, "DEMO_BUDGET": str(args.budget),
           "DEMO_POOL": pool, "DJANGO_SETTINGS_MODULE": "demoproject.settings",
           "PYTHONPATH": os.pathsep.join(filter(None, [HERE, ROOT, os.environ.get("PYTHONPATH")]))}
    coordinator = bouncer = None
    if backend == "pgbouncer":
        target = urlsplit(url)
        bouncer = PgBouncer(target.hostname or "127.0.0.1", target.port or 5432, unquote(target.username or ""),
                            unquote(target.password or ""), unquote(target.path.lstrip("/")) or "postgres",
                            args.budget, logdir)
        say(f"-- started PgBouncer: pool_mode {bouncer.pool_mode}, default_pool_size = max_db_connections = "
            f"{args.budget}, port {bouncer.port}")
        env["DATABASE_URL"] = urlunsplit(target._replace(netloc=f"{target.netloc.rpartition('@')[0]}@127.0.0.1:"
                                                                 f"{bouncer.port}"))
    if backend == "sharedpool":
        say(f"-- starting the coordinator: sharedpool coordinator --name {pool} --budget {args.budget}")
        coordinator = procs.start("coordinator", [os.path.join(BIN, "sharedpool"), "coordinator", "--name", pool,
                                                  "--budget", str(args.budget), "--remove-on-exit"],
                                  env=env, stderr=open(os.path.join(logdir, "coordinator.log"), "wb"))
        deadline = time.monotonic() + 10
        while not coordinator_ready(pool) and time.monotonic() < deadline:
            time.sleep(0.02)
    port = free_port()
    config = ["-c", os.path.join(HERE, "gunicorn.conf.py")] if backend == "sharedpool" else []
    argv = [os.path.join(BIN, "gunicorn"), *config, "--bind", f"127.0.0.1:{port}", "--workers", str(args.workers),
            "--no-control-socket", "--log-level", "warning", "demoproject.wsgi:application"]
    say(f"-- starting gunicorn: {args.workers} sync workers, {backend} backend"
        + (f", budget {args.budget}" if backend != "stock" else ""))
    server = procs.start("gunicorn", argv, env=env, cwd=HERE,
                         stdout=subprocess.DEVNULL, stderr=open(os.path.join(logdir, f"gunicorn-{backend}.log"), "wb"))
    wait_http(port, server)
    sampler = PeakSampler(url, f"sharedpool/{pool}" if backend == "sharedpool" else f"demo-{backend}")
    sampler.start()
    status_stop = threading.Event()

    def show_status() -> None:
        while not status_stop.wait(5.0):
            table = subprocess.run([os.path.join(BIN, "sharedpool"), "status", "--name", pool],
                                   capture_output=True, text=True).stdout
            say("   " + table.replace("\n", "\n   ").rstrip())
            say(f"   server connections now: peak so far {sampler.peak}, budget {args.budget}")

    status_thread = threading.Thread(target=show_status, daemon=True)
    if backend == "sharedpool":
        status_thread.start()
    say(f"-- load: {args.clients} clients for {args.seconds:.0f} s (/read 60 %, /write 25 %, /slow 15 %)")
    result = Load("127.0.0.1", port, args.clients, args.seconds).run(say)
    status_stop.set()
    if status_thread.is_alive():
        status_thread.join()
    result["peak"] = sampler.stop()
    say(f"-- stopping gunicorn ({backend})")
    procs.stop(server)
    if coordinator is not None:
        procs.stop(coordinator)
    if bouncer is not None:
        bouncer.stop()
    return result


def summary(budget: int, workers: int, results: dict[str, dict]) -> str:
    rows = [
        ("requests served", lambda r: f"{r['requests']}"),
        ("errors", lambda r: f"{r['errors']}"),
        ("requests/s", lambda r: f"{r['rps']:.0f}"),
        ("p50 latency", lambda r: f"{r['p50_ms']:.1f} ms"),
        ("p99 latency", lambda r: f"{r['p99_ms']:.1f} ms"),
        ("peak server connections", lambda r: f"{r['peak']}"),
        ("budget", lambda r: f"{budget}"),
        ("within budget", lambda r: "yes" if r["peak"] <= budget else f"NO (+{r['peak'] - budget})"),
    ]
    names = list(results)
    lines = [f"== summary: {workers} gunicorn sync workers, budget {budget} server connections ==",
             f"{'':26}" + "".join(f"{name:>22}" for name in names)]
    for label, cell in rows:
        lines.append(f"{label:26}" + "".join(f"{cell(results[name]):>22}" for name in names))
    for name in names:
        if results[name]["error_kinds"]:
            lines.append(f"errors of {name}: {results[name]['error_kinds']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="load per run (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=8, help="gunicorn sync workers (default: %(default)s)")
    parser.add_argument("--budget", type=int, default=4, help="POOL_SIZE of the sharedpool run (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent load clients (default: %(default)s)")
    parser.add_argument("--skip-pgbouncer", action="store_true", help="leave the PgBouncer run out")
    parser.add_argument("--skip-stock", action="store_true", help="leave the stock run out")
    args = parser.parse_args(argv)

    procs = Processes()
    workdir = tempfile.mkdtemp(prefix="sharedpool-demo-")
    os.chmod(workdir, 0o755)  # as root, the cluster runs as the postgres OS user and must reach it
    cluster_dir = None
    pool = f"demo{os.getpid()}"
    results: dict[str, dict] = {}
    try:
        url = os.environ.get("DATABASE_URL")
        if url:
            say(f"-- PostgreSQL: DATABASE_URL ({url.split('@')[-1]})")
        else:
            cluster_dir = os.path.join(workdir, "pg")
            say("-- PostgreSQL: starting a throwaway cluster (python -m devtools.pgcluster start)")
            started = subprocess.run([sys.executable, "-m", "devtools.pgcluster", "start", "--dir", cluster_dir],
                                     cwd=ROOT, capture_output=True, text=True)
            if started.returncode != 0:
                raise SystemExit(f"could not start PostgreSQL:\n{started.stderr}")
            url = started.stdout.strip()
            say(f"   {url}")
        prepare_schema(url)
        say(f"\n== run 1: sharedpool (ENGINE sharedpool.integrations.django, POOL_SIZE {args.budget}) ==")
        results["sharedpool"] = run(args, url, "sharedpool", pool, procs, workdir)
        if not args.skip_pgbouncer:
            say(f"\n== run 2: PgBouncer (stock ENGINE through PgBouncer, transaction mode, pool {args.budget}) ==")
            try:
                ensure_installed()
            except (RuntimeError, subprocess.CalledProcessError) as exc:
                say(f"!! no PgBouncer run: {exc}")
            else:
                results["pgbouncer"] = run(args, url, "pgbouncer", pool, procs, workdir)
        if not args.skip_stock:
            say("\n== run 3: stock (ENGINE django.db.backends.postgresql, CONN_MAX_AGE 60) ==")
            results["stock"] = run(args, url, "stock", pool, procs, workdir)
        say()
        say(summary(args.budget, args.workers, results))
    finally:
        procs.stop_all()
        if cluster_dir is not None:
            say("-- stopping the throwaway PostgreSQL")
            subprocess.run([sys.executable, "-m", "devtools.pgcluster", "stop", "--dir", cluster_dir], cwd=ROOT,
                           capture_output=True)
        leftovers = [e for e in os.listdir("/dev/shm") if pool in e]
        if leftovers:
            say(f"!! left in /dev/shm: {leftovers}")
        shutil.rmtree(workdir, ignore_errors=True)
    ours = results.get("sharedpool")
    ok = ours is not None and ours["peak"] <= args.budget and not ours["errors"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
