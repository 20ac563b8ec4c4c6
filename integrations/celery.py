"""Wire a Celery app's prefork workers to sharedpool with one call: ``setup(app)``.

A worker with ``--concurrency 16`` is 16 child processes with their own
connections, the same problem as gunicorn's workers::

    from celery import Celery
    from sharedpool.integrations.celery import setup

    app = Celery("tasks", broker="redis://localhost:6379/0")
    setup(app)  # or setup(app, PoolConfig(...), ...)

The pools come from the arguments, else from Django settings when
DJANGO_SETTINGS_MODULE is set (every DATABASES entry whose ENGINE is
``sharedpool.integrations.django``), else from ``SHAREDPOOL_NAME`` /
``SHAREDPOOL_POOL_SIZE``. Tasks use them as usual (the ENGINE, a
``LocalPool``, or an Engine with ``SharedPool``). Where each part runs:

worker_init              main process, before the children fork: start a
                         coordinator for every pool that has none (a separate
                         process, ``--exit-with <main pid> --remove-on-exit``),
                         unless AUTOSTART is off or one runs (systemd).
worker_process_init      each child, after fork: make sure it forgot the
                         parent's connections (billiard forks with os.fork, so
                         sharedpool's fork hook already did; a safety net).
worker_process_shutdown  each child, on its way out: close its connections and
                         return its permits (billiard ends children with
                         os._exit, so atexit never runs).
child exit               main process, when a child's sentinel wakes the event
                         loop (its exit, also by SIGKILL, an OOM kill or
                         --time-limit): tell the coordinators at once, as
                         gunicorn's child_exit does. With a broker that has no
                         event loop (SQS, filesystem), when billiard's
                         supervisor thread reaps it (within 0.8 s).
worker_shutdown          main process, last: close its own pools and stop the
                         coordinators it started.

Other pools than prefork (solo, threads, gevent) have no children; the
signals then only start and stop the coordinator.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery import Celery, signals

from sharedpool import forksafe
from sharedpool.config import PoolConfig

from . import servers

__all__ = ["setup"]

log = logging.getLogger("sharedpool.integrations.celery")

EXIT_WAIT = 0.1  # seconds the main process waits for a child whose sentinel closed to be dead


def setup(app: Celery, *configs: PoolConfig) -> None:
    """Connect sharedpool to ``app``'s worker signals. Call once, where the app is defined (any process)."""
    wiring = _Wiring(app, list(configs) or None)
    uid = f"sharedpool-{id(app)}"
    signals.worker_init.connect(wiring.worker_init, weak=False, dispatch_uid=uid)
    signals.worker_ready.connect(wiring.worker_ready, weak=False, dispatch_uid=uid)
    signals.worker_process_init.connect(wiring.process_init, weak=False, dispatch_uid=uid)
    signals.worker_process_shutdown.connect(wiring.process_shutdown, weak=False, dispatch_uid=uid)
    signals.worker_shutdown.connect(wiring.worker_shutdown, weak=False, dispatch_uid=uid)


def _report_exit(names: list[str], pid: int) -> None:
    """Tell the coordinators that child ``pid`` is gone, once it is (its sentinel closes a moment before)."""
    deadline = time.monotonic() + EXIT_WAIT
    while time.monotonic() < deadline:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                break  # a zombie: dead, not yet reaped (WNOWAIT leaves that to billiard)
        except ChildProcessError:
            break  # reaped already
        time.sleep(0.001)
    servers.notify_exit(names, pid)


class _Wiring:
    """The signal handlers of one app and the coordinators its main process started."""

    def __init__(self, app: Celery, configs: list[PoolConfig] | None) -> None:
        self.app = app
        self._configs = configs
        self.started: dict[str, int] = {}  # pool name -> coordinator pid

    def pools(self) -> list[PoolConfig]:
        if self._configs is None:
            self._configs = servers.pool_configs()  # looked up in the worker, once Django is set up
        return self._configs

    def worker_init(self, sender: Any = None, **_: Any) -> None:
        """Main process, before the children: start a coordinator for each pool that has none."""
        if getattr(sender, "app", self.app) is not self.app:
            return
        pools = self.pools()
        if not pools:
            log.warning("sharedpool: no pool found (no arguments to setup(), no sharedpool ENGINE in "
                        "DATABASES, no SHAREDPOOL_POOL_SIZE); the worker signals do nothing")
        for config in pools:
            pid = servers.running_coordinator(config)
            if pid is not None:
                log.info("sharedpool: pool %r uses the running coordinator (pid %d)", config.name, pid)
            elif not config.autostart:
                log.warning("sharedpool: pool %r has no coordinator and AUTOSTART is off; start "
                            "sharedpool-coordinator@%s.service (or `sharedpool coordinator`)", config.name, config.name)
            else:
                self.started[config.name] = servers.start_embedded(config, os.getpid()).pid
                log.info("sharedpool: started the coordinator of pool %r (pid %d, budget %d)",
                         config.name, self.started[config.name], config.pool_size)

    def worker_ready(self, sender: Any = None, **_: Any) -> None:
        """Main process, event loop running: report each child that dies to the coordinators at once."""
        if getattr(sender, "app", self.app) is not self.app:
            return
        pool = getattr(getattr(getattr(sender, "controller", None), "pool", None), "_pool", None)
        names = [config.name for config in self.pools()]
        # billiard has no public hook for this; should it change, only the instant notice
        # is lost: the coordinator still sees the death through its pidfd watch
        if hasattr(pool, "_untrack_child_process"):
            # Celery's AsynPool: called as soon as a child's sentinel wakes the event loop,
            # before the child is reaped (which may wait for the 5 s maintenance timer)
            untrack = pool._untrack_child_process

            def untrack_and_report(proc: Any, hub: Any) -> Any:
                try:
                    return untrack(proc, hub)
                finally:
                    _report_exit(names, proc.pid)

            pool._untrack_child_process = untrack_and_report
        elif hasattr(pool, "_join_exited_workers"):
            # billiard's own pool, reaped by its supervisor thread
            join_exited_workers = pool._join_exited_workers

            def join_and_report(*args: Any, **kwargs: Any) -> Any:
                before = {worker.pid for worker in pool._pool}
                try:
                    return join_exited_workers(*args, **kwargs)
                finally:
                    for pid in before - {worker.pid for worker in pool._pool}:
                        _report_exit(names, pid)

            pool._join_exited_workers = join_and_report

    def process_init(self, **_: Any) -> None:
        """Each child, right after fork."""
        forksafe.after_fork_in_child()

    def process_shutdown(self, **_: Any) -> None:
        """Each child, on its way out."""
        servers.close_worker_pools()

    def worker_shutdown(self, sender: Any = None, **_: Any) -> None:
        """Main process, after the children are gone."""
        if getattr(sender, "app", self.app) is not self.app:
            return
        servers.close_worker_pools()
        while self.started:
            name, pid = self.started.popitem()
            servers.stop_process(pid)
            log.info("sharedpool: stopped the coordinator of pool %r (pid %d)", name, pid)
