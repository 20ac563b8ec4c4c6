"""Serve Django's postgresql backend from sharedpool: connect checks out, close gives back.

Runs in the worker, in every thread that uses a connection. One LocalPool per
distinct connection target (the params Django would pass to
``psycopg2.connect`` plus the session options applied on top of them:
isolation level, role), all targets of one pool NAME sharing its per-host
budget. Everything else is Django's postgresql backend on psycopg2.
"""
from __future__ import annotations

import gc
import logging
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db import DEFAULT_DB_ALIAS
from django.utils.asyncio import async_unsafe

from .driver import require_psycopg2

require_psycopg2()

import psycopg2  # noqa: E402
import psycopg2.extensions  # noqa: E402
import psycopg2.extras  # noqa: E402
from django.db.backends.postgresql import base as postgresql  # noqa: E402
from django.db.backends.postgresql.psycopg_any import IsolationLevel  # noqa: E402

from sharedpool.errors import ConfigError  # noqa: E402
from sharedpool.pool import LocalPool, close_all  # noqa: E402

from .config import pool_config  # noqa: E402

_CLEAN = (psycopg2.extensions.TRANSACTION_STATUS_IDLE, psycopg2.extensions.TRANSACTION_STATUS_INTRANS)

_pools: dict[tuple, LocalPool] = {}
_pools_lock = threading.Lock()
_pools_generation = 0  # bumped when pools are dropped from _pools: the wrappers' memos expire
# Connections of wrappers garbage-collected while holding one; given back by
# the next checkout or close in this process (a GC callback must not take locks).
_orphans: list[tuple[LocalPool, Any]] = []


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple, set, frozenset)):
        return tuple(_freeze(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def pool_for(config: Any, conn_params: Mapping[str, Any], session: tuple = (), kind: str = "django") -> LocalPool:
    """Return this process's LocalPool for one target, creating it on first use."""
    key = (kind, config, _freeze(conn_params), session)
    pool = _pools.get(key)
    if pool is not None:
        return pool
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            try:
                pool = LocalPool(config, **conn_params)
            except ConfigError as err:
                raise ImproperlyConfigured(str(err)) from err
            _pools[key] = pool
        return pool


def _give_back_orphans() -> None:
    while _orphans:
        try:
            pool, conn = _orphans.pop()
        except IndexError:
            return
        pool.putconn(conn, discard=True)


def _close_named_cursors(conn: Any, cursors: "weakref.WeakSet[Any]") -> bool:
    """Close the server-side cursors a checkout left open; tell whether the connection is clean.

    A WITH HOLD cursor (Django's ``.iterator()`` in autocommit) outlives
    transactions, and an abandoned iterator's cursor object would send its
    CLOSE later, on whatever session the connection then serves.
    """
    for cursor in list(cursors):
        if cursor.closed:
            continue
        if conn.info.transaction_status not in _CLEAN:
            return False
        try:
            cursor.close()
        except psycopg2.ProgrammingError:
            # "named cursor isn't valid anymore": a non-holdable cursor whose
            # transaction ended; psycopg2 sends nothing for it, now or later.
            if cursor.withhold or conn.info.transaction_status not in _CLEAN:
                return False
        except psycopg2.Error:
            return False
    return True


def _keep_warnings_visible() -> None:
    """Undo dictConfig's disable_existing_loggers for "sharedpool" unless LOGGING names it.

    The embedded coordinator's start is announced on that logger; a LOGGING
    setting without ``disable_existing_loggers: False`` would silence it just
    because sharedpool was imported before Django configured logging.
    """
    logger = logging.getLogger("sharedpool")
    if logger.disabled:
        from django.conf import settings

        named = (getattr(settings, "LOGGING", None) or {}).get("loggers") or {}
        if not any(name == "sharedpool" or name.startswith("sharedpool.") for name in named):
            logger.disabled = False


class _Checkout:
    __slots__ = ("pool", "conn", "finalizer", "named_cursors")

    def __init__(self, wrapper: "DatabaseWrapper", pool: LocalPool, conn: Any) -> None:
        self.pool = pool
        self.conn = conn
        self.named_cursors: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self.finalizer = weakref.finalize(wrapper, _orphans.append, (pool, conn))
        self.finalizer.atexit = False


class DatabaseWrapper(postgresql.DatabaseWrapper):
    """Django's postgresql DatabaseWrapper whose connections are pooled under a per-host budget.

    Runs in the worker. ``connect()`` checks a connection out of the LocalPool
    of the current params; ``close()`` gives it back (closing it for real when
    it is closed inside an atomic block, as Django then keeps it referenced).
    """

    def __init__(self, settings_dict: dict, alias: str = DEFAULT_DB_ALIAS) -> None:
        super().__init__(settings_dict, alias)
        self.pool_config = pool_config(settings_dict, alias)
        if (settings_dict.get("OPTIONS") or {}).get("pool"):
            raise ImproperlyConfigured(
                f"DATABASES[{alias!r}]['OPTIONS']['pool'] asks for Django's psycopg 3 pool; ENGINE "
                "'sharedpool.integrations.django' pools by itself (POOL_SIZE, POOL_OPTIONS): remove it"
            )
        options = settings_dict.get("POOL_OPTIONS") or {}
        if "NAME" not in options:
            # Copies made by _nodb_cursor() and copy() keep this alias's pool name.
            settings_dict["POOL_OPTIONS"] = {**options, "NAME": self.pool_config.name}
        self._checkout: _Checkout | None = None
        self._discard_on_close = False
        # (generation, conn_params, session key, pool) of the last checkout: finding the pool
        # again (freezing the params into a key) cost 8 µs of a 37 µs connect + close
        self._pool_memo: tuple | None = None
        _keep_warnings_visible()

    # -- the pool ----------------------------------------------------------------------

    def _session_key(self) -> tuple:
        options = self.settings_dict["OPTIONS"]
        return (_freeze(options.get("isolation_level")), _freeze(options.get("assume_role")))

    def local_pool(self) -> LocalPool:
        """Return the LocalPool that connect() would check out from now."""
        return pool_for(self.pool_config, self.get_connection_params(), self._session_key())

    def raw_pool(self) -> LocalPool:
        """Return a LocalPool of plain psycopg2 connections to this alias's database.

        Kept apart from the ORM's connections, whose session state (autocommit,
        time zone) Django sets up; both draw on the same budget.
        """
        params = self.get_connection_params()
        params.pop("cursor_factory", None)
        return pool_for(self.pool_config, params, kind="raw")

    def close_pool(self) -> None:
        """Close this process's idle connections to this database (before DROP / CREATE ... TEMPLATE).

        Connections still held by live wrappers stay open; those of wrappers
        that were dropped without close() are collected and closed first.
        """
        super().close_pool()
        gc.collect()
        _give_back_orphans()
        params = self.get_connection_params()
        target = (params.get("dbname"), params.get("host"), params.get("port"))
        for (_, _, frozen, _), pool in list(_pools.items()):
            items = dict(frozen)
            if (items.get("dbname"), items.get("host"), items.get("port")) == target:
                pool.close()

    def ensure_timezone(self) -> bool:
        # Pooled connections get the time zone at each checkout (init_connection_state),
        # so a TIME_ZONE change needs no reconnect.
        if self.connection is None:
            return False
        return self._configure_timezone(self.connection)

    # -- health checks: a connection Django finds unusable is discarded, not pooled ----

    def close_if_health_check_failed(self) -> None:
        if self.connection is None or not self.health_check_enabled or self.health_check_done:
            return
        if not self.is_usable():
            self._discard_on_close = True
            self.close()
        self.health_check_done = True

    def close_if_unusable_or_obsolete(self) -> None:
        # Django's logic, except that a connection failing is_usable() is discarded.
        if self.connection is None:
            return
        self.health_check_done = False
        if self.get_autocommit() != self.settings_dict["AUTOCOMMIT"]:
            self.close()  # rolled back by the pool; Django sets autocommit again on checkout
            return
        if self.errors_occurred:
            if self.is_usable():
                self.errors_occurred = False
                self.health_check_done = True
            else:
                self._discard_on_close = True
                self.close()
                return
        if self.close_at is not None and time.monotonic() >= self.close_at:
            self.close()

    # -- connect and close ----------------------------------------------------------

    @async_unsafe
    def get_new_connection(self, conn_params: dict) -> Any:
        options = self.settings_dict["OPTIONS"]
        set_isolation_level = False
        try:
            isolation_level_value = options["isolation_level"]
        except KeyError:
            self.isolation_level = IsolationLevel.READ_COMMITTED
        else:
            try:
                self.isolation_level = IsolationLevel(isolation_level_value)
                set_isolation_level = True
            except ValueError:
                raise ImproperlyConfigured(
                    f"Invalid transaction isolation level {isolation_level_value} "
                    f"specified. Use one of the psycopg.IsolationLevel values."
                )
        _give_back_orphans()
        self._discard_on_close = False
        session = self._session_key()
        memo = self._pool_memo
        if memo is not None and memo[0] == _pools_generation and memo[1] == conn_params and memo[2] == session:
            pool = memo[3]
        else:
            pool = pool_for(self.pool_config, conn_params, session)
            self._pool_memo = (_pools_generation, dict(conn_params), session, pool)
        connection = pool.getconn()
        try:
            if set_isolation_level:
                connection.isolation_level = self.isolation_level
            elif connection.isolation_level is not None:
                connection.isolation_level = None  # reused after raw code changed it
            # Dummy loads() as in Django: no decode -> json.dumps() -> json.loads() round trip.
            psycopg2.extras.register_default_jsonb(conn_or_curs=connection, loads=lambda x: x)
        except BaseException:
            pool.putconn(connection, discard=True)
            raise
        self._checkout = _Checkout(self, pool, connection)
        return connection

    def create_cursor(self, name: str | None = None) -> Any:
        cursor = super().create_cursor(name)
        if name and self._checkout is not None:
            self._checkout.named_cursors.add(cursor)
        return cursor

    def _close(self) -> None:
        checkout = self._checkout
        if checkout is None or self.connection is not checkout.conn:
            return super()._close()
        self._checkout = None
        checkout.finalizer.detach()
        conn = checkout.conn
        discard, self._discard_on_close = self._discard_on_close, False
        with self.wrap_database_errors:
            if self.in_atomic_block:
                # Django keeps the connection referenced until the atomic block
                # exits: close it for real, as the stock backend does.
                checkout.pool.putconn(conn, discard=True)
                return None
            self.connection = None
            if checkout.named_cursors and not discard and not conn.closed:
                discard = not _close_named_cursors(conn, checkout.named_cursors)
            checkout.pool.putconn(conn, discard=discard)
        _give_back_orphans()
        return None


def pool_for_alias(alias: str = DEFAULT_DB_ALIAS) -> LocalPool:
    """Return the LocalPool of raw psycopg2 connections for a DATABASES alias using this ENGINE."""
    from django.db import connections

    wrapper = connections[alias]
    if not isinstance(wrapper, DatabaseWrapper):
        raise ImproperlyConfigured(
            f"DATABASES[{alias!r}] does not use ENGINE 'sharedpool.integrations.django' "
            f"(it uses {wrapper.settings_dict.get('ENGINE')!r})"
        )
    return wrapper.raw_pool()


def close_pools(name: str | None = None) -> None:
    """Close this process's pools of this ENGINE (all, or those of pool NAME) and free their slots.

    Runs in the worker, e.g. from a server's worker-exit hook or a test's
    teardown. Idle connections close now; connections still checked out close
    when given back. A later checkout starts afresh.
    """
    global _pools_generation
    _give_back_orphans()
    with _pools_lock:
        _pools_generation += 1
        keys = [key for key in _pools if name is None or key[1].name == name]
        names = {key[1].name for key in keys}
        for key in keys:
            _pools.pop(key).close()
    for pool_name in names:
        close_all(pool_name)
