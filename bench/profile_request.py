"""Where one right-sized request's time goes: the bench app's /read, in process, per strategy.

    .venv/bin/python bench/profile_request.py [--requests 3000] [--rounds 3] [--top 25]

Calls the bench app's WSGI handler directly (no server, no network between
client and app) so that what differs between strategies is the database
connection's life per request: ``persistent`` keeps Django's connection,
``sharedpool`` checks one out of its warm pool at the first query and gives
it back at request end. Each round runs one fresh interpreter per strategy,
strategies interleaved (A B A B); reports the median µs per request and the
paired difference, the µs of the connection's life alone in one request
(request_started, the first query's connect, request_finished), then profiles one sharedpool round with cProfile and
prints the functions of the connection's life (Django connect / close,
sharedpool checkout / return, permit path) with their µs per request.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCH_DIR)

CHILD = r"""
import cProfile, io, json, os, pstats, sys, time
import django
django.setup()
from django.core.handlers.wsgi import WSGIHandler
from wsgiref.util import setup_testing_defaults

app = WSGIHandler()

def call():
    environ = {"PATH_INFO": "/read", "REQUEST_METHOD": "GET"}
    setup_testing_defaults(environ)
    out = []
    body = app(environ, lambda status, headers: out.append(status))
    b"".join(body)
    body.close()  # request_finished: Django closes (or keeps) its connection here
    assert out[0].startswith("200"), out

n, profile = int(sys.argv[1]), sys.argv[2] == "1"
for _ in range(200):
    call()  # warm: imports, first connection, caches
if sys.argv[2] == "lifecycle":
    # only the connection's life in one request: request_started, first query, request_finished
    from django.db import close_old_connections, connection
    def life():
        close_old_connections()
        connection.ensure_connection()
        close_old_connections()
    rounds = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(n):
            life()
        rounds.append((time.perf_counter() - t0) / n * 1e6)
    rounds.sort()
    print(json.dumps({"lifecycle_us": rounds[3]}))
    sys.exit(0)
if profile:
    prof = cProfile.Profile()
    prof.enable()
t0 = time.perf_counter()
for _ in range(n):
    call()
elapsed = time.perf_counter() - t0
result = {"us_per_request": elapsed / n * 1e6}
if profile:
    prof.disable()
    stats = pstats.Stats(prof)
    rows = []
    for (filename, line, func), (cc, nc, tt, ct, callers) in stats.stats.items():
        site = os.path.dirname(os.path.dirname(django.__file__))
        where = os.path.relpath(filename, site) if "site-packages" in filename else os.path.relpath(filename)
        rows.append({"func": f"{where}:{line}({func})",
                     "calls_per_request": nc / n, "tottime_us": tt / n * 1e6, "cumtime_us": ct / n * 1e6})
    result["profile"] = rows
