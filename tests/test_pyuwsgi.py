"""uWSGI from a wheel (pyuwsgi, no compiler) with sharedpool's uWSGI integration.

Runs where pyuwsgi is installed (``pip install 'sharedpool[pyuwsgi]'``; it
also installs a ``uwsgi`` command, so keep it out of a venv whose compiled
uwsgi tests/test_uwsgi.py runs). pyuwsgi starts uWSGI inside a running
interpreter, so ini ``env =`` lines never reach ``os.environ``: the settings
travel in the process environment, as the README says.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys

import pytest

from apps.loadtools import Load, pool_status, stop_server, wait_http
from devtools.pgcluster import free_port
from helpers_procs import PeakSampler, process_gone, wait_until
from sharedpool.ledger import Ledger

PYUWSGI = os.path.join(os.path.dirname(sys.executable), "pyuwsgi")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("pyuwsgi") is None or not os.path.exists(PYUWSGI),
                       reason="pyuwsgi is not installed (pip install 'sharedpool[pyuwsgi]')"),
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APPS = os.path.join(ROOT, "tests", "apps")

INI = """\
[uwsgi]
master = true
processes = 4
enable-threads = true
http-socket = 127.0.0.1:{port}
die-on-term = true
need-app = true
disable-logging = true
pythonpath = {apps}
pythonpath = {root}
import = sharedpool.integrations.uwsgi
attach-daemon2 = cmd=exec {python} -m sharedpool.integrations.uwsgi,stopsignal=15
module = pool_app:application
"""


def test_pyuwsgi_workers_stay_within_budget(dsn, unique_name, tmp_path):
    budget, port = 2, free_port()
    ini = tmp_path / "app.ini"
    ini.write_text(INI.format(port=port, apps=APPS, root=ROOT, python=sys.executable))
    env = {**os.environ, "TEST_DSN": dsn, "SHAREDPOOL_NAME": unique_name, "SHAREDPOOL_POOL_SIZE": str(budget),
           "SHAREDPOOL_TIMEOUT": "30"}
    log_path = tmp_path / "uwsgi.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([PYUWSGI, "--ini", str(ini)], stdout=log, stderr=subprocess.STDOUT,
                                   cwd=str(tmp_path), env=env, start_new_session=True)
    try:
        wait_http(port, process=process)
        assert wait_until(lambda: Ledger.exists(unique_name), timeout=10), log_path.read_text()
        coordinator = pool_status(unique_name)["coordinator"]
        with PeakSampler(dsn, unique_name) as sampler:
            load = Load(port, "/sleep?ms=10", clients=8).start()
            load.wait_for(100)
            workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True,
                                                      text=True).stdout.split() if int(p) != coordinator]
            os.kill(workers[0], signal.SIGKILL)
            assert wait_until(lambda: workers[0] not in pool_status(unique_name)["workers"], timeout=2)
            load.wait_for(250)
            load.stop()
            peak = sampler.stop()
        assert 1 <= peak <= budget, f"peak {peak} > budget {budget}"
        assert load.statuses[200] >= 249, load.summary()
    finally:
        stop_server(process)
    assert wait_until(lambda: not Ledger.exists(unique_name), timeout=10), log_path.read_text()[-5000:]
    assert wait_until(lambda: process_gone(coordinator), timeout=5)
