"""``sharedpool status``: every pool of the host, waits across and inside processes, backends joined with the server."""
from __future__ import annotations

import json

import psycopg2
import pytest

from sharedpool.ledger import SlotView
from helpers_procs import PoolWorker, coordinator, on_server, read_line, run_cli, start_worker, wait_until


def pools_listing() -> dict[str, dict]:
    out = run_cli("status", "--json", "--rate-window", "0")
    assert out.returncode == 0, out.stderr
    return {pool["name"]: pool for pool in json.loads(out.stdout)}


def test_status_without_name_lists_every_pool(dsn, unique_name):
    other = unique_name + "b"
    with coordinator(unique_name, 3), coordinator(other, 2):
        holder = PoolWorker(unique_name, 3, dsn)
        waiter = PoolWorker(other, 2, dsn)
        try:
            holder.get(2)
            holder.proc.stdin.write("put 1\n")  # one idle, one in use
            assert read_line(holder.proc) == "ok"
            waiter.get(2)
            # a third checkout waits for a permit across processes
            third = PoolWorker(other, 2, dsn)
            try:
                third.proc.stdin.write("get 1\n")
                listing = wait_until(lambda: (p := pools_listing()) and p[other]["waiting"] == 1 and p)
                assert listing, pools_listing()
                mine, theirs = listing[unique_name], listing[other]
                assert (mine["budget"], mine["free"], mine["held"], mine["idle"], mine["in_use"], mine["processes"]) == (3, 1, 2, 1, 1, 1)
                assert (theirs["budget"], theirs["free"], theirs["held"], theirs["processes"], theirs["waiting"]) == (2, 0, 2, 2, 1)
                assert theirs["maxwait_s"] > 0

                table = run_cli("status", "--rate-window", "0.2")
                assert table.returncode == 0, table.stderr
                lines = table.stdout.splitlines()
                assert lines[0].split() == ["POOL", "BUDGET", "FREE", "HELD", "IDLE", "IN_USE", "PROCS", "WAIT",
                                            "QUEUED", "MAXWAIT", "OPEN/S", "COORDINATOR"]
                [row] = [line for line in lines if line.split()[0] == unique_name]
                assert row.split()[1:10] == ["3", "1", "2", "1", "1", "1", "0", "0", "0.00s"]
                assert row.split()[11:] == ["pid", row.split()[-1]]  # coordinator running
            finally:
                waiter.exit()  # frees a permit: the third gets it
                assert read_line(third.proc).startswith("ok")
                third.exit()
        finally:
            holder.exit()


@pytest.mark.skipif("local_waiting" not in SlotView.__dataclass_fields__,
                    reason="the ledger does not record threads queued inside a process yet")
def test_threads_queued_inside_a_process_are_shown(dsn, unique_name):
    with coordinator(unique_name, 4):
        worker = start_worker(
            f"""
            import sys, threading
            from sharedpool import LocalPool, PoolConfig
            pool = LocalPool(PoolConfig(name={unique_name!r}, pool_size=4, max_per_process=1, timeout=30), {dsn!r})
            conn = pool.getconn()
            waiters = [threading.Thread(target=lambda: pool.putconn(pool.getconn())) for _ in range(2)]
            for t in waiters:
                t.start()
            print("queued", flush=True)
            sys.stdin.read()
            pool.putconn(conn)
            for t in waiters:
                t.join()
            """
        )
        try:
            assert read_line(worker) == "queued"
            status = wait_until(lambda: (s := json.loads(run_cli("status", "--name", unique_name, "--json", "--rate-window", "0").stdout))["waiting_local"] == 2 and s)
            assert status, "threads queued inside the worker not shown"
            assert (status["held"], status["free"], status["waiting"]) == (1, 3, 0)
        finally:
            worker.communicate("", timeout=30)
        assert worker.returncode == 0


def test_backends_joined_with_pg_stat_activity(dsn, unique_name):
    with coordinator(unique_name, 3):
        worker = PoolWorker(unique_name, 3, dsn)
        stray = psycopg2.connect(dsn, application_name=f"sharedpool/{unique_name}")  # a backend no worker records
        try:
            first, second = worker.get(2)
            admin = psycopg2.connect(dsn, application_name="test-status-admin")
            admin.autocommit = True
            with admin.cursor() as cur:
                cur.execute("SELECT pg_terminate_backend(%s)", (second,))  # the ledger still records it
            admin.close()
            assert wait_until(lambda: not on_server(dsn, second))

            out = run_cli("status", "--name", unique_name, "--json", "--dsn", dsn, "--rate-window", "0")
            assert out.returncode == 0, out.stderr
            report = json.loads(out.stdout)["backends"]
            rows = {r["backend_pid"]: r for r in report["backends"]}
            assert set(rows) == {first, second}
            assert rows[first]["worker_pid"] == worker.pid and rows[first]["on_server"]
            assert rows[first]["state"] == "idle" and rows[first]["application_name"] == f"sharedpool/{unique_name}"
            assert not rows[second]["on_server"]
            assert report["missing"] == [second]
            assert report["orphans"] == [stray.info.backend_pid]

            table = run_cli("status", "--name", unique_name, "--dsn", dsn, "--rate-window", "0")
            assert f"backends of pool {unique_name!r}:" in table.stdout
            assert f"{first:>8} {worker.pid:>8} alive         idle for" in table.stdout
            assert f"{second:>8} {worker.pid:>8} alive         NOT ON SERVER" in table.stdout
            assert f"orphans: {stray.info.backend_pid}; in the ledger but not on the server: {second}" in table.stdout

            plain = run_cli("status", "--name", unique_name, "--backends", "--rate-window", "0")
            assert f"{first:>8} {worker.pid:>8} alive" in plain.stdout and "orphans" not in plain.stdout
        finally:
            stray.close()
            worker.proc.stdin.write("put 2\n")  # the terminated one is discarded on return
            read_line(worker.proc)
            worker.exit()


def test_status_dsn_that_cannot_connect(dsn, unique_name):
    with coordinator(unique_name, 2):
        out = run_cli("status", "--name", unique_name, "--dsn", "host=127.0.0.1 port=1 connect_timeout=2", "--rate-window", "0")
    assert out.returncode == 1
    assert out.stderr.startswith("sharedpool status: --dsn: cannot connect to the server:")


def test_version():
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("sharedpool ")
