"""gunicorn server hooks that run a pool's coordinator beside the arbiter and keep permits moving.

Use it as the whole config::

    gunicorn -c python:sharedpool.integrations.gunicorn --workers 8 myproject.wsgi

or import the hooks into an existing ``gunicorn.conf.py``::

    from sharedpool.integrations.gunicorn import on_starting, post_fork, child_exit, worker_exit, on_exit

To chain with hooks of your own, call ours first (gunicorn wants plain
functions with the hook's exact arguments)::

    from sharedpool.integrations import gunicorn as sharedpool_hooks
    from sharedpool.integrations.gunicorn import on_starting, child_exit, worker_exit, on_exit

    def post_fork(server, worker):
        sharedpool_hooks.post_fork(server, worker)
        ...  # your own

The pools come from Django settings when DJANGO_SETTINGS_MODULE is set (every
DATABASES entry whose ENGINE is ``sharedpool.integrations.django``), else from
``SHAREDPOOL_NAME`` / ``SHAREDPOOL_POOL_SIZE``; or call ``use_pools(config, ...)``
in your config file. Where each hook runs:

on_starting   arbiter, once: start a coordinator for every pool that has none
              (a separate process, ``--exit-with <arbiter pid> --remove-on-exit``,
              so it also goes when the arbiter is SIGKILLed).
post_fork     worker, right after fork: make sure it forgot the arbiter's
              connections; under the gevent worker, make psycopg2 cooperative;
              under the sync and gthread workers, let work follow connections
              (a worker holding no connection defers accepting to one that
              does: ``routing.py``; ``follow_connections(False)`` turns it off).
child_exit    arbiter, after reaping a worker: tell the coordinators at once.
worker_exit   worker, on its way out: close its connections, free its permits and slot.
on_exit       arbiter, last: close its own pools (``--preload``), stop the
              coordinators it started.

Sync, gthread and gevent workers, ``--preload``, ``--max-requests``, HUP and
TTIN/TTOU need nothing more. Only the five hook names are gunicorn settings here.
"""
from __future__ import annotations

import logging
import os

from sharedpool import forksafe
from sharedpool.config import PoolConfig

from . import routing, servers

__all__ = ["on_starting", "post_fork", "child_exit", "worker_exit", "on_exit", "use_pools", "follow_connections"]

log = logging.getLogger("sharedpool.integrations.gunicorn")

_pools: list[PoolConfig] | None = None  # None: not yet looked up
_started: dict[str, int] = {}  # pool name -> pid of the coordinator this arbiter started
_follow = True  # let work follow connections in sync and gthread workers
_board: routing.Board | None = None  # created in the arbiter, inherited by every worker


def use_pools(*configs: PoolConfig) -> None:
    """Declare the pools explicitly instead of reading Django settings or the environment."""
    global _pools
    _pools = list(configs)


def follow_connections(enabled: bool) -> None:
    """Turn on or off (in the config file) the deferral of accepts to workers holding connections."""
    global _follow
    _follow = bool(enabled)


def _pool_list() -> list[PoolConfig]:
    global _pools
    if _pools is None:
        _pools = servers.pool_configs()
    return _pools


def on_starting(server) -> None:
    """Start a coordinator for each pool that has none; share the routing board. Runs in the arbiter, first."""
    arbiter_pid = os.getpid()
    pools = _pool_list()
    if not pools:
        server.log.warning("sharedpool: %s; the hooks do nothing", servers.no_pool_found())
    for config in pools:
        pid = servers.running_coordinator(config)
        if pid is not None:
            if servers.parent_of(pid) == arbiter_pid:
                # started on demand by this process (a --preload app touched the database)
                _started[config.name] = pid
            server.log.info("sharedpool: pool %r uses the running coordinator (pid %d)", config.name, pid)
            continue
        if not config.autostart:
            server.log.warning(
                "sharedpool: pool %r has no coordinator and AUTOSTART is off; start "
                "sharedpool-coordinator@%s.service (or `sharedpool coordinator`)", config.name, config.name,
            )
            continue
        process = servers.start_embedded(config, arbiter_pid)
        _started[config.name] = process.pid
        server.log.info(
            "sharedpool: started the coordinator of pool %r (pid %d, budget %d)",
            config.name, process.pid, config.pool_size,
        )
    _share_board(pools)


def post_fork(server, worker) -> None:
    """Prepare a new worker. Runs in the worker right after fork, before it loads or serves."""
    forksafe.after_fork_in_child()
    if _is_gevent_worker(worker):
        servers.make_psycopg2_green()
    elif _follow and _board is not None:
        _route_accepts(worker, _board)


def child_exit(server, worker) -> None:
    """Tell the coordinators a worker is gone. Runs in the arbiter after reaping it."""
    servers.notify_exit([config.name for config in _pool_list()], worker.pid)


def worker_exit(server, worker) -> None:
    """Give back the worker's connections, permits and slot. Runs in the exiting worker."""
    servers.close_worker_pools()


def on_exit(server) -> None:
    """Close the arbiter's own pools and stop the coordinators it started. Runs in the arbiter, last."""
    servers.close_worker_pools()
    while _started:
        name, pid = _started.popitem()
        servers.stop_process(pid)
        server.log.info("sharedpool: stopped the coordinator of pool %r (pid %d)", name, pid)


# -- which worker accepts ------------------------------------------------------------------------


def _share_board(pools: list[PoolConfig]) -> None:
    """Create, in the arbiter before any fork, the board the workers share to route accepts."""
    global _board
    if _follow and pools and _board is None:
        _board = routing.Board()


def _route_accepts(worker, board: routing.Board) -> None:
    """Wrap the worker's ``accept`` so that a worker without a connection defers to one with.

    The sync worker calls ``self.accept(listener)`` in its loop and takes
    EAGAIN as "nobody waiting"; the gthread worker registers ``self.accept``
    with its poller when it starts running, after this hook.
    """
    classes = {f"{cls.__module__}.{cls.__name__}" for cls in type(worker).__mro__}
    if "gunicorn.workers.gthread.ThreadWorker" in classes:
        # a gthread holder accepts whenever its poller runs: it is ready only with an idle connection
        router = routing.Router(_pool_list(), board, holders_ready_only_when_idle=True)
        worker.accept = routing.deferring_callback(worker.accept, router, lambda: worker.nr_conns > 0)
    elif "gunicorn.workers.sync.SyncWorker" in classes:
        worker.accept = routing.deferring_accept(worker.accept, routing.Router(_pool_list(), board))


# -- gevent ------------------------------------------------------------------------------------


def _is_gevent_worker(worker) -> bool:
    return any(cls.__module__ == "gunicorn.workers.ggevent" for cls in type(worker).__mro__)
