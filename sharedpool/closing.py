"""Close a connection so that its permit is really free, or forget one without a byte of I/O.

Runs in the worker. Used by the pool (every close) and by the budget (closes
whose backend has not exited yet, watched until it has).
"""
from __future__ import annotations

import contextlib
import os
import select
import socket
import time
from typing import Any

from .drivers import ACTIVE

CLOSE_WAIT = 2.0  # seconds to wait for the server to confirm a closed backend has exited


def close_synchronously(conn: Any, sock: int | None = None, driver_error: type[Exception] = OSError) -> int | None:
    """Close and wait until the server side is gone, so its permit is really free.

    PostgreSQL keeps a backend's socket open until the process has exited
    (pqcomm.c, "synchronous close"), so EOF on our duplicate of the socket
    (``sock``, taken at connect; else taken now) means the backend no longer
    counts against max_connections. A query still running is cancelled
    first: a busy backend reads our Terminate only when it finishes. Our
    side is shut for writing after the close, so the server sees EOF even
    where the driver closed without a Terminate. ``driver_error`` is the
    Error class of the connection's driver (psycopg 3 or psycopg2). Returns
    None once confirmed (``sock`` closed), else ``sock``, still open, to watch
    until EOF.
    """
    if sock is None:
        try:
            sock = os.dup(conn.fileno())
        except (driver_error, OSError, ValueError):
            with contextlib.suppress(driver_error):
                conn.close()
            return None
    with contextlib.suppress(driver_error, OSError):
        if not conn.closed and conn.info.transaction_status == ACTIVE:
            conn.cancel()
    with contextlib.suppress(driver_error):
        conn.close()
    with contextlib.suppress(OSError):
        _shut_write(sock)
    if wait_for_eof(sock, CLOSE_WAIT):
        os.close(sock)
        return None
    return sock


def _shut_write(fd: int) -> None:
    """shutdown(SHUT_WR) on a raw descriptor (a socket object would own and close it)."""
    probe = socket.socket(fileno=os.dup(fd))
    try:
        probe.shutdown(socket.SHUT_WR)
    finally:
        probe.close()


def wait_for_eof(fd: int, timeout: float) -> bool:
    """Read until EOF (the server closed its side) or ``timeout``; tell whether EOF came."""
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        deadline = time.monotonic() + timeout
        # unread messages (NOTIFY, ParameterStatus) also wake poll: read until EOF
        while True:
            if poller.poll(max(deadline - time.monotonic(), 0.0) * 1000):
                if not os.read(fd, 65536):
                    return True
            elif time.monotonic() >= deadline:
                return False
    except OSError:
        return True  # reset by the server: it is gone


def drop_without_io(conn: Any, driver_error: type[Exception] = OSError) -> None:
    """Forget an inherited connection without a byte reaching its server.

    Closing a connection (either driver: libpq's PQfinish) sends Terminate,
    which would end the parent's session; pointing our copy of the descriptor
    at /dev/null first makes the close harmless to the parent.
    """
    if conn.closed:
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(devnull, conn.fileno())
    finally:
        os.close(devnull)
    with contextlib.suppress(driver_error):
        conn.close()
