"""Keep this process's connections to one target: a LIFO pool under the per-host budget.

Runs in the worker. Each ``LocalPool`` holds the idle connections of one
connection target (Django alias and database), its connect arguments,
health checks and stats, and draws on its ``ProcessBudget`` (budget.py) for
permits and counts; it never touches the ledger. Every open connection holds
exactly one permit, taken before connect and posted only once the server
confirmed the backend is gone, so the server never sees more backends than
the budget.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from . import cluster, drivers, forksafe
from .budget import ProcessBudget, close_all, forget_all_after_fork
from .closing import close_synchronously, drop_without_io
from .config import PoolConfig
from .errors import PoolClosed, PoolTimeout

log = logging.getLogger("sharedpool")

MIN_CONNECT_TIMEOUT = 2  # libpq rounds any connect_timeout below 2 s up to 2 s
_IDLE = drivers.IDLE
_RESETTABLE = (drivers.INTRANS, drivers.INERROR)
_LOCAL_HOSTS = frozenset(("localhost", "127.0.0.1", "::1"))


class _Entry:
    """One pooled connection. ``sock`` is our own duplicate of its socket, kept for its whole life:
    whoever closes the connection (we, or the driver on an interrupted query), we can still see
    the server close its side, and only then is the permit posted."""

    __slots__ = ("conn", "pool", "created", "last_used", "backend_index", "backend_pid", "sock")

    def __init__(self, conn: Any, pool: "LocalPool", now: float, backend_index: int, backend_pid: int) -> None:
        self.conn = conn
        self.pool = pool
        self.created = now
        self.last_used = now
        self.backend_index = backend_index
        self.backend_pid = backend_pid
        self.sock = os.dup(conn.fileno())


class LocalPool:
    """Thread-safe pool of connections to one target, inside one process.

    Runs in the worker. Connections come back with ``putconn`` (rolled back, or
    discarded if broken); the pool may be used before and after fork. DRIVER
    picks psycopg 3 or psycopg2; ``connect`` replaces that driver's connect
    function (it must return that driver's connections).
    """

    def __init__(
        self,
        config: PoolConfig,
        dsn: str | None = None,
        *,
        connect: Callable[..., Any] | None = None,
        **connect_kwargs: Any,
    ) -> None:
        self.config = config
        self.driver = drivers.get(config.driver)
        self.budget = ProcessBudget.for_config(config)
        with self.budget.lock:
            self.budget.pools.add(self)
        self._connect = connect or self.driver.connect
        self._status = self.driver.transaction_status
        self._connect_args = (dsn,) if dsn is not None else ()
        self._connect_kwargs = _with_server_options(config, connect_kwargs)
        user_timeout = self._connect_kwargs.pop("connect_timeout", None)
        self._user_connect_timeout = int(user_timeout) if user_timeout not in (None, "") and int(user_timeout) > 0 else None
        # None means never: infinity keeps the warm checkout path to plain comparisons
        self._recycle = float("inf") if config.recycle is None else config.recycle
        self._pre_ping = float("inf") if config.pre_ping is None else config.pre_ping
        self._idle: list[_Entry] = []  # LIFO: the warmest connection is at the end
        self._out: dict[int, _Entry] = {}
        self._stats = dict.fromkeys(STAT_KEYS, 0)

    # -- checkout ----------------------------------------------------------------------

    def getconn(self, timeout: float | None = None) -> Any:
        """Check a connection out, waiting at most ``timeout`` (default TIMEOUT) seconds."""
        budget = self.budget
        if not budget.pid:
            budget.ensure_ready()
        if timeout is None:
            timeout = self.config.timeout
        now = time.monotonic()
        deadline = now + timeout
        count = True
        while True:
            entry = self._take_idle_or_reserve(deadline, timeout, count)
            count = False
            if entry is None:
                conn = self._open_new(deadline, timeout)
                if conn is not None:
                    return conn
                now = time.monotonic()
                continue
            conn = entry.conn
            if not (conn.closed or now - entry.created >= self._recycle or now - entry.last_used >= self._pre_ping):
                self._out[id(conn)] = entry  # the warm path: nothing to check
                return conn
            try:
                problem = self._problem(entry, now)
            except BaseException:  # e.g. gevent.Timeout during the ping: don't strand its permit
                self._close_entry(entry, checked_out=True)
                raise
            if problem is None:
                self._out[id(entry.conn)] = entry
                return entry.conn
            if problem == "lost":
                with budget.lock:
                    self._stats["connections_lost"] += 1
            self._close_entry(entry, checked_out=True)
            now = time.monotonic()

    def _take_idle_or_reserve(self, deadline: float, timeout: float, count: bool) -> _Entry | None:
        """Pop the warmest idle connection, or count a new one in; wait at the cap."""
        budget = self.budget
        with budget.lock:
            if count:
                self._stats["requests_num"] += 1
            waited = False
            while True:
                if budget.closed:
                    raise PoolClosed(f"pool {self.config.name!r} is closed")
                idle = self._idle
                if idle:
                    entry = idle.pop()
                    budget.idle -= 1
                    budget.in_use += 1
                    budget.gate.account.publish(budget.idle, budget.in_use, budget.local_waiters)
                    return entry
                if budget.may_reserve():
                    budget.open += 1
                    budget.in_use += 1
                    budget.publish()
                    return None
                other = budget.pop_lru_idle(exclude=self)
                if other is not None:
                    budget.lock.release()
                    try:
                        other.pool._close_entry(other)
                    finally:
                        budget.lock.acquire()
                    continue
                remaining = deadline - time.monotonic()
                if not waited:
                    self._stats["requests_waiting"] += 1
                    waited = True
                budget.local_waiters += 1
                budget.publish()
                try:
                    woken = remaining > 0 and budget.cond.wait(remaining)
                finally:
                    budget.local_waiters -= 1
                    budget.publish()
                if not woken:
                    if self._idle or budget.may_reserve():
                        continue
                    self._stats["requests_errors"] += 1
                    if budget.open < budget.max_open:  # behind this process's own permit waiter
                        raise budget.gate.timeout_error(timeout)
                    raise PoolTimeout(
                        f"pool {self.config.name!r}: no connection after {timeout:.1f} s "
                        f"(MAX_PER_PROCESS {budget.max_open} reached in process {os.getpid()}: "
                        f"{budget.in_use} in use, {budget.idle} idle)"
                    )

    def _open_new(self, deadline: float, timeout: float) -> Any | None:
        """Take a permit and connect, all within the deadline; None if a connection came back here meanwhile."""
        budget = self.budget
        started = time.monotonic()
        try:
            permitted = budget.take_permit(deadline, timeout, self)
        except BaseException:
            with budget.lock:
                self._stats["requests_errors"] += 1
            budget.unreserve()
            raise
        if not permitted:
            budget.unreserve()
            return None
        now = time.monotonic()
        with budget.lock:
            self._stats["requests_wait_ms"] += int((now - started) * 1000.0)
        account = budget.gate.account
        account.connecting_changed(+1)
        try:

            def open_() -> Any:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise budget.gate.timeout_error(timeout)
                return self._connect(*self._connect_args, **self._connect_kwargs,
                                     connect_timeout=self._connect_timeout(left))

            conn = cluster.connect(open_, self.config, deadline, timeout)
            _set_check_interval(conn, self.config)
        except BaseException as exc:
            account.connecting_changed(-1)
            with budget.lock:
                self._stats["connections_errors"] += 1
            budget.give_back(None, in_use=True)
            if isinstance(exc, self.driver.Error) and not isinstance(exc, PoolTimeout):
                reason = str(exc).strip()
                log.warning("sharedpool: pool %r: connect failed: %s", self.config.name, reason)
                if time.monotonic() >= deadline:
                    raise PoolTimeout(
                        f"pool {self.config.name!r}: could not connect within TIMEOUT ({timeout:.1f} s): {reason}"
                    ) from exc
            raise
        backend_pid = conn.info.backend_pid
        index = account.backend_opened(backend_pid, _backend_is_local(conn, backend_pid))
        with budget.lock:
            self._stats["connections_num"] += 1
        entry = _Entry(conn, self, time.monotonic(), index, backend_pid)
        self._out[id(conn)] = entry
        return conn

    def _connect_timeout(self, left: float) -> int:
        """libpq's connect_timeout for what is left of TIMEOUT (whole seconds, at least 2)."""
        wanted = max(MIN_CONNECT_TIMEOUT, math.ceil(left))
        configured = self._user_connect_timeout
        return wanted if configured is None else min(wanted, max(configured, MIN_CONNECT_TIMEOUT))

    def _problem(self, entry: _Entry, now: float) -> str | None:
        """Return why an idle connection must not be handed out ("lost", "recycled"), or None."""
        conn = entry.conn
        if conn.closed:
            return "lost"
        if now - entry.created >= self._recycle:
            return "recycled"
        if now - entry.last_used >= self._pre_ping:
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
                if not conn.autocommit:
                    conn.rollback()
            except self.driver.Error:
                return "lost"
        return None

    # -- return ------------------------------------------------------------------------

    def putconn(self, conn: Any, *, discard: bool = False) -> None:
        """Give a connection back: rolled back and kept, or closed if broken or asked for."""
        entry = self._out.pop(id(conn), None)
        if entry is None:
            return  # dropped after fork, or already returned
        bad = False
        if discard or conn.closed:
            discard = True
        else:
            try:
                status = self._status(conn)
                if status != _IDLE:
                    if status in _RESETTABLE:
                        conn.rollback()
                    else:
                        bad = True  # a query still running, or a lost connection
            except self.driver.Error:
                bad = True
            except BaseException:  # e.g. gevent.Timeout during the rollback: don't strand the permit
                self._close_entry(entry, checked_out=True)
                raise
        budget = self.budget
        with budget.lock:
            if bad:
                self._stats["returns_bad"] += 1
            elif not (discard or budget.closed or (
                (budget.shed_pending or budget.ledger.header.retire_debt) and budget.should_hand_over(entry)
            )):
                entry.last_used = time.monotonic()
                self._idle.append(entry)
                budget.idle += 1
                budget.in_use -= 1
                budget.gate.account.publish(budget.idle, budget.in_use, budget.local_waiters)
                if budget.local_waiters:
                    budget.cond.notify()
                return
        self._close_entry(entry, checked_out=True)

    @contextlib.contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[Any]:
        """Check out for a block; roll back on error, return on exit."""
        conn = self.getconn(timeout)
        try:
            yield conn
        except BaseException:
            if not conn.closed:
                with contextlib.suppress(self.driver.Error):
                    conn.rollback()
            raise
        finally:
            self.putconn(conn)

    # -- closing -----------------------------------------------------------------------

    def _close_entry(self, entry: _Entry, *, checked_out: bool = False) -> None:
        """Close synchronously, then give the permit back (never the other way round).

        If the server has not confirmed the backend's exit within closing.CLOSE_WAIT,
        the permit stays taken and the budget gives it back once it has.
        """
        unconfirmed = close_synchronously(entry.conn, entry.sock, self.driver.Error)
        if unconfirmed is None:
            self.budget.give_back(entry, in_use=checked_out)
        else:
            self.budget.linger(unconfirmed, entry, checked_out)

    def close(self) -> None:
        """Close the idle connections; checked-out ones close when returned."""
        budget = self.budget
        with budget.lock:
            idle, self._idle = self._idle, []
            budget.idle -= len(idle)
            if budget.gate is not None:
                budget.publish()
        for entry in idle:
            self._close_entry(entry)

    def forget_after_fork(self) -> None:
        # Emptied first: a connection class whose close() returns to this pool finds nothing to give back.
        entries = [*self._idle, *self._out.values()]
        self._idle = []
        self._out = {}
        for entry in entries:
            drop_without_io(entry.conn, self.driver.Error)
            os.close(entry.sock)  # our duplicate: closing it sends nothing
        self._stats = dict.fromkeys(STAT_KEYS, 0)

    # -- stats -------------------------------------------------------------------------

    def get_stats(self) -> dict[str, int]:
        """Counters since start plus current gauges (psycopg_pool's ``get_stats`` keys)."""
        budget = self.budget
        return {
            **self._stats,
            "pool_max": budget.max_open,
            "pool_size": budget.open,
            "pool_available": len(self._idle),
            "pool_in_use": len(self._out),
            "budget": self.config.pool_size,
        }

    def pop_stats(self) -> dict[str, int]:
        stats = self.get_stats()
        self._stats = dict.fromkeys(STAT_KEYS, 0)
        return stats


STAT_KEYS = (
    "requests_num",
    "requests_waiting",
    "requests_wait_ms",
    "requests_errors",
    "returns_bad",
    "connections_num",
    "connections_errors",
    "connections_lost",
)


def _with_server_options(config: PoolConfig, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Tag connections with the pool name unless the DSN, the kwargs or PGAPPNAME name the application.

    No startup ``options``: PgBouncer and other proxies refuse the parameter
    (``_set_check_interval`` sets the check interval once connected).
    """
    kwargs = dict(kwargs)
    if "application_name" not in kwargs:
        kwargs.setdefault("fallback_application_name", f"sharedpool/{config.name}")
    return kwargs


def _set_check_interval(conn: Any, config: PoolConfig) -> None:
    """Let the server drop the backends of dead workers quickly (CHECK_INTERVAL, PostgreSQL >= 14).

    Runs right after connect, before the connection is counted as opened; a
    connection that cannot take the setting is closed and the error raised.
    """
    if config.check_interval is None or conn.info.server_version < 140000:
        return
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT set_config('client_connection_check_interval', %s, false)",
                (f"{int(config.check_interval * 1000)}ms",),
            )
        if not conn.autocommit:
            conn.commit()
    except BaseException:
        conn.close()
        raise


def _backend_is_local(conn: Any, backend_pid: int) -> bool:
    """Tell whether this host's /proc shows the backend, so the coordinator can watch it exit."""
    host = conn.info.host or ""
    if not (host.startswith("/") or host in _LOCAL_HOSTS):
        return False
    try:
        with open(f"/proc/{backend_pid}/comm", "rb") as f:
            return f.read().startswith(b"postgres")
    except OSError:
        return False


__all__ = ["LocalPool", "ProcessBudget", "close_all"]

forksafe.register(forget_all_after_fork)
atexit.register(close_all)
