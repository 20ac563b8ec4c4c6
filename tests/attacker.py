"""Act as other local users: throwaway accounts, and Python run under their uid.

Runs in the pytest process (root). ``HostUsers`` creates an unprivileged
attacker, a group and a member of that group (a supplementary member, as
``usermod -aG`` makes them), and removes them again. ``try_as`` runs a list
of file and socket actions as one of them in a fresh interpreter that
imports only the standard library, and returns what each got: "ok", an
errno name, or counts for a flood. ``start_as`` starts any program as them.
"""
from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import secrets
import shutil
import signal
import site
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass

from helpers_procs import POOL_WORKER, PoolWorker, read_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One action per list entry; every failure is reported by errno name, never raised.
TOOL = textwrap.dedent(
    r"""
    import errno, json, os, socket, sys, time

    def name_of(exc):
        return errno.errorcode.get(exc.errno, type(exc).__name__)

    def act(kind, *args):
        if kind == "send":  # one datagram to a filesystem socket
            path, payload = args
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendto(payload.encode(), path)
        elif kind == "connect":
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.connect(args[0])
        elif kind == "bind":  # squat a filesystem socket name; the socket file stays
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).bind(args[0])
        elif kind == "bind_abstract":  # the old design's addresses: harmless now, must not matter
            held.append(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
            held[-1].bind("\0" + args[0])
        elif kind == "create":
            os.close(os.open(args[0], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666))
        elif kind == "write":  # create a file with content and mode (chmod: whatever the umask)
            path, hexdata, mode = args
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            os.write(fd, bytes.fromhex(hexdata))
            os.fchmod(fd, mode)
            os.close(fd)
        elif kind == "open":
            os.close(os.open(args[0], os.O_RDONLY))
        elif kind == "unlink":
            os.unlink(args[0])
        elif kind == "listdir":
            os.listdir(args[0])
        elif kind == "mkdir":
            os.mkdir(args[0])
            os.chmod(args[0], args[1])
        elif kind == "symlink":
            os.symlink(args[0], args[1])
        elif kind == "flood":  # as many datagrams as fit in SECONDS; count what each send got
            path, payloads, seconds = args
            counts = {}
            deadline = time.monotonic() + seconds
            i = 0
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.setblocking(False)
                while time.monotonic() < deadline:
                    try:
                        s.sendto(payloads[i % len(payloads)].encode(), path)
                        got = "ok"
                    except OSError as exc:
                        got = name_of(exc)
                        if got == "EAGAIN":
                            time.sleep(0.0005)
                    counts[got] = counts.get(got, 0) + 1
                    i += 1
            return counts
        else:
            raise SystemExit(f"unknown action {kind}")
        return "ok"

    held = []
    results = []
    for action in json.loads(sys.argv[1]):
        try:
            results.append(act(*action))
        except OSError as exc:
            results.append(name_of(exc))
    print(json.dumps(results), flush=True)
    """
)


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    extra_gids: tuple[int, ...] = ()

    def subprocess_ids(self) -> dict:
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.extra_gids)}


def _admin(*argv: str, patience: float = 20.0) -> None:
    """Run useradd/groupadd/userdel, retrying: other tests on the host may hold /etc/passwd's lock a while,
    and a user's last process may still be exiting."""
    deadline = time.monotonic() + patience
    while True:
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
        time.sleep(0.1)


class HostUsers:
    """An attacker (no shared group), a group, and a member of it; all removed by ``remove``.

    ``python`` is an interpreter they can execute: ours, or (when ours lives
    under a directory only root may enter, e.g. /root/.pyenv) a system one of
    the same version that loads our site-packages through a sitecustomize in
    a world-readable temporary directory (``env()`` points PYTHONPATH there).
    """

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.group_name = f"sp-grp-{tag}"
        self._users: list[str] = []
        self._group = False
        self.site_dir: str | None = None
        try:
            _admin("groupadd", "--system", self.group_name)
            self._group = True
            self.gid = grp.getgrnam(self.group_name).gr_gid
            self.attacker = self._add(f"sp-atk-{tag}")
            self.member = self._add(f"sp-mem-{tag}", "--groups", self.group_name)
            self.python = self._interpreter()
        except BaseException:
            self.remove()
            raise

    def _runs(self, python: str, env: dict[str, str]) -> bool:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run([python, "-c", "import sharedpool.coordinator.cli, psycopg2, posix_ipc"],
                                  capture_output=True, timeout=30, cwd="/", env=env, **self.member.subprocess_ids())
            return done.returncode == 0
        return False

    def _interpreter(self) -> str:
        if self._runs(sys.executable, clean_env()):
            return sys.executable
        self.site_dir = tempfile.mkdtemp(prefix="sp-site-")
        os.chmod(self.site_dir, 0o755)
        with open(os.path.join(self.site_dir, "sitecustomize.py"), "w") as f:
            f.write("import site\n" + "".join(f"site.addsitedir({d!r})\n" for d in site.getsitepackages()))
        os.chmod(os.path.join(self.site_dir, "sitecustomize.py"), 0o644)
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        for candidate in (f"/usr/bin/{version}", f"/usr/local/bin/{version}", shutil.which(version)):
            if candidate and self._runs(candidate, clean_env(PYTHONPATH=f"{ROOT}:{self.site_dir}")):
                return candidate
        raise RuntimeError(f"no {version} interpreter the test users can execute (ours is {sys.executable})")

    def env(self, **extra: str) -> dict[str, str]:
        paths = [ROOT] + ([self.site_dir] if self.site_dir else [])
        return clean_env(PYTHONPATH=":".join(paths), **extra)

    def _add(self, name: str, *extra: str) -> User:
        _admin("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group",
               *extra, name)
        self._users.append(name)
        entry = pwd.getpwnam(name)
        extra_gids = tuple(g.gr_gid for g in grp.getgrall() if name in g.gr_mem)
        return User(name, entry.pw_uid, entry.pw_gid, extra_gids)

    def remove(self) -> None:
        """Remove the users (and the groups useradd made for them), then the group; raise what failed."""
        failures = []
        for name in reversed(self._users):
            try:
                _admin("userdel", name)
            except RuntimeError as exc:
                failures.append(str(exc))
        self._users = []
        if self.site_dir:
            shutil.rmtree(self.site_dir, ignore_errors=True)
            self.site_dir = None
        if self._group:
            try:
                _admin("groupdel", self.group_name)
            except RuntimeError as exc:
                failures.append(str(exc))
            self._group = False
        if failures:
            raise RuntimeError("; ".join(failures))