print(json.dumps(result))
"""


def child(strategy: str, env: dict, requests: int, profile: bool | str) -> dict:
    env = {**env, "BENCH_STRATEGY": strategy}
    mode = profile if isinstance(profile, str) else ("1" if profile else "0")
    out = subprocess.run([sys.executable, "-c", CHILD, str(requests), mode], env=env,
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{strategy} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


WATCH = ("sharedpool/", "integrations/django/base.py", "django/db/backends/base/base.py",
         "django/db/backends/postgresql/base.py", "django/db/utils.py", "psycopg2/extras.py",
         "django/db/__init__.py")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    import run  # the bench harness: its Server makes the bench database
    from tests.helpers_procs import CoordinatorProc

    run.DB_NAME, run.TEMPLATE_DB = f"bench_{os.getpid()}", f"bench_{os.getpid()}_template"
    server = run.Server()
    name = f"profile{os.getpid()}"
    coordinator = None
    try:
        server.make_template()
        server.fresh_db()
        coordinator = CoordinatorProc(name, 4)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BENCH_", "SHAREDPOOL_"))}
        env.update({"PYTHONPATH": os.pathsep.join([BENCH_DIR, ROOT]), "DJANGO_SETTINGS_MODULE": "app.settings",
                    "BENCH_BUDGET": "4", "BENCH_WORKERS": "4", "BENCH_DB_HOST": server.host,
                    "BENCH_DB_PORT": str(server.port), "BENCH_DB_NAME": run.DB_NAME, "BENCH_DB_USER": server.user,
                    "BENCH_DB_PASSWORD": server.password, "SHAREDPOOL_NAME": name, "SHAREDPOOL_POOL_SIZE": "4"})
        times: dict[str, list[float]] = {"persistent": [], "sharedpool": []}
        for r in range(args.rounds):
            order = ["persistent", "sharedpool"] if r % 2 == 0 else ["sharedpool", "persistent"]
            for strategy in order:
                times[strategy].append(child(strategy, env, args.requests, False)["us_per_request"])
        life: dict[str, list[float]] = {"persistent": [], "sharedpool": []}
        for r in range(args.rounds):
            for strategy in (["persistent", "sharedpool"] if r % 2 == 0 else ["sharedpool", "persistent"]):
                life[strategy].append(child(strategy, env, args.requests, "lifecycle")["lifecycle_us"])
        diffs = [s - p for s, p in zip(times["sharedpool"], times["persistent"])]
        ratios = [p / s for s, p in zip(times["sharedpool"], times["persistent"])]
        for strategy, values in times.items():
            print(f"{strategy:>11}: {statistics.median(values):7.1f} µs per /read request in process "
                  f"(rounds: {', '.join(f'{v:.1f}' for v in values)})")
        print(f"sharedpool - persistent: {statistics.median(diffs):+.1f} µs per request (paired, "
              f"[{min(diffs):+.1f} .. {max(diffs):+.1f}]); in-process throughput ratio "
              f"{statistics.median(ratios):.3f}x")
        for strategy, values in life.items():
            print(f"{strategy:>11}: {statistics.median(values):7.2f} µs for the connection's life in one request "
                  f"(request_started, first query's connect, request_finished; rounds: "
                  f"{', '.join(f'{v:.2f}' for v in values)})")
        prof = child("sharedpool", env, args.requests, True)["profile"]
        persistent_prof = child("persistent", env, args.requests, True)["profile"]
        print("\nsharedpool, cProfile (inflates every call; compare rows, not the totals above):")
        rows = sorted((p for p in prof if any(w in p["func"] for w in WATCH)), key=lambda p: -p["cumtime_us"])
        print(f"{'cum µs/req':>11} {'own µs/req':>11} {'calls/req':>10}  function")
        for p in rows[: args.top]:
            print(f"{p['cumtime_us']:11.1f} {p['tottime_us']:11.1f} {p['calls_per_request']:10.2f}  {p['func']}")
        total = {p["func"]: p for p in persistent_prof}
        def wsgi_handler(rows: list[dict]) -> dict | None:
            return next((p for p in rows if p["func"].endswith("(__call__)") and "handlers/wsgi" in p["func"]), None)

        handler, handler_p = wsgi_handler(prof), wsgi_handler(persistent_prof)
        if handler and handler_p:
            print(f"\nWSGIHandler.__call__ under cProfile: sharedpool {handler['cumtime_us']:.1f} µs, "
                  f"persistent {handler_p['cumtime_us']:.1f} µs")
        only = sorted((p for p in prof if p["func"] not in total and p["cumtime_us"] > 1.0),
                      key=lambda p: -p["cumtime_us"])
        print("\ncalled only with sharedpool (cum µs/req under cProfile):")
        for p in only[: args.top]:
            print(f"{p['cumtime_us']:11.1f} {p['calls_per_request']:10.2f}  {p['func']}")
        os.makedirs(os.path.join(BENCH_DIR, "results"), exist_ok=True)
        with open(os.path.join(BENCH_DIR, "results", "profile_request.jsonl"), "a") as f:
            f.write(json.dumps({"bench": "profile_request", "us_per_request": times, "paired_diff_us": diffs,
                                "connection_life_us": life,
                                "ratios": ratios, "requests": args.requests,
                                "command": " ".join([os.path.relpath(sys.executable, ROOT), *sys.argv])}) + "\n")
    finally:
        if coordinator is not None:
            coordinator.close()
            from sharedpool.ledger import unlink

            unlink(name)
        server.drop_all()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
