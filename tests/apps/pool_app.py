"""A tiny WSGI app that uses ``sharedpool.LocalPool`` directly, for server tests.

Runs in the server's workers (and in the master with --preload / uWSGI
without lazy-apps). Settings come from the environment:

TEST_DSN                    libpq DSN of the test server (required)
SHAREDPOOL_NAME / SHAREDPOOL_POOL_SIZE / SHAREDPOOL_TIMEOUT ...   the pool
TEST_TOUCH_DB_AT_IMPORT=1   use the pool at import (``--preload`` tests) and keep one
                            pooled connection checked out in the importing process

Routes: ``/health`` (no database), ``/sleep?ms=N`` (one ``pg_sleep`` inside a
pooled connection; answers ``<pid> <backend pid>``), ``/pid``, ``/stats``.
"""
from __future__ import annotations

import json
import os
from urllib.parse import parse_qs

import psycopg2

from sharedpool import LocalPool, PoolConfig

DSN = os.environ["TEST_DSN"]
pool = LocalPool(PoolConfig.from_mapping({}, source="the environment"), DSN)

IMPORTED_BY = os.getpid()
parent_conn = parent_backend = None
if os.environ.get("TEST_TOUCH_DB_AT_IMPORT") == "1":
    # a pooled connection used and returned (idle in the parent), and one kept
    # checked out across fork: the children must forget both without a byte sent
    with pool.connection() as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        conn.commit()
    parent_conn = pool.getconn()
    parent_backend = parent_conn.info.backend_pid
    with parent_conn.cursor() as cur:
        cur.execute("SELECT 1")
    parent_conn.commit()


def parent_connection_ok() -> bool:
    """In the importing process: tell whether the connection kept across fork still works."""
    if parent_conn is None or os.getpid() != IMPORTED_BY:
        return False
    try:
        with parent_conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            same = cur.fetchone()[0] == parent_backend
        parent_conn.commit()
    except psycopg2.Error:
        return False
    pool.putconn(parent_conn)
    return same


def _reply(start_response, status: str, body: str):
    data = body.encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]


def application(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if path == "/health":
        return _reply(start_response, "200 OK", "ok")
    if path == "/pid":
        return _reply(start_response, "200 OK", str(os.getpid()))
    if path == "/stats":
        return _reply(start_response, "200 OK", json.dumps(pool.get_stats()))
    if path == "/sleep":
        seconds = int(query.get("ms", ["20"])[0]) / 1000.0
        try:
            with pool.connection() as conn:
                with conn.cursor() as cur:
                    # inlined (a number): the tests find the query by its text on either driver
                    cur.execute(f"SELECT pg_backend_pid(), pg_sleep({seconds!r})")
                    backend = cur.fetchone()[0]
                conn.commit()
        except Exception as exc:  # noqa: BLE001 - the test counts non-200 answers
            return _reply(start_response, "503 Service Unavailable", f"{type(exc).__name__}: {exc}")
        return _reply(start_response, "200 OK", f"{os.getpid()} {backend}")
    return _reply(start_response, "404 Not Found", "no such route")