def clean_env(**extra: str) -> dict[str, str]:
    """An environment without root's: what a login of that user would have, plus ``extra``."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    env.update(extra)
    return env


def start_tool(host: HostUsers, user: User | None, actions: list[list]) -> subprocess.Popen:
    """Start ``actions`` (see TOOL) as ``user`` (None: root); ``tool_results`` collects them."""
    return subprocess.Popen(
        [host.python if user else sys.executable, "-I", "-c", TOOL, json.dumps(actions)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL, cwd="/", env=clean_env(),
        **(user.subprocess_ids() if user else {}),
    )


def tool_results(proc: subprocess.Popen, timeout: float = 30.0) -> list:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        stop_process(proc)
    assert proc.returncode == 0, f"attacker tool failed: {err}"
    return json.loads(out)


def try_as(host: HostUsers, user: User | None, actions: list[list], timeout: float = 30.0) -> list:
    """Run ``actions`` (see TOOL) as ``user`` (None: root); return one result per action."""
    return tool_results(start_tool(host, user, actions), timeout)


def start_as(host: HostUsers, user: User, args: list[str], **env: str) -> subprocess.Popen:
    """Start ``python ARGS`` as ``user`` with line-buffered text pipes (drive it like helpers_procs workers)."""
    return subprocess.Popen(
        [host.python, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        bufsize=1, cwd=ROOT, env=host.env(**env), **user.subprocess_ids(),
    )


def run_cli_as(host: HostUsers, user: User | None, *args: str, timeout: float = 30.0, umask: int = -1,
               **env: str) -> subprocess.CompletedProcess:
    """Run the ``sharedpool`` command as ``user`` (None: root, with a clean environment too)."""
    ids = user.subprocess_ids() if user else {}
    return subprocess.run(
        [host.python if user else sys.executable, "-m", "sharedpool.coordinator", *args], capture_output=True,
        text=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd=ROOT, env=host.env(**env), umask=umask, **ids,
    )


@dataclass(frozen=True)
class FileState:
    """What a file looked like: compare before and after an attack."""

    uid: int
    gid: int
    mode: int
    size: int
    mtime_ns: int
    ino: int
    content: bytes | None

    @classmethod
    def of(cls, path: str) -> "FileState":
        info = os.lstat(path)
        content = None
        if stat.S_ISREG(info.st_mode):
            with open(path, "rb") as f:
                content = f.read()
        return cls(info.st_uid, info.st_gid, info.st_mode, info.st_size, info.st_mtime_ns, info.st_ino, content)


def tree_state(path: str) -> dict[str, FileState]:
    """The state of ``path`` and, for a directory, of every entry in it (not following links)."""
    states = {path: FileState.of(path)}
    if os.path.isdir(path) and not os.path.islink(path):
        for entry in os.listdir(path):
            states[os.path.join(path, entry)] = FileState.of(os.path.join(path, entry))
    return states


def owned_in_shm(uids: set[int]) -> list[str]:
    """/dev/shm entries that belong to any of ``uids``."""
    found = []
    for entry in os.listdir("/dev/shm"):
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(f"/dev/shm/{entry}").st_uid in uids:
                found.append(entry)
    return sorted(found)


def stop_process(proc: subprocess.Popen) -> None:
    """Kill a process this test started (by its own Popen), and close its pipes."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


class UserPoolWorker(PoolWorker):
    """helpers_procs' PoolWorker (a plain ``PoolConfig(...)``), run as ``user`` (None: root) with ``env`` added."""

    def __init__(self, host: HostUsers, user: User | None, name: str, budget: int, dsn: str, **env: str) -> None:
        args = ["-c", POOL_WORKER, name, str(budget), dsn]
        if user is None:
            self.proc = subprocess.Popen(
                [sys.executable, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, bufsize=1, env={**os.environ, **env},
            )
        else:
            self.proc = start_as(host, user, args, **env)
        line = read_line(self.proc)
        if not line.startswith("ready"):
            raise AssertionError(f"pool worker failed to start: {line!r} {self.proc.stderr.read()}")
