"""A throwaway PostgreSQL cluster for tests, the demo and the benchmarks.

Library use::

    from devtools.pgcluster import TempCluster, server_backends

    with TempCluster() as pg:          # initdb + start, ~1-2 s
        print(pg.dsn)                  # host=127.0.0.1 port=NNNN user=postgres dbname=postgres
        print(pg.url)                  # postgresql://postgres@127.0.0.1:NNNN/postgres
        pg.pg_ctl("restart")           # any pg_ctl mode; -D/-l/-w are added
    # stopped (fast mode) and its directory removed

Command line (used by the demo and bench)::

    python -m devtools.pgcluster start --dir DIR   # prints the URL, leaves it running
    python -m devtools.pgcluster url   --dir DIR   # prints the URL of a running one
    python -m devtools.pgcluster stop  --dir DIR   # stops it and removes DIR

Runs as root too: initdb refuses root, so the directory is given to the
``postgres`` OS user and initdb/pg_ctl run as that user through ``runuser``.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from urllib.parse import quote, unquote, urlsplit

__all__ = [
    "TempCluster",
    "ClusterError",
    "find_bindir",
    "server_backends",
    "free_port",
    "dsn_to_url",
    "url_to_dsn",
    "main",
]

STATE_FILE = "cluster.json"
CONF_FILE = "devtools.conf"
SERVER_USER = "postgres"

#: Server settings; anything passed as ``settings=`` overrides these.
DEFAULT_SETTINGS: dict[str, object] = {
    "listen_addresses": "127.0.0.1",
    "max_connections": 300,
    "shared_buffers": "16MB",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_level": "minimal",
    "max_wal_senders": 0,
    "autovacuum": "off",
    "jit": "off",
    "logging_collector": "off",
    "log_min_messages": "warning",
    "log_line_prefix": "%m [%p] %a ",
}


class ClusterError(RuntimeError):
    """initdb / pg_ctl / startup failed; the message carries the output and log tail."""


# --------------------------------------------------------------------------- helpers

def _version_key(path: str) -> tuple:
    ver = os.path.basename(os.path.dirname(path.rstrip("/")))
    return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.]", ver))


def find_bindir() -> str:
    """Directory of initdb/pg_ctl/postgres: ``initdb`` on PATH (symlinks resolved),
    else the newest /usr/lib/postgresql/*/bin. Raises ClusterError if none."""
    env = os.environ.get("PG_BINDIR")
    if env and os.path.isfile(os.path.join(env, "initdb")):
        return env
    found = shutil.which("initdb")
    if found:
        real = os.path.dirname(os.path.realpath(found))
        if all(os.path.isfile(os.path.join(real, b)) for b in ("pg_ctl", "postgres")):
            return real
    cands = [d for d in glob.glob("/usr/lib/postgresql/*/bin")
             if os.path.isfile(os.path.join(d, "initdb"))]
    if cands:
        return sorted(cands, key=_version_key)[-1]
    raise ClusterError(
        "no PostgreSQL server binaries: initdb is not on PATH and no "
        "/usr/lib/postgresql/*/bin/initdb (apt-get install postgresql, or set PG_BINDIR)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _is_root() -> bool:
    return os.geteuid() == 0


def _as_server_user(argv: list[str]) -> list[str]:
    if not _is_root():
        return argv
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    if os.path.exists(runuser):
        return [runuser, "-u", SERVER_USER, "--", *argv]
    setpriv = shutil.which("setpriv")
    if setpriv:
        import pwd
        pw = pwd.getpwnam(SERVER_USER)
        return [setpriv, f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}",
                "--init-groups", *argv]
    raise ClusterError("running as root but neither runuser nor setpriv is available")


def _chown_tree(path: str) -> None:
    if not _is_root():
        return
    import pwd
    try:
        pw = pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise ClusterError(
            f"running as root: initdb refuses root and there is no {SERVER_USER!r} "
            "OS user to run it as (useradd --system postgres)") from None
    for root, dirs, files in os.walk(path):
        os.chown(root, pw.pw_uid, pw.pw_gid)
        for f in files:
            os.chown(os.path.join(root, f), pw.pw_uid, pw.pw_gid)


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    return env


