"""systemd/sharedpool-coordinator@.service: the unit file, and the notify protocol it relies on.

systemd is not PID 1 here, so the unit's own command lines (ExecStart,
ExecReload, expanded the way systemd would from the EnvironmentFile) run
under a NOTIFY_SOCKET this test binds: READY=1, WATCHDOG=1 every
WATCHDOG_USEC/2, STATUS= on a budget reload, STOPPING=1 on SIGTERM.
``systemd-analyze verify`` checks the unit where it is installed.
"""
from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from sharedpool.coordinator.cli import build_parser
from sharedpool.ledger import Ledger

from helpers_procs import remove_pool_objects

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = os.path.join(ROOT, "systemd", "sharedpool-coordinator@.service")
ENV_EXAMPLE = os.path.join(ROOT, "systemd", "sharedpool.env.example")
SHAREDPOOL = os.path.join(os.path.dirname(sys.executable), "sharedpool")


def unit_entries() -> dict[str, list[tuple[str, str]]]:
    """Section -> [(key, value)] in file order (systemd keys repeat, so no dict per section)."""
    entries: dict[str, list[tuple[str, str]]] = {}
    section = None
    with open(UNIT) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line.strip("[]")
                entries.setdefault(section, [])
                continue
            key, _, value = line.partition("=")
            entries[section].append((key.strip(), value.strip()))
    return entries


def service(key: str) -> list[str]:
    return [v for k, v in unit_entries()["Service"] if k == key]


def read_env_file(path: str) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None, delimiters=("=",))
    parser.optionxform = str
    with open(path) as f:
        parser.read_string("[env]\n" + f.read())
    return dict(parser["env"])


def expand(command: str, instance: str, env: dict[str, str]) -> list[str]:
    """Expand %i, ${VAR} (one word) and $VAR (split into words) as systemd does."""
    command = command.replace("%i", instance)
    words = []
    for word in shlex.split(command):
        if re.fullmatch(r"\$[A-Za-z_][A-Za-z0-9_]*", word):
            words += env.get(word[1:], "").split()
            continue
        words.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m.group(1), ""), word))
    if words and words[0] == "/usr/local/bin/sharedpool":
        words[0] = SHAREDPOOL
    return words


def test_unit_declares_notify_watchdog_runtime_dir_reload_and_keeps_ipc():
    assert service("Type") == ["notify"]
    assert service("NotifyAccess") == ["main"]
    assert service("WatchdogSec") and int(service("WatchdogSec")[0].rstrip("s")) > 0
    assert service("RuntimeDirectory") == ["sharedpool/%i"]
    assert service("EnvironmentFile") == ["-/etc/sharedpool/%i.env"]
    assert service("RemoveIPC") == ["no"], "stopping the unit must not delete the ledger workers still use"
    [reload] = service("ExecReload")
    assert "reload --name %i --budget ${SHAREDPOOL_POOL_SIZE}" in reload
    # settings that would break POSIX IPC, abstract sockets or /proc watching
    keys = dict(unit_entries()["Service"])
    for key, bad in [("PrivateNetwork", "yes"), ("PrivateDevices", "yes"), ("ProtectProc", "invisible"),
                     ("PrivateUsers", "yes"), ("PrivatePIDs", "yes"), ("PrivateIPC", "yes")]:
        assert keys.get(key) != bad, f"{key}={bad} breaks the coordinator"
    # the command lines parse with the real CLI
    env = read_env_file(ENV_EXAMPLE)
    for command in (service("ExecStart")[0], reload):
        args = build_parser().parse_args(expand(command, "web", env)[1:])
        assert args.name == "web" and args.budget == int(env["SHAREDPOOL_POOL_SIZE"])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path):
    unit = tmp_path / "sharedpool-coordinator@.service"
    with open(UNIT) as f:
        unit.write_text(f.read().replace("/usr/local/bin/sharedpool", SHAREDPOOL))
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "sharedpool-coordinator@web.service")],
                            capture_output=True, text=True, timeout=60)
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "sharedpool-coordinator" in line]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


class NotifySocket:
    """The systemd side of sd_notify: a datagram socket collecting messages."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, list[str]]] = []

    def collect(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode().split("\n")))

    def wait_for(self, field: str, timeout: float = 10.0) -> float:
        deadline = time.monotonic() + timeout
        while True:
            for at, fields in self.messages:
                if any(f == field or f.startswith(field) for f in fields):
                    return at
            if time.monotonic() > deadline:
                raise AssertionError(f"no {field!r} in {self.messages}")
            self.collect(0.05)

    def fields(self) -> list[str]:
        return [f for _, fields in self.messages for f in fields]


@pytest.mark.timing
def test_notify_protocol_ready_watchdog_reload_stopping(tmp_path, unique_name):
    notify = NotifySocket(str(tmp_path / "notify"))
    env_file = tmp_path / f"{unique_name}.env"
    env_file.write_text("SHAREDPOOL_POOL_SIZE=3\nSHAREDPOOL_COORDINATOR_ARGS=--slots 64\n")
    env = read_env_file(str(env_file))
    command = expand(service("ExecStart")[0], unique_name, env)
    process = subprocess.Popen(
        command,
        env={**os.environ, **env, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "1000000"},
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        started = time.monotonic()
        ready = notify.wait_for("READY=1")
        assert Ledger.exists(unique_name), "READY=1 before the ledger exists"
        assert any(f.startswith("STATUS=") and "budget 3" in f for f in notify.fields())
        notify.collect(2.6)
        pings = [at for at, fields in notify.messages if "WATCHDOG=1" in fields]
        # WATCHDOG_USEC 1 s: a ping every 0.5 s; systemd would kill the unit after a 1 s gap
        assert len(pings) >= 3, notify.messages
        assert max(b - a for a, b in zip([ready, *pings], pings)) < 1.0

        # ExecReload with an edited EnvironmentFile changes the budget online
        env_file.write_text("SHAREDPOOL_POOL_SIZE=5\n")
        reload = expand(service("ExecReload")[0], unique_name, read_env_file(str(env_file)))
        result = subprocess.run(reload, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        notify.wait_for("STATUS=pool")
        notify.collect(0.3)
        assert any("budget 5" in f for f in notify.fields() if f.startswith("STATUS=")), notify.messages
        ledger = Ledger.attach(unique_name)
        try:
            assert ledger.header.budget == 5
        finally:
            ledger.close()

        process.send_signal(signal.SIGTERM)  # KillSignal=
        notify.wait_for("STOPPING=1")
        assert process.wait(10) == 0
        assert time.monotonic() - started < 30
        # RemoveIPC=no and no --remove-on-exit: the ledger stays for running workers
        assert Ledger.exists(unique_name)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        remove_pool_objects(unique_name)
        notify.sock.close()


def test_no_watchdog_pings_for_another_pid(tmp_path, unique_name):
    """WATCHDOG_PID names the process systemd watches; anyone else must stay silent."""
    notify = NotifySocket(str(tmp_path / "notify"))
    process = subprocess.Popen(
        [SHAREDPOOL, "coordinator", "--name", unique_name, "--budget", "1", "--remove-on-exit"],
        env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "100000",
             "WATCHDOG_PID": "1"},
        stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        notify.wait_for("READY=1")
        notify.collect(0.5)
        assert "WATCHDOG=1" not in notify.fields()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(10)
        remove_pool_objects(unique_name)
        notify.sock.close()
