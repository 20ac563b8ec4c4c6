"""The ``sharedpool`` command: run the coordinator, show status, reload, clean up."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from sharedpool import channel
from sharedpool.config import SETTINGS, PoolConfig, integer, seconds
from sharedpool.errors import SharedPoolError
from sharedpool.ledger import DEFAULT_SLOTS, Ledger, unlink

from . import cluster
from .daemon import Coordinator, Options
from .status import format_table, snapshot_dict


def _pool_name(value: str) -> str:
    try:
        return PoolConfig(name=value, pool_size=1).name
    except SharedPoolError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("NAME", "--name")) from None


def _setting(convert: Callable[[str, Any], Any], option: str) -> Callable[[str], Any]:
    """Turn a config validator into an argparse type for ``option``."""

    def parse(value: str) -> Any:
        try:
            return convert(option, value)
        except SharedPoolError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


_SECONDS = seconds(0.0, optional=False)
_RECLAIM_GRACE = PoolConfig.__dataclass_fields__["reclaim_grace"].default

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sharedpool",
        description="Per-host PostgreSQL connection budget shared by all worker processes.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "coordinator",
        aliases=["run"],
        help="run the coordinator in the foreground (logs to stderr)",
        description="Create or adopt the pool's ledger and semaphore, return the permits of dead "
        "workers, audit drift, and keep a heartbeat. SIGTERM/SIGINT stop it; SIGHUP reconciles.",
    )
    run.add_argument("--name", type=_pool_name, default="default", help="pool name (default: %(default)s)")
    run.add_argument("--budget", type=_setting(SETTINGS["POOL_SIZE"][0], "--budget"), required=True, help="server connections allowed for all workers of the pool on this host")
    run.add_argument("--slots", type=_setting(integer(1, 65536), "--slots"), default=DEFAULT_SLOTS, help="worker processes the ledger can hold (default: %(default)s)")
    run.add_argument("--group", help="OS group sharing the pool: objects get mode 0660 instead of 0600")
    run.add_argument("--reclaim-grace", type=_setting(SETTINGS["RECLAIM_GRACE"][0], "--reclaim-grace"), default=_RECLAIM_GRACE, help="seconds to wait before returning a dead worker's permits when its backends cannot be seen on this host (default: %(default)s)")
    run.add_argument("--remove-on-exit", action="store_true", help="remove the ledger and semaphore when stopping (default: leave them for running workers)")
    run.add_argument("--exit-when-idle", type=_setting(_SECONDS, "--exit-when-idle"), metavar="SECONDS", help="exit once no worker has been registered for SECONDS")
    run.add_argument("--exit-with", type=_setting(integer(1, 2**22), "--exit-with"), metavar="PID", help="exit (after its workers are gone) when process PID exits")
    run.add_argument("-v", "--verbose", action="store_true", help="also log every worker registration (DEBUG)")
    cluster.add_coordinator_options(run)

    status = sub.add_parser("status", help="show budget, free permits, workers, counters, heartbeat")
    status.add_argument("--name", type=_pool_name, default="default", help="pool name (default: %(default)s)")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument("--watch", type=_setting(_SECONDS, "--watch"), metavar="SECONDS", help="repeat every SECONDS until interrupted")
    cluster.add_status_options(status)
    status.add_argument("--rate-window", type=_setting(_SECONDS, "--rate-window"), default=1.0, metavar="SECONDS",
                        help="measure rates (connections opened per second, sheds, waits) over SECONDS before the "
                        "first report; 0: no rates (default: %(default)s)")

    metrics = sub.add_parser("metrics", help="serve Prometheus metrics of one or more pools over HTTP")
    metrics.add_argument("--name", type=_pool_name, action="append", required=True, help="pool name (repeat for several)")
    metrics.add_argument("--port", type=_setting(integer(1, 65535), "--port"), default=9187, help="TCP port (default: %(default)s)")
    metrics.add_argument("--addr", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    metrics.add_argument("--cluster-dsn", metavar="DSN", help="also export the hosts sharing each pool's CLUSTER_BUDGET, read from this server")

    reload = sub.add_parser("reload", help="change the budget of a running pool")
    reload.add_argument("--name", type=_pool_name, default="default", help="pool name (default: %(default)s)")
    reload.add_argument("--budget", type=_setting(SETTINGS["POOL_SIZE"][0], "--budget"), required=True, help="the new budget")

    cluster.register(sub, _pool_name)

    cleanup = sub.add_parser("cleanup", help="remove a pool's shared memory and semaphore")
    cleanup.add_argument("--name", type=_pool_name, required=True, help="pool name")
    cleanup.add_argument("--force", action="store_true", help="remove even if live workers are registered")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except SharedPoolError as exc:
        print(f"sharedpool {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def cmd_coordinator(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    coordinator = Coordinator(
        Options(
            name=args.name,
            budget=args.budget,
            nslots=args.slots,
            group=args.group,
            reclaim_grace=args.reclaim_grace,
            remove_on_exit=args.remove_on_exit,
            exit_when_idle=args.exit_when_idle,
            exit_with_pid=args.exit_with,
        )
    )
    agent = cluster.make_agent(args, lambda: coordinator.running)
    coordinator.start()
    cluster.start_agent(agent, coordinator.ledger)
    try:
        return coordinator.run()
    finally:
        if agent is not None:
            agent.stop()


def cmd_status(args: argparse.Namespace) -> int:
    if args.cluster:
        return cluster.cmd_status(args)
    ledger = Ledger.attach(args.name)
    try:
        previous, taken = None, time.monotonic()
        if args.rate_window:
            previous = ledger.snapshot()
            time.sleep(args.rate_window)
        while True:
            now = time.monotonic()
            snap = ledger.snapshot()
            status = snapshot_dict(snap, previous=previous, elapsed=now - taken)
            print(json.dumps(status) if args.json else format_table(status), flush=True)
            if args.watch is None:
                return 0
            previous, taken = snap, now
            time.sleep(args.watch)
            if not args.json:
                print()
    finally:
        ledger.close()


def cmd_metrics(args: argparse.Namespace) -> int:
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        print("sharedpool metrics: needs prometheus-client (pip install 'sharedpool[metrics]')", file=sys.stderr)
        return 1
    from .metrics import LedgerCollector

    ledgers = [Ledger.attach(name) for name in args.name]
    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # before the server thread starts: it inherits the mask
    registry = CollectorRegistry()
    registry.register(LedgerCollector(ledgers))
    if args.cluster_dsn:
        registry.register(cluster.collector(args.cluster_dsn, args.name))
    start_http_server(args.port, addr=args.addr, registry=registry)
    print(f"serving metrics of {', '.join(args.name)} on http://{args.addr}:{args.port}/metrics", file=sys.stderr, flush=True)
    signal.sigwait(stop)
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    ledger = Ledger.attach(args.name)
    try:
        epoch = ledger.header.epoch
        if not channel.send(channel.coordinator_address(args.name), f"budget {args.budget}".encode()):
            print(f"sharedpool reload: no coordinator is running for pool {args.name!r}", file=sys.stderr)
            return 1
        deadline = time.monotonic() + 5.0
        while ledger.header.epoch == epoch and time.monotonic() < deadline:
            time.sleep(0.01)
        if ledger.header.budget != args.budget:
            print(f"sharedpool reload: the coordinator did not apply budget {args.budget} within 5 s", file=sys.stderr)
            return 1
        print(f"pool {args.name!r}: budget {args.budget}")
        return 0
    finally:
        ledger.close()


def cmd_cleanup(args: argparse.Namespace) -> int:
    if Ledger.exists(args.name) and not args.force:
        try:
            ledger = Ledger.attach(args.name)
        except SharedPoolError:
            ledger = None  # foreign or corrupt: removing it is the point
        if ledger is not None:
            try:
                live = [w["pid"] for w in snapshot_dict(ledger.snapshot())["workers"] if w["alive"]]
            finally:
                ledger.close()
            if live:
                print(
                    f"sharedpool cleanup: pool {args.name!r} has {len(live)} live worker(s) "
                    f"({', '.join(map(str, live[:8]))}); use --force to remove anyway",
                    file=sys.stderr,
                )
                return 1
    removed = unlink(args.name)
    print("\n".join(f"removed {path}" for path in removed) or f"nothing to remove for pool {args.name!r}")
    return 0


COMMANDS = {
    "coordinator": cmd_coordinator,
    "run": cmd_coordinator,
    "status": cmd_status,
    "reload": cmd_reload,
    "cleanup": cmd_cleanup,
    "metrics": cmd_metrics,
    "cluster": cluster.cmd_cluster,
}