def _conf_value(v: object) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, (int, float)):
        return str(v)
    return "'" + str(v).replace("'", "''") + "'"


def _dsn_quote(v: str) -> str:
    if v and re.fullmatch(r"[^\s'\\]+", v):
        return v
    return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"


def make_dsn(**kw: object) -> str:
    """libpq keyword string from keyword arguments (None values dropped)."""
    return " ".join(f"{k}={_dsn_quote(str(v))}" for k, v in kw.items() if v is not None)


def parse_dsn(dsn: str) -> dict[str, str]:
    """Keyword dict from a libpq keyword string or a postgres:// URL."""
    try:
        from psycopg2.extensions import parse_dsn as _pd
        return dict(_pd(dsn))
    except ImportError:
        pass
    if "://" in dsn:
        return _parse_url(dsn)
    out: dict[str, str] = {}
    for m in re.finditer(r"(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", dsn):
        v = m.group(2)
        if v.startswith("'"):
            v = re.sub(r"\\(.)", r"\1", v[1:-1])
        out[m.group(1)] = v
    return out


def _parse_url(url: str) -> dict[str, str]:
    u = urlsplit(url)
    out: dict[str, str] = {}
    if u.hostname:
        out["host"] = unquote(u.hostname)
    if u.port:
        out["port"] = str(u.port)
    if u.username:
        out["user"] = unquote(u.username)
    if u.password:
        out["password"] = unquote(u.password)
    if u.path and u.path != "/":
        out["dbname"] = unquote(u.path[1:])
    for part in filter(None, u.query.split("&")):
        k, _, v = part.partition("=")
        out[unquote(k)] = unquote(v)
    return out


def url_to_dsn(url_or_dsn: str) -> str:
    """Keyword string for a URL (a keyword string is returned normalised)."""
    return make_dsn(**parse_dsn(url_or_dsn))


def dsn_to_url(dsn: str) -> str:
    """postgresql:// URL for a keyword string (a URL is returned as is)."""
    if "://" in dsn:
        return dsn
    kw = parse_dsn(dsn)
    host = kw.pop("host", "")
    port = kw.pop("port", "")
    user = kw.pop("user", "")
    password = kw.pop("password", "")
    dbname = kw.pop("dbname", "")
    query = ""
    if host.startswith("/"):          # unix socket directory goes in the query
        kw = {"host": host, **kw}
        host = ""
    auth = ""
    if user:
        auth = quote(user, safe="")
        if password:
            auth += ":" + quote(password, safe="")
        auth += "@"
    netloc = auth + host + (f":{port}" if port else "")
    if kw:
        query = "?" + "&".join(f"{quote(k)}={quote(v, safe='')}" for k, v in kw.items())
    return f"postgresql://{netloc}/{quote(dbname, safe='')}{query}"


def _connect(dsn: str, **kw):
    import psycopg2
    conn = psycopg2.connect(dsn, **kw)
    conn.autocommit = True
    return conn


def server_backends(dsn: str, app_name_like: str = "sharedpool%") -> int:
    """Client backends in pg_stat_activity whose application_name is LIKE the
    pattern (this checking connection excluded). Opens its own connection."""
    conn = _connect(dsn, application_name="devtools-probe")
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE backend_type = 'client backend'"
                "   AND pid <> pg_backend_pid()"
                "   AND application_name LIKE %s",
                (app_name_like,))
            return int(cur.fetchone()[0])
    finally:
        conn.close()


# --------------------------------------------------------------------------- cluster

