"""``sharedpool systemd-unit``: the unit printed for this installation, and the unit in the wheel.

The printed unit's command lines parse with the real CLI, point at this
venv's ``sharedpool``, and pass ``systemd-analyze verify`` where it exists.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

import pytest

from sharedpool.coordinator.cli import build_parser
from sharedpool.coordinator.unit import installation_paths, installed_command, render

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAREDPOOL = os.path.join(os.path.dirname(sys.executable), "sharedpool")


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([SHAREDPOOL, *args], capture_output=True, text=True, timeout=60, **kwargs)


def entries(unit: str, key: str) -> list[str]:
    return [line.partition("=")[2] for line in unit.splitlines() if line.partition("=")[0] == key]


def expand(command: str, env: dict[str, str]) -> list[str]:
    """Expand ${VAR} (one word) and $VAR (split into words) as systemd does."""
    words = []
    for word in shlex.split(command):
        if word.startswith("$") and not word.startswith("${"):
            words += env.get(word[1:], "").split()
        else:
            for key, value in env.items():
                word = word.replace("${" + key + "}", value)
            words.append(word)
    return words


def test_printed_unit_runs_this_installation():
    result = run("systemd-unit", "--name", "web", "--budget", "8", "--user", "deploy")
    assert result.returncode == 0, result.stderr
    unit = result.stdout
    assert "%i" not in unit
    assert entries(unit, "User") == ["deploy"] and entries(unit, "Group") == []  # the user's primary group
    env = dict(value.partition("=")[::2] for value in entries(unit, "Environment"))
    assert env["SHAREDPOOL_POOL_SIZE"] == "8"
    assert entries(unit, "EnvironmentFile") == ["-/etc/sharedpool/web.env"]  # still wins, for reloads
    for key in ("ExecStart", "ExecReload"):
        [command] = entries(unit, key)
        argv = expand(command, env)
        assert argv[0] == SHAREDPOOL
        args = build_parser().parse_args(argv[1:])
        assert (args.name, args.budget) == ("web", 8)


def test_protect_home_and_private_tmp_follow_the_installation():
    def unit_for(*paths: str) -> str:
        return render("web", 4, user="www-data", group="www-data", command=[paths[0]], installation=list(paths))

    system = unit_for("/opt/app/venv/bin/sharedpool", "/opt/app/venv", "/usr")
    assert entries(system, "ProtectHome") == ["yes"] and entries(system, "PrivateTmp") == ["yes"]
    home = unit_for("/home/deploy/app/.venv/bin/sharedpool", "/home/deploy/app/.venv", "/usr")
    assert entries(home, "ProtectHome") == ["read-only"] and entries(home, "PrivateTmp") == ["yes"]
    pyenv = unit_for("/opt/app/venv/bin/sharedpool", "/opt/app/venv", "/root/.pyenv/versions/3.12.1")
    assert entries(pyenv, "ProtectHome") == ["read-only"]
    tmp = unit_for("/tmp/venv/bin/sharedpool", "/tmp/venv", "/usr")
    assert entries(tmp, "PrivateTmp") == ["no"]
    assert installation_paths(installed_command())[0] == SHAREDPOOL


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_printed_unit(tmp_path):
    result = run("systemd-unit", "--name", "web", "--budget", "8")
    assert result.returncode == 0, result.stderr
    unit = tmp_path / "sharedpool-coordinator@web.service"
    unit.write_text(result.stdout)
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    ours = [line for line in (verify.stdout + verify.stderr).splitlines() if "sharedpool-coordinator" in line]
    assert verify.returncode == 0 and not ours, verify.stdout + verify.stderr


def test_bad_arguments_are_named():
    result = run("systemd-unit", "--name", "web", "--budget", "0")
    assert result.returncode == 2 and "--budget" in result.stderr
    result = run("systemd-unit", "--name", "web", "--budget", "2", "--user", "evil\nExecStartPre=/bin/sh")
    assert result.returncode == 2 and "--user" in result.stderr
    result = run("systemd-unit", "--name", "no/slash", "--budget", "2")
    assert result.returncode == 2 and "--name" in result.stderr
    assert "systemd-unit" in run("--help").stdout


@pytest.mark.slow
def test_wheel_ships_the_unit(tmp_path):
    """A regular install (not editable) prints the unit from its package data."""
    target = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), ROOT],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    assert (target / "sharedpool" / "systemd" / "sharedpool-coordinator@.service").is_file()
    result = subprocess.run(
        [sys.executable, "-m", "sharedpool.coordinator", "systemd-unit", "--name", "jobs", "--budget", "3"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "--name jobs --budget ${SHAREDPOOL_POOL_SIZE}" in result.stdout
    assert "Environment=SHAREDPOOL_POOL_SIZE=3" in result.stdout
