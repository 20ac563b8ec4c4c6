"""uWSGI glue: a postfork hook for the workers and the coordinator as an attached daemon.

The ini snippet (one ``attach-daemon2`` line per pool; ``exec`` so that the
daemon is the master's direct child and can follow it)::

    [uwsgi]
    master = true
    processes = 8
    enable-threads = true          ; sharedpool's shed listener is a thread
    env = SHAREDPOOL_NAME=myapp
    env = SHAREDPOOL_POOL_SIZE=4   ; or DJANGO_SETTINGS_MODULE with the sharedpool ENGINE
    import = sharedpool.integrations.uwsgi
    attach-daemon2 = cmd=exec /srv/venv/bin/python -m sharedpool.integrations.uwsgi,stopsignal=15
    module = myproject.wsgi:application
    ; harakiri, max-requests, touch-chain-reload, lazy-apps: all fine

``import =`` (or ``import sharedpool.integrations.uwsgi`` in your wsgi.py)
registers the postfork hook through ``uwsgidecorators.postfork``, which chains
with your own ``@postfork`` functions. Where each part runs:

postfork hook    worker, right after uWSGI forks it (in C, so Python's
                 ``os.register_at_fork`` hooks did not run): forget the master's
                 connections without I/O, then wait (at most START_WAIT s) until the
                 attached coordinator has created the ledger, so a worker's first
                 request never starts a second, embedded one.
daemon           ``python -m sharedpool.integrations.uwsgi [--name NAME]``: reads the
                 same settings as the workers and execs ``sharedpool coordinator
                 --exit-with <master pid> --remove-on-exit``; if a coordinator already
                 runs for the pool (systemd), it waits for that one to go instead.
worker exit      Python's atexit (uWSGI runs it in workers) closes the pools.

A worker killed by harakiri or SIGKILL is reclaimed by the coordinator's
pidfd watch (no master hook is needed). Chain reload and max-requests replace
workers one at a time; each new one is forked from the master and forgets
what the master held.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from sharedpool import forksafe
from sharedpool.config import PoolConfig

from . import servers

log = logging.getLogger("sharedpool.integrations.uwsgi")

START_WAIT = 10.0  # seconds a new worker waits for the attached coordinator's ledger
DAEMON_MODULE = "sharedpool.integrations.uwsgi"

try:
    import uwsgi  # only inside uWSGI
except ImportError:
    uwsgi = None


def postfork() -> None:
    """Prepare a new worker. Runs in the worker right after uWSGI forked it."""
    forksafe.after_fork_in_child()
    if _daemon_configured():
        for config in servers.pool_configs():
            _wait_for_ledger(config)


def _daemon_configured() -> bool:
    """Tell whether this uWSGI runs our attached daemon (then the workers wait for its ledger)."""
    if uwsgi is None:
        return False
    for key in ("attach-daemon", "attach-daemon2", "smart-attach-daemon", "smart-attach-daemon2"):
        values = uwsgi.opt.get(key)
        if values is None:
            continue
        for value in values if isinstance(values, list) else [values]:
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            if DAEMON_MODULE in text or "sharedpool coordinator" in text:
                return True
    return False


def _wait_for_ledger(config: PoolConfig) -> None:
    from sharedpool.ledger import Ledger

    deadline = time.monotonic() + START_WAIT
    while not Ledger.exists(config.name):
        if time.monotonic() > deadline:
            log.warning("sharedpool: pool %r: the attached coordinator has not started within %.0f s",
                        config.name, START_WAIT)
            return
        time.sleep(0.02)


def _register() -> None:
    try:
        from uwsgidecorators import postfork as chain_postfork
    except ImportError:
        previous = getattr(uwsgi, "post_fork_hook", None)

        def hook() -> None:
            postfork()
            if previous is not None:
                previous()

        uwsgi.post_fork_hook = hook
    else:
        chain_postfork(postfork)


if uwsgi is not None and not getattr(uwsgi, "_sharedpool_postfork", False):
    uwsgi._sharedpool_postfork = True
    _register()


# -- the attached daemon ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run as uWSGI's attached daemon: become the pool's coordinator, tied to the master."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {DAEMON_MODULE}",
        description="Run the pool's coordinator as a uWSGI attached daemon (settings as the workers read them).",
    )
    parser.add_argument("--name", help="the pool, when the settings declare several")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
    configs = servers.pool_configs()
    if args.name:
        configs = [c for c in configs if c.name == args.name]
    if len(configs) != 1:
        names = ", ".join(c.name for c in servers.pool_configs()) or "none"
        print(f"{parser.prog}: need exactly one pool (found: {names}); set SHAREDPOOL_POOL_SIZE "
              "or DJANGO_SETTINGS_MODULE, and --name when there are several", file=sys.stderr)
        return 2
    config = configs[0]
    master = os.getppid()
    while (pid := servers.running_coordinator(config)) is not None:
        # another coordinator (systemd, or one started on demand) serves the pool: stand by
        log.info("pool %r: coordinator pid %d already runs; standing by", config.name, pid)
        while os.path.exists(f"/proc/{pid}") and os.getppid() == master:
            time.sleep(1.0)
        if os.getppid() != master:
            return 0
    from sharedpool.embedded import coordinator_command

    command = coordinator_command(config, "--exit-with", str(master), "--remove-on-exit")
    os.execv(command[0], command)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