class TempCluster:
    """A private PostgreSQL server in a directory of its own.

    ``TempCluster(directory=None, *, keep=False, port=None, settings=None,
    bindir=None, startup_timeout=60)``; ``directory=None`` makes a fresh temp dir.
    ``start()`` / ``stop()`` or use as a context manager. ``keep=True`` leaves the
    server running and the directory in place on ``__exit__`` (the CLI uses it).
    """

    def __init__(self, directory: str | None = None, *, keep: bool = False,
                 port: int | None = None, settings: dict | None = None,
                 bindir: str | None = None, startup_timeout: float = 60.0):
        self.bindir = bindir or find_bindir()
        self._given_dir = directory
        self.dir: str | None = os.path.abspath(directory) if directory else None
        self.keep = keep
        self.port: int | None = port
        self._fixed_port = port is not None
        self.host = "127.0.0.1"
        self.user = SERVER_USER
        self.dbname = "postgres"
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.startup_timeout = startup_timeout
        self.started = False
        self.start_seconds: float | None = None
        self._atexit = None

    # paths -----------------------------------------------------------------
    @property
    def datadir(self) -> str:
        return os.path.join(self._need_dir(), "data")

    @property
    def socket_dir(self) -> str:
        return self._need_dir()

    @property
    def logfile(self) -> str:
        return os.path.join(self._need_dir(), "server.log")

    def _need_dir(self) -> str:
        if not self.dir:
            raise ClusterError("cluster not created yet (call start())")
        return self.dir

    # connection strings -------------------------------------------------------
    @property
    def dsn(self) -> str:
        return make_dsn(host=self.host, port=self.port, user=self.user, dbname=self.dbname)

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.dbname}"

    def connect(self, **kw):
        """psycopg2 connection (autocommit) to the postgres database."""
        return _connect(self.dsn, **kw)

    # subprocesses -----------------------------------------------------------
    def _run(self, argv: list[str], what: str, timeout: float = 120.0,
             check: bool = True) -> subprocess.CompletedProcess:
        cmd = _as_server_user(argv)
        try:
            proc = subprocess.run(cmd, cwd=self.dir, env=_child_env(),
                                  stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise ClusterError(f"{what} timed out after {timeout}s: {' '.join(cmd)}\n"
                               f"{self.log_tail()}") from e
        if check and proc.returncode != 0:
            raise ClusterError(
                f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                f"--- stdout ---\n{proc.stdout.strip()}\n--- stderr ---\n{proc.stderr.strip()}\n"
                f"{self.log_tail()}")
        return proc

    def pg_ctl(self, *args: str, check: bool = True,
               timeout: float | None = None) -> subprocess.CompletedProcess:
        """Run ``pg_ctl -D datadir -l logfile -w -t T *args`` as the server user,
        e.g. ``pg_ctl("restart")``, ``pg_ctl("reload")``, ``pg_ctl("stop", "-m", "immediate")``.
        The log file option keeps the (re)started postmaster off our pipes."""
        t = timeout or self.startup_timeout
        argv = [os.path.join(self.bindir, "pg_ctl"), "-D", self.datadir,
                "-l", self.logfile, "-w", "-t", str(int(t)), *args]
        return self._run(argv, "pg_ctl " + " ".join(args), timeout=t + 30, check=check)

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.logfile, errors="replace") as f:
                tail = f.readlines()[-lines:]
        except OSError:
            return "(no server log)"
        return f"--- last {len(tail)} lines of {self.logfile} ---\n" + "".join(tail)

    # lifecycle --------------------------------------------------------------
    def is_running(self) -> bool:
        if not self.dir or not os.path.exists(os.path.join(self.datadir, "PG_VERSION")):
            return False
        return self.pg_ctl("status", check=False).returncode == 0

    def _write_conf(self) -> None:
        conf = {**self.settings, "port": self.port,
                "unix_socket_directories": self.socket_dir}
        path = os.path.join(self.datadir, CONF_FILE)
        with open(path, "w") as f:
            f.write("# written by devtools.pgcluster; rewritten on every start\n")
            for k, v in conf.items():
                f.write(f"{k} = {_conf_value(v)}\n")
        _chown_tree(path)

    def _save_state(self) -> None:
        state = {"port": self.port, "bindir": self.bindir, "host": self.host,
                 "user": self.user, "dbname": self.dbname, "url": self.url, "dsn": self.dsn}
        path = os.path.join(self.dir, STATE_FILE)
        with open(path, "w") as f:
            json.dump(state, f, indent=1)

    def _initdb(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        os.chmod(self.dir, 0o700)
        _chown_tree(self.dir)
        if _is_root():
            probe = subprocess.run(_as_server_user(["test", "-w", self.dir, "-a", "-x", self.dir]),
                                   env=_child_env(), cwd="/")
            if probe.returncode != 0:
                raise ClusterError(
                    f"user {SERVER_USER!r} cannot write {self.dir} (is a parent "
                    "directory closed to it?); pick a directory under /tmp")
        self._run([os.path.join(self.bindir, "initdb"), "-D", self.datadir,
                   "-A", "trust", "-U", SERVER_USER, "--no-sync", "-E", "UTF8",
                   "--locale=C", "--no-instructions"], "initdb")
        with open(os.path.join(self.datadir, "postgresql.conf"), "a") as f:
            f.write(f"\ninclude_if_exists = '{CONF_FILE}'\n")

    def start(self) -> "TempCluster":
        if self.started:
            return self
        t0 = time.monotonic()
        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix="sharedpool-pg-")
        self._atexit = atexit.register(self._atexit_stop)  # before initdb: a failed one is cleaned up too
        if not os.path.exists(os.path.join(self.datadir, "PG_VERSION")):
            self._initdb()
        elif self.port is None:
            with contextlib.suppress(OSError, ValueError, KeyError):
                with open(os.path.join(self.dir, STATE_FILE)) as f:
                    self.port = int(json.load(f)["port"])
        attempts = 1 if self._fixed_port else 5
        for attempt in range(attempts):
            if not self._fixed_port and (self.port is None or attempt > 0):
                self.port = free_port()
            self._write_conf()
            proc = self.pg_ctl("start", check=False)
            if proc.returncode == 0:
                break
            in_use = "already in use" in self.log_tail(10) or "could not bind" in self.log_tail(10)
            if not in_use or attempt == attempts - 1:
                raise ClusterError(
                    f"PostgreSQL did not start (pg_ctl exit {proc.returncode}, port {self.port})\n"
                    f"{proc.stdout.strip()}\n{proc.stderr.strip()}\n{self.log_tail()}")
        self._wait_ready(t0)
        self.started = True
        self._save_state()
        self.start_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self, t0: float) -> None:
        deadline = t0 + self.startup_timeout
        last: Exception | None = None
        while True:
            try:
                conn = _connect(self.dsn, connect_timeout=3)
            except ImportError:
                isready = os.path.join(self.bindir, "pg_isready")
                rc = subprocess.run([isready, "-q", "-h", self.host, "-p", str(self.port),
                                     "-U", self.user], env=_child_env()).returncode
                if rc == 0:
                    return
                last = ClusterError(f"pg_isready exit {rc}")
            except Exception as e:          # psycopg2.OperationalError while starting up
                last = e
            else:
                try:
                    with conn.cursor() as cur:
                        cur.execute("SELECT 1")
                finally:
                    conn.close()
                return
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"PostgreSQL on port {self.port} not ready after {self.startup_timeout}s: "
                    f"{last}\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, remove: bool = True) -> None:
        """Stop the server (fast mode) and, unless remove=False, delete its directory."""
        if self._atexit is not None:
            atexit.unregister(self._atexit_stop)
            self._atexit = None
        if self.dir and os.path.exists(os.path.join(self.datadir, "postmaster.pid")):
            proc = self.pg_ctl("stop", "-m", "fast", check=False)
            if proc.returncode != 0 and os.path.exists(os.path.join(self.datadir, "postmaster.pid")):
                self.pg_ctl("stop", "-m", "immediate", check=False)
        self.started = False
        if remove and self.dir and os.path.isdir(self.dir):
            shutil.rmtree(self.dir, ignore_errors=True)

    def _atexit_stop(self) -> None:
        with contextlib.suppress(Exception):
            self.stop(remove=not self.keep)

    def restart(self) -> None:
        self.pg_ctl("restart", "-m", "fast")
        self._wait_ready(time.monotonic())

    def __enter__(self) -> "TempCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.keep:
            if self._atexit is not None:
                atexit.unregister(self._atexit_stop)
                self._atexit = None
            return
        self.stop()

    def __repr__(self) -> str:
        return f"<TempCluster {self.url if self.port else '(not started)'} dir={self.dir}>"


