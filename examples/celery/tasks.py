"""Celery prefork workers sharing one PostgreSQL budget through sharedpool.

    DATABASE_URL=postgresql://... celery -A tasks worker --concurrency 16 --max-tasks-per-child 100

16 child processes, at most SHAREDPOOL_POOL_SIZE (default 4) server connections
between them. ``setup(app, config)`` wires the worker signals; what runs where
is in the docstring of ``sharedpool.integrations.celery``.
"""
import os

from celery import Celery

from sharedpool import LocalPool, PoolConfig
from sharedpool.integrations.celery import setup

app = Celery("tasks", broker=os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0"))

# SHAREDPOOL_* environment variables override these (SHAREDPOOL_POOL_SIZE=8 ...).
config = PoolConfig.from_mapping({"NAME": "celery", "POOL_SIZE": 4, "TIMEOUT": 60}, source="tasks.py")
pool = LocalPool(config, os.environ["DATABASE_URL"])  # opens nothing until a child checks out
setup(app, config)


@app.task
def touch_item(item_id: int) -> int:
    with pool.connection() as conn:
        with conn.cursor() as cur:
            cur.execute("UPDATE demo_item SET hits = hits + 1 WHERE id = %s RETURNING hits", (item_id,))
            hits = cur.fetchone()[0]
        conn.commit()
    return hits
