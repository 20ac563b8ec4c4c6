"""systemd/sharedpool-metrics@.service: the unit verifies, and its ExecStart line serves the pool's metrics.

systemd is not PID 1 here: the ExecStart line is expanded the way systemd
would (``%i``, ``${VAR}`` from ``Environment=``) and run directly.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from helpers_procs import coordinator
from test_metrics import free_port, samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = os.path.join(ROOT, "systemd", "sharedpool-metrics@.service")
SHAREDPOOL = os.path.join(os.path.dirname(sys.executable), "sharedpool")


def service_values(key: str) -> list[str]:
    with open(UNIT) as f:
        return [line.split("=", 1)[1].strip() for line in f if line.startswith(f"{key}=")]


def exec_start(pool: str, port: int) -> list[str]:
    """ExecStart as systemd would run it for sharedpool-metrics@POOL, with METRICS_PORT=port."""
    env = dict(item.split("=", 1) for value in service_values("Environment") for item in shlex.split(value))
    env["METRICS_PORT"] = str(port)
    [line] = service_values("ExecStart")
    line = line.replace("%i", pool).replace("/usr/local/bin/sharedpool", SHAREDPOOL)
    for key, value in env.items():
        line = line.replace(f"${{{key}}}", value)
    return shlex.split(line)


def test_default_port_of_the_unit_is_the_commands():
    env = dict(item.split("=", 1) for value in service_values("Environment") for item in shlex.split(value))
    assert (env["METRICS_ADDR"], env["METRICS_PORT"]) == ("127.0.0.1", "10187")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path):
    unit = tmp_path / "sharedpool-metrics@.service"
    with open(UNIT) as f:
        unit.write_text(f.read().replace("/usr/local/bin/sharedpool", SHAREDPOOL))
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "sharedpool-metrics@web.service")],
                            capture_output=True, text=True, timeout=60)
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "sharedpool-metrics" in line]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


def test_exec_start_serves_the_pool(unique_name):
    port = free_port()
    with coordinator(unique_name, 3):
        server = subprocess.Popen(exec_start(unique_name, port), stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                        body = response.read().decode()
                    break
                except OSError:
                    assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
                    time.sleep(0.05)
            got = samples(body, unique_name)
            assert (got["sharedpool_up"], got["sharedpool_budget"]) == (1, 3)
        finally:
            server.send_signal(signal.SIGTERM)
            assert server.wait(10) == 0
            server.stderr.close()
