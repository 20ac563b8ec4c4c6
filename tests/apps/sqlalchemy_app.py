"""A tiny WSGI app on a SQLAlchemy Engine with ``poolclass=SharedPool``, for server tests.

What a Flask or FastAPI app does with SQLAlchemy, without the framework.
Runs in gunicorn's workers, and in the arbiter with ``--preload`` (it then
also uses the Engine at import, as ``metadata.create_all()`` would).
Settings come from the environment: TEST_URL (a SQLAlchemy URL) and
SHAREDPOOL_NAME / SHAREDPOOL_POOL_SIZE / SHAREDPOOL_TIMEOUT ..., which the
gunicorn hooks read too. Route: ``/sleep?ms=N`` (a ``pg_sleep`` through the
Engine; answers ``<pid> <backend pid>``).
"""
from __future__ import annotations

import os
from urllib.parse import parse_qs

from sqlalchemy import create_engine, text

from sharedpool.integrations.sqlalchemy import SharedPool

engine = create_engine(os.environ["TEST_URL"], poolclass=SharedPool)  # settings: SHAREDPOOL_*
with engine.connect() as conn:  # at import: in the arbiter under --preload
    conn.execute(text("SELECT 1"))


def application(environ, start_response):
    ms = int(parse_qs(environ.get("QUERY_STRING", "")).get("ms", ["10"])[0])
    with engine.connect() as conn:
        backend = conn.execute(text("SELECT pg_backend_pid() FROM pg_sleep(:s)"), {"s": ms / 1000}).scalar()
    body = f"{os.getpid()} {backend}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
