"""A Celery app whose tasks use a ``LocalPool``, wired with ``sharedpool.integrations.celery.setup``.

Runs in a real prefork worker started by tests/test_celery.py. Settings come
from the environment: CELERY_BROKER_URL (a Redis the test started, or
``filesystem://`` with CELERY_FS_DIR), CELERY_RESULT_BACKEND (default: the
broker), TEST_DSN, and SHAREDPOOL_NAME / SHAREDPOOL_POOL_SIZE / SHAREDPOOL_AUTOSTART ...
"""
from __future__ import annotations

import os

from celery import Celery

from sharedpool import LocalPool, PoolConfig
from sharedpool.integrations.celery import setup

app = Celery("celery_app", broker=os.environ["CELERY_BROKER_URL"],
             backend=os.environ.get("CELERY_RESULT_BACKEND", os.environ["CELERY_BROKER_URL"]))
app.conf.worker_prefetch_multiplier = 1  # tasks spread over the children as they free up
if os.environ.get("CELERY_FS_DIR"):  # the filesystem broker: no event loop, so billiard's own pool
    folder = os.environ["CELERY_FS_DIR"]
    app.conf.broker_transport_options = {"data_folder_in": folder, "data_folder_out": folder,
                                         "control_folder": folder, "polling_interval": 0.05}
config = PoolConfig.from_mapping({"TIMEOUT": 60}, source="celery_app")
pool = LocalPool(config, os.environ["TEST_DSN"])
setup(app, config)


@app.task
def hold(seconds: float) -> list[int]:
    """Keep a pooled connection busy in the server for ``seconds``; return [child pid, backend pid]."""
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid(), pg_sleep(%s)", (seconds,))
        backend = cur.fetchone()[0]
        conn.commit()
    return [os.getpid(), backend]