# --------------------------------------------------------------------------- CLI

def _looks_like_cluster_dir(d: str) -> bool:
    return (os.path.exists(os.path.join(d, STATE_FILE))
            or os.path.exists(os.path.join(d, "data", "PG_VERSION")))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m devtools.pgcluster",
        description="A throwaway PostgreSQL server in a directory of its own "
                    "(trust auth, user postgres, 127.0.0.1, fsync off, max_connections=300).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("start", help="initdb DIR if needed, start the server, print its URL "
                                     "and leave it running (idempotent)")
    p.add_argument("--dir", required=True, help="cluster directory (created; data in DIR/data)")
    p.add_argument("--port", type=int, help="TCP port (default: a free one)")
    p.add_argument("--dsn", action="store_true",
                   help="print the libpq keyword string instead of the URL")
    p.add_argument("-c", dest="settings", action="append", default=[], metavar="NAME=VALUE",
                   help="extra server setting, repeatable")
    p = sub.add_parser("url", help="print the URL of the server started in DIR")
    p.add_argument("--dir", required=True)
    p.add_argument("--dsn", action="store_true", help="print the libpq keyword string")
    p = sub.add_parser("stop", help="stop the server in DIR (fast mode) and remove DIR")
    p.add_argument("--dir", required=True)
    p.add_argument("--keep-dir", action="store_true", help="stop only; keep DIR")
    args = ap.parse_args(argv)
    d = os.path.abspath(args.dir)

    try:
        if args.cmd == "start":
            if os.path.isdir(d) and os.listdir(d) and not _looks_like_cluster_dir(d):
                ap.error(f"{d} exists and is not a cluster directory")
            settings = {}
            for s in args.settings:
                k, sep, v = s.partition("=")
                if not sep:
                    ap.error(f"-c wants NAME=VALUE, got {s!r}")
                settings[k.strip()] = v.strip()
            c = TempCluster(d, keep=True, port=args.port, settings=settings)
            if c.is_running():
                # already up: report what it runs on
                with open(os.path.join(d, STATE_FILE)) as f:
                    state = json.load(f)
                print(state["dsn"] if args.dsn else state["url"])
                return 0
            with c:
                print(c.dsn if args.dsn else c.url)
            return 0
        if args.cmd == "url":
            try:
                with open(os.path.join(d, STATE_FILE)) as f:
                    state = json.load(f)
            except OSError:
                print(f"no cluster in {d}", file=sys.stderr)
                return 1
            print(state["dsn"] if args.dsn else state["url"])
            return 0
        if args.cmd == "stop":
            if not os.path.isdir(d):
                print(f"no cluster in {d} (nothing to do)", file=sys.stderr)
                return 0
            if not _looks_like_cluster_dir(d):
                print(f"{d} is not a cluster directory; not touching it", file=sys.stderr)
                return 1
            bindir = None
            with contextlib.suppress(OSError, ValueError, KeyError):
                with open(os.path.join(d, STATE_FILE)) as f:
                    bindir = json.load(f)["bindir"]
            c = TempCluster(d, bindir=bindir if bindir and os.path.isdir(bindir) else None)
            c.stop(remove=not args.keep_dir)
            return 0
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
