"""A regular (non-editable) install gives the same import names as the editable one."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = [
    "sharedpool.pool",
    "sharedpool.ledger",
    "sharedpool.coordinator.cli",
    "sharedpool.coordinator.daemon",
    "sharedpool.integrations.gunicorn",
    "sharedpool.integrations.uwsgi",
    "sharedpool.integrations.django.base",
]


@pytest.mark.slow
def test_wheel_install_has_every_module(tmp_path):
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), ROOT],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    probe = "; ".join(f"import {m}" for m in MODULES) + "; import sharedpool; print(sharedpool.__file__)"
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith(str(target))  # not the source tree
    script = target / "bin" / "sharedpool"
    helped = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert helped.returncode == 0 and "coordinator" in helped.stdout
