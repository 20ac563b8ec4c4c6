"""Celery prefork workers sharing one PostgreSQL budget through sharedpool.

    DATABASE_URL=postgresql://... celery -A tasks worker --concurrency 16 --max-tasks-per-child 100

16 child processes, at most SHAREDPOOL_POOL_SIZE (default 4) server connections
between them. Where each part runs is in the signal handlers' docstrings.
"""
import os

from celery import Celery, signals

from sharedpool import LocalPool, PoolConfig, forksafe
from sharedpool.integrations import servers

app = Celery("tasks", broker=os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0"))

# SHAREDPOOL_* environment variables override these (SHAREDPOOL_POOL_SIZE=8 ...).
config = PoolConfig.from_mapping({"NAME": "celery", "POOL_SIZE": 4, "TIMEOUT": 60}, source="tasks.py")
pool = LocalPool(config, os.environ["DATABASE_URL"])  # opens nothing until a child checks out
_coordinator_pid = None


@signals.worker_init.connect
def start_coordinator(**kwargs):
    """Main worker process, before the children fork: start a coordinator unless one runs (systemd)."""
    global _coordinator_pid
    if servers.running_coordinator(config) is None:
        # a separate process that also exits if this one is SIGKILLed, and removes its IPC objects
        _coordinator_pid = servers.start_embedded(config, os.getpid()).pid


@signals.worker_process_init.connect
def forget_parent_connections(**kwargs):
    """Each child, right after fork (billiard uses os.fork, so this is a no-op safety net)."""
    forksafe.after_fork_in_child()


@signals.worker_process_shutdown.connect
def give_back_permits(**kwargs):
    """Each child, on its way out: billiard ends children with os._exit, so atexit never runs."""
    servers.close_worker_pools()


@signals.worker_shutdown.connect
def stop_coordinator(**kwargs):
    """Main worker process, after the children are gone."""
    if _coordinator_pid is not None:
        servers.stop_process(_coordinator_pid)


@app.task
def touch_item(item_id: int) -> int:
    with pool.connection() as conn:
        with conn.cursor() as cur:
            cur.execute("UPDATE demo_item SET hits = hits + 1 WHERE id = %s RETURNING hits", (item_id,))
            hits = cur.fetchone()[0]
        conn.commit()
    return hits
