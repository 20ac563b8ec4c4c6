"""A private PgBouncer in front of one database, for the bench and the demo.

Runs in the harness process. ``PgBouncer(host, port, user, password, dbname,
pool_size, workdir, pool_mode="transaction")`` writes its own ini into
``workdir``, listens on a free loopback port (``.port``) and serves
``dbname`` with at most ``pool_size`` server connections
(``default_pool_size = max_db_connections``); ``stop()`` ends its process
group. As root it runs as the ``postgres`` OS user (PgBouncer refuses root).
``ensure_installed()`` installs the Debian package when it is missing, as
``devtools/system-deps.sh`` does for PostgreSQL.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time

from devtools.pgcluster import free_port

__all__ = ["PgBouncer", "find_pgbouncer", "ensure_installed"]


def find_pgbouncer() -> str | None:
    """Return the pgbouncer executable, or None."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    return "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None


def ensure_installed() -> str:
    """Return the pgbouncer executable, installing it with apt-get when missing (root only)."""
    found = find_pgbouncer()
    if found:
        return found
    if os.geteuid() != 0:
        raise RuntimeError("pgbouncer is not installed: apt-get install pgbouncer (or run as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "pgbouncer"], check=True, env=env)
    # the package starts a system service on 6432; ours run on their own ports and stop with us
    with contextlib.suppress(OSError):  # no service manager in a container: nothing was started
        subprocess.run(["service", "pgbouncer", "stop"], capture_output=True, env=env)
    found = find_pgbouncer()
    if not found:
        raise RuntimeError("apt-get install pgbouncer did not provide a pgbouncer executable")
    return found


class PgBouncer:
    """One PgBouncer process of our own (its own process group, config and log)."""

    def __init__(self, host: str, port: int, user: str, password: str, dbname: str, pool_size: int,
                 workdir: str, pool_mode: str = "transaction") -> None:
        self.port = free_port()
        self.pool_mode = pool_mode
        self.dir = os.path.join(workdir, "pgbouncer")
        os.makedirs(self.dir, exist_ok=True)
        self.ini = os.path.join(self.dir, "pgbouncer.ini")
        self.logfile = os.path.join(self.dir, "pgbouncer.log")
        pw = f" password={password}" if password else ""
        self.conf = f"""[databases]
{dbname} = host={host} port={port} dbname={dbname} user={user}{pw}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = any
pool_mode = {pool_mode}
default_pool_size = {pool_size}
max_db_connections = {pool_size}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = 2000
ignore_startup_parameters = extra_float_digits,options
logfile = {self.logfile}
pidfile =
log_connections = 0
log_disconnections = 0
"""
        with open(self.ini, "w") as f:
            f.write(self.conf)
        executable = find_pgbouncer()
        if executable is None:
            raise RuntimeError("pgbouncer is not installed")
        self.argv = [executable, self.ini]
        kw: dict = {}
        if os.geteuid() == 0:  # pgbouncer refuses to run as root
            import pwd

            pwent = pwd.getpwnam("postgres")
            for path in (workdir, self.dir, self.ini):
                os.chown(path, pwent.pw_uid, pwent.pw_gid)
            kw = dict(user=pwent.pw_uid, group=pwent.pw_gid, extra_groups=[])
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True, **kw)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pgbouncer did not start:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, n: int = 20) -> str:
        with contextlib.suppress(OSError):
            with open(self.logfile, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        return "(no log)"

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM (immediate shutdown), then SIGKILL the whole group."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
