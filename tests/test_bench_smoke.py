"""Smoke test of the benchmark harness (bench/run.py): one short variant.

S1 with the stock persistent-connection strategy for 3 s against the test
server (the ``pg`` fixture, or DATABASE_URL). Checks that the run writes one
JSON line with a real throughput and a real server connection count, and that
it leaves no backends behind. The full benchmark is ``make bench``, not part
of the test suite.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "bench", "run.py")

pytestmark = pytest.mark.slow


def _missing() -> list[str]:
    return [m for m in ("django", "gunicorn", "psycopg2") if importlib.util.find_spec(m) is None]


@pytest.mark.skipif(bool(_missing()), reason=f"bench needs {', '.join(_missing())}")
def test_bench_one_short_variant(pg, tmp_path):
    out = tmp_path / "smoke.jsonl"
    env = dict(os.environ, DATABASE_URL=pg.url)
    proc = subprocess.run(
        [sys.executable, RUN, "--scenarios", "S1", "--strategies", "persistent",
         "--duration", "3", "--repeat", "1", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "S1/read" in proc.stdout  # progress lines
    lines = [json.loads(l) for l in out.read_text().splitlines() if l.strip()]
    assert len(lines) == 1, proc.stdout
    rec = lines[0]
    assert rec["kind"] == "run"
    assert (rec["scenario"], rec["strategy"]) == ("S1", "persistent")
    assert rec["rps"] > 0
    assert rec["errors"] == 0
    assert rec["conn_peak"] > 0
    assert rec["conn_peak"] <= rec["workers"]  # one persistent connection per sync worker
    assert rec["backends_left_after_stop"] == 0
    for key in ("p50_ms", "p99_ms", "conn_mean", "new_conns_per_s", "series", "machine",
                "versions", "command"):
        assert key in rec, key
    assert "gunicorn" in rec["command"]["gunicorn"]
    summary = json.loads((tmp_path / "smoke.summary.json").read_text())
    assert summary["kind"] == "summary"


@pytest.mark.skipif(bool(_missing()), reason=f"bench needs {', '.join(_missing())}")
def test_bench_pairs_sharedpool_with_pgbouncer_session_mode(pg, tmp_path):
    from devtools.pgbouncer import find_pgbouncer

    if find_pgbouncer() is None:
        pytest.skip("pgbouncer not installed (bench/setup.sh installs it)")
    out = tmp_path / "pairs.jsonl"
    env = dict(os.environ, DATABASE_URL=pg.url)
    proc = subprocess.run(
        [sys.executable, RUN, "--scenarios", "S2", "--strategies", "sharedpool,pgbouncer-session",
         "--duration", "2", "--repeat", "1", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = [json.loads(l) for l in out.read_text().splitlines() if l.strip()]
    assert {(r["view"], r["strategy"]) for r in runs} == {
        (v, s) for v in ("read", "query10ms") for s in ("sharedpool", "pgbouncer-session")}
    session = [r for r in runs if r["strategy"] == "pgbouncer-session"]
    assert all(r["pgbouncer"]["pool_mode"] == "session" and r["errors"] == 0 for r in session)
    assert all(max(r["conn_peak"], r.get("conn_peak_exact", 0)) <= 4 for r in runs)
    summary = json.loads((tmp_path / "pairs.summary.json").read_text())
    ratios = {(r["view"], r["vs"]): r for r in summary["paired_ratios"]}
    assert set(ratios) == {("read", "pgbouncer-session"), ("query10ms", "pgbouncer-session")}
    low, high = ratios[("read", "pgbouncer-session")]["rps_ratio_range"]
    assert low <= ratios[("read", "pgbouncer-session")]["rps_ratio"] <= high
