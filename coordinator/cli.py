"""The ``sharedpool`` command: run the coordinator, show status, reload, clean up."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from sharedpool import channel
from sharedpool.config import ENV_PREFIX, SETTINGS, PoolConfig, integer, seconds
from sharedpool.errors import SharedPoolError
from sharedpool.ledger import DEFAULT_SLOTS, Ledger
from sharedpool.names import CONTROL_SOCKET, PoolNames

from .daemon import Coordinator, Options
from .lifecycle import remove_pool
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

def _group_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--group", type=_setting(SETTINGS["GROUP"][0], "--group"),
                        default=os.environ.get(f"{ENV_PREFIX}GROUP") or None,
                        help=f"OS group sharing the pool (default: ${ENV_PREFIX}GROUP, else none)")


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
    run.add_argument("--group", type=_setting(SETTINGS["GROUP"][0], "--group"),
                     default=os.environ.get(f"{ENV_PREFIX}GROUP") or None,
                     help=f"OS group sharing the pool: objects get mode 0660 and the directory 2770 instead of "
                     f"0600/0700 (default: ${ENV_PREFIX}GROUP, else none)")
    run.add_argument("--reclaim-grace", type=_setting(SETTINGS["RECLAIM_GRACE"][0], "--reclaim-grace"), default=_RECLAIM_GRACE, help="seconds to wait before returning a dead worker's permits when its backends cannot be seen on this host (default: %(default)s)")
    run.add_argument("--remove-on-exit", action="store_true", help="remove the ledger and semaphore when stopping (default: leave them for running workers)")
    run.add_argument("--exit-when-idle", type=_setting(_SECONDS, "--exit-when-idle"), metavar="SECONDS", help="exit once no worker has been registered for SECONDS")
    run.add_argument("--exit-with", type=_setting(integer(1, 2**22), "--exit-with"), metavar="PID", help="exit (after its workers are gone) when process PID exits")
    run.add_argument("-v", "--verbose", action="store_true", help="also log every worker registration (DEBUG)")

    status = sub.add_parser("status", help="show budget, free permits, workers, counters, heartbeat")
    status.add_argument("--name", type=_pool_name, default="default", help="pool name (default: %(default)s)")
    _group_option(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument("--watch", type=_setting(_SECONDS, "--watch"), metavar="SECONDS", help="repeat every SECONDS until interrupted")
    status.add_argument("--rate-window", type=_setting(_SECONDS, "--rate-window"), default=1.0, metavar="SECONDS",
                        help="measure rates (connections opened per second, sheds, waits) over SECONDS before the "
                        "first report; 0: no rates (default: %(default)s)")

    metrics = sub.add_parser("metrics", help="serve Prometheus metrics of one or more pools over HTTP")
    metrics.add_argument("--name", type=_pool_name, action="append", required=True, help="pool name (repeat for several)")
    metrics.add_argument("--port", type=_setting(integer(1, 65535), "--port"), default=9187, help="TCP port (default: %(default)s)")
    metrics.add_argument("--addr", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    _group_option(metrics)

    reload = sub.add_parser(
        "reload", help="change the budget of a running pool",
        description="Ask the coordinator for a new budget. Raising takes effect at once; a cut retires "
        "permits as connections come back (idle ones are closed at once, busy ones when returned): the "
        "command waits until the pool is within the new budget and says who still holds if it is not.",
    )
    reload.add_argument("--name", type=_pool_name, default="default", help="pool name (default: %(default)s)")
    reload.add_argument("--budget", type=_setting(SETTINGS["POOL_SIZE"][0], "--budget"), required=True, help="the new budget")
    reload.add_argument("--wait", type=_setting(_SECONDS, "--wait"), default=30.0, metavar="SECONDS",
                        help="how long to wait for a cut to converge (default: %(default)s)")
    _group_option(reload)

    cleanup = sub.add_parser(
        "cleanup", help="remove a pool's directory, ledger and semaphore",
        description="Remove a pool nobody uses any more (also a corrupt or foreign one). Refuses while a "
        "coordinator runs or a live worker is registered, naming them.",
    )
    cleanup.add_argument("--name", type=_pool_name, required=True, help="pool name")
    cleanup.add_argument("--force", action="store_true",
                         help="remove even while live workers are registered: they keep their connections "
                         "outside any budget until they exit (never while a coordinator runs)")
    _group_option(cleanup)
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
    coordinator.start()
    return coordinator.run()


def cmd_status(args: argparse.Namespace) -> int:
    ledger = Ledger.attach(args.name, group=args.group, mapped=False)
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

    ledgers = [Ledger.attach(name, group=args.group, mapped=False) for name in args.name]
    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # before the server thread starts: it inherits the mask
    registry = CollectorRegistry()
    registry.register(LedgerCollector(ledgers))
    start_http_server(args.port, addr=args.addr, registry=registry)
    print(f"serving metrics of {', '.join(args.name)} on http://{args.addr}:{args.port}/metrics", file=sys.stderr, flush=True)
    signal.sigwait(stop)
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    ledger = Ledger.attach(args.name, group=args.group, mapped=False)
    try:
        if not ledger.coordinator_alive():
            print(f"sharedpool reload: no coordinator is running for pool {args.name!r}", file=sys.stderr)
            return 1
        if not channel.send(PoolNames(args.name), CONTROL_SOCKET, f"budget {args.budget}".encode(), wait=5.0):
            print(f"sharedpool reload: pool {args.name!r}: the coordinator (pid {ledger.header.coordinator_pid}) "
                  f"did not take the request within 5 s (is something flooding {PoolNames(args.name).path(CONTROL_SOCKET)}?)",
                  file=sys.stderr)
            return 1
        started = time.monotonic()
        header = ledger.header
        while header.budget != args.budget:
            if time.monotonic() - started > 5.0:
                print(f"sharedpool reload: the coordinator did not apply budget {args.budget} within 5 s",
                      file=sys.stderr)
                return 1
            time.sleep(0.01)
        next_report = started + 1.0
        while header.retire_debt:
            now = time.monotonic()
            if now - started > args.wait:
                snap = ledger.snapshot()
                print(f"sharedpool reload: pool {args.name!r}: budget {args.budget} applied, but "
                      f"{snap.retire_debt} permit(s) above it are still held after {args.wait:.0f} s: "
                      f"{snap.holders_text()}", file=sys.stderr)
                return 1
            if now >= next_report:
                next_report = now + 1.0
                print(f"pool {args.name!r}: retiring, {header.retire_debt} permit(s) above budget {args.budget} "
                      "still held", file=sys.stderr, flush=True)
            time.sleep(0.01)
        print(f"pool {args.name!r}: budget {args.budget} (within it after {time.monotonic() - started:.2f} s)")
        return 0
    finally:
        ledger.close()


def cmd_cleanup(args: argparse.Namespace) -> int:
    removed, warnings = remove_pool(PoolNames(args.name), args.group, force=args.force)
    for warning in warnings:
        print(f"sharedpool cleanup: warning: {warning}", file=sys.stderr)
    print("\n".join(f"removed {path}" for path in removed) or f"nothing to remove for pool {args.name!r}")
    return 0


COMMANDS = {
    "coordinator": cmd_coordinator,
    "run": cmd_coordinator,
    "status": cmd_status,
    "reload": cmd_reload,
    "cleanup": cmd_cleanup,
    "metrics": cmd_metrics,
}
