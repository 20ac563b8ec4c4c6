"""Simulated app hosts for the cluster-budget tests: namespaces, a server they reach, and the hosts' processes.

Runs in the pytest process (``Network``, ``HostServer``, ``Host``) and,
as a script, inside each simulated host (``host`` and ``worker`` commands).
A host is ``ip netns exec NS unshare --mount --pid --fork --mount-proc``:
its own network namespace, reached through a veth pair whose addresses
(10.231.N.1/30 outside, 10.231.N.2/30 inside) exist only while the test
runs; its own PID namespace, so SIGKILL of its PID 1 kills every process of
the host at once; and its own tmpfs on /dev/shm, so its ledger and semaphore
are its own. Inside, the host process starts a coordinator (with
``--cluster-budget`` unless ``agent=False``) and WORKERS workers, each a loop of short queries that
writes its counters to ``OUT/<host>-w<K>.json``; a file ``OUT/<host>.idle``
makes the workers pause.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PYTHON = sys.executable
SUBNET = "10.231"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class Network:
    """Network namespaces with a veth pair each; everything removed by ``close`` (idempotent)."""

    def __init__(self, count: int) -> None:
        self.tag = secrets.token_hex(2)
        self.hosts: list[tuple[str, str, str, str]] = []  # (netns, outer veth, outer address, inner address)
        try:
            for n in range(1, count + 1):
                ns, outer, inner = f"sp15-{self.tag}-{n}", f"sp{self.tag}h{n}o", f"sp{self.tag}h{n}i"
                self.hosts.append((ns, outer, f"{SUBNET}.{n}.1", f"{SUBNET}.{n}.2"))
                _ip("netns", "add", ns)
                _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
                _ip("link", "set", inner, "netns", ns)
                _ip("addr", "add", f"{SUBNET}.{n}.1/30", "dev", outer)
                _ip("link", "set", outer, "up")
                _ip("-n", ns, "addr", "add", f"{SUBNET}.{n}.2/30", "dev", inner)
                _ip("-n", ns, "link", "set", inner, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def cut(self, n: int) -> None:
        """Drop every packet between host ``n`` and the server (both directions), keeping the sockets."""
        _ip("link", "set", self.hosts[n - 1][1], "down")

    def heal(self, n: int) -> None:
        _ip("link", "set", self.hosts[n - 1][1], "up")

    def close(self) -> None:
        for ns, outer, _, _ in self.hosts:
            _ip("link", "del", outer, check=False)  # takes its peer along
            _ip("netns", "del", ns, check=False)
        self.hosts = []


class HostServer:
    """A throwaway PostgreSQL listening on loopback and on the outer ends of the veths."""

    def __init__(self, network: Network) -> None:
        from devtools.pgcluster import TempCluster

        addresses = ",".join(["127.0.0.1", *(outer_addr for _, _, outer_addr, _ in network.hosts)])
        self.cluster = TempCluster(settings={"listen_addresses": addresses, "max_connections": 100})
        self.cluster.start()
        try:
            with open(os.path.join(self.cluster.datadir, "pg_hba.conf"), "a") as f:
                f.write(f"\nhost all all {SUBNET}.0.0/16 trust\n")
            self.cluster.pg_ctl("reload")
        except BaseException:
            self.cluster.stop()
            raise
        self.port = self.cluster.port

    def dsn(self, address: str = "127.0.0.1", user: str = "postgres") -> str:
        return f"host={address} port={self.port} user={user} dbname=postgres"

    def close(self) -> None:
        self.cluster.stop()


class Host:
    """One simulated host: coordinator (with the cluster agent) plus ``workers`` workers, in its namespaces."""

    def __init__(self, network: Network, server: HostServer, n: int, *, name: str, role: str, pool_size: int,
                 cluster_budget: int | None, workers: int, out: str, query_s: float = 0.05, timeout: float = 5.0,
                 agent: bool = True) -> None:
        ns, _, outer_addr, _ = network.hosts[n - 1]
        self.host = f"h{n}"
        self.out = out
        spec = {
            "host": self.host, "name": name, "pool_size": pool_size, "cluster_budget": cluster_budget,
            "workers": workers, "out": out, "query_s": query_s, "timeout": timeout, "agent": agent,
            "admin_dsn": server.dsn(outer_addr), "worker_dsn": server.dsn(outer_addr, user=role),
        }
        argv = ["ip", "netns", "exec", ns, "unshare", "--mount", "--pid", "--fork", "--mount-proc", "--",
                PYTHON, os.path.abspath(__file__), "host", json.dumps(spec)]
        self.log = open(os.path.join(out, f"{self.host}.log"), "w")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=self.log, stderr=subprocess.STDOUT,
                                     text=True, env={**os.environ, "PYTHONPATH": ROOT}, cwd=ROOT)

    def init_pid(self) -> int:
        """PID (outside) of the host's PID 1, the child ``unshare --fork`` started."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                    children = f.read().split()
                if children:
                    return int(children[0])
            time.sleep(0.01)
        raise AssertionError(f"host {self.host}: no process inside the namespace")

    def command(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def set_idle(self, idle: bool) -> None:
        flag = os.path.join(self.out, f"{self.host}.idle")
        if idle:
            open(flag, "w").close()
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(flag)

    def served(self) -> int:
        return sum(c.get("served", 0) for c in self.counters())

    def counters(self) -> list[dict]:
        found = []
        for entry in sorted(os.listdir(self.out)):
            if entry.startswith(f"{self.host}-w") and entry.endswith(".json"):
                with contextlib.suppress(OSError, ValueError):
                    with open(os.path.join(self.out, entry)) as f:
                        found.append(json.load(f))
        return found

    def kill(self) -> None:
        """SIGKILL the host's PID 1: the kernel kills every process of its PID namespace."""
        with contextlib.suppress(ProcessLookupError, AssertionError):
            os.kill(self.init_pid(), signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def read_log(self) -> str:
        with open(os.path.join(self.out, f"{self.host}.log"), errors="replace") as f:
            return f.read()


# -- inside a simulated host ---------------------------------------------------------------


def host_main(spec: dict) -> None:
    """PID 1 of a host: private /dev/shm, a coordinator, workers; commands on stdin."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", "/dev/shm"], check=True)
    env = {**os.environ, "PYTHONPATH": ROOT}

    def coordinator() -> subprocess.Popen:
        argv = [PYTHON, "-m", "sharedpool.coordinator", "coordinator", "--name", spec["name"], "--budget", str(spec["pool_size"])]
        if spec["cluster_budget"] is not None and spec["agent"]:
            argv += ["--cluster-budget", str(spec["cluster_budget"]), "--dsn", spec["admin_dsn"], "--cluster-host", spec["host"]]
        return subprocess.Popen(argv, env=env)

    coord = coordinator()
    from sharedpool.embedded import coordinator_ready

    deadline = time.monotonic() + 20
    while not coordinator_ready(spec["name"]):
        if coord.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"host {spec['host']}: coordinator did not start ({coord.returncode})")
        time.sleep(0.02)
    workers = [subprocess.Popen([PYTHON, os.path.abspath(__file__), "worker", json.dumps({**spec, "index": k})], env=env)
               for k in range(spec["workers"])]
    print(f"host {spec['host']}: ready", flush=True)
    for line in sys.stdin:
        verb = line.strip()
        if verb == "coordinator-kill":
            coord.kill()
            coord.wait()
        elif verb == "coordinator-start":
            coord = coordinator()
        elif verb == "add-workers":
            workers += [subprocess.Popen([PYTHON, os.path.abspath(__file__), "worker",
                                          json.dumps({**spec, "index": len(workers) + k})], env=env)
                        for k in range(spec["workers"])]
        print(f"host {spec['host']}: {verb} done", flush=True)
    for proc in [*workers, coord]:
        proc.terminate()
    for proc in [*workers, coord]:
        proc.wait()


def worker_main(spec: dict) -> None:
    """A worker: short queries through the pool, counters in a file every 0.2 s."""
    import psycopg2

    from sharedpool import LocalPool, PoolConfig

    config = PoolConfig(name=spec["name"], pool_size=spec["pool_size"], cluster_budget=spec["cluster_budget"],
                        max_per_process=1, autostart=False, timeout=spec["timeout"])
    pool = LocalPool(config, spec["worker_dsn"])
    path = os.path.join(spec["out"], f"{spec['host']}-w{spec['index']}.json")
    idle_flag = os.path.join(spec["out"], f"{spec['host']}.idle")
    counts = {"served": 0, "errors": 0, "last_error": ""}
    written = 0.0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        if time.monotonic() - written > 0.2:
            with open(path + ".tmp", "w") as f:
                json.dump(counts, f)
            os.replace(path + ".tmp", path)
            written = time.monotonic()
        if os.path.exists(idle_flag):
            time.sleep(0.05)
            continue
        try:
            with pool.connection() as conn, conn.cursor() as cur:
                cur.execute("SELECT pg_sleep(%s)", (spec["query_s"],))
            counts["served"] += 1
        except (psycopg2.Error, OSError) as exc:
            counts["errors"] += 1
            counts["last_error"] = str(exc)[:300]
            time.sleep(0.05)


if __name__ == "__main__":
    {"host": host_main, "worker": worker_main}[sys.argv[1]](json.loads(sys.argv[2]))
