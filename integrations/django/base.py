"""Serve Django's postgresql backend from sharedpool: connect checks out, close gives back.

Runs in the worker, in every thread that uses a connection. One LocalPool per
distinct connection target (the params Django would pass to the driver's
``connect`` plus the session options applied on top of them: isolation
level, role), all targets of one pool NAME sharing its per-host budget.
Everything else is Django's postgresql backend, on psycopg 3 or psycopg2
(DRIVER). With Django's own pool (``OPTIONS["pool"]``, psycopg 3) Django
pools as usual and every connection its pool opens holds a permit.
"""
from __future__ import annotations

import gc
import logging
import os
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.signals import request_finished
from django.db import DEFAULT_DB_ALIAS
from django.db.backends.base.base import NO_DB_ALIAS
from django.utils.asyncio import async_unsafe

from . import driver

DRIVER = driver.bound()

from django.db.backends.postgresql import base as postgresql  # noqa: E402
from django.db.backends.postgresql.psycopg_any import IsolationLevel  # noqa: E402

from sharedpool import drivers, forksafe  # noqa: E402
from sharedpool.errors import ConfigError, PoolTimeout  # noqa: E402
from sharedpool.pool import LocalPool, close_all  # noqa: E402

from .config import pool_config  # noqa: E402

Database = postgresql.Database
_CLEAN = (drivers.IDLE, drivers.INTRANS)

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
        except Database.ProgrammingError:
            # psycopg2's "named cursor isn't valid anymore": a non-holdable cursor
            # whose transaction ended; psycopg2 sends nothing for it, now or later.
            if cursor.withhold or conn.info.transaction_status not in _CLEAN:
                return False
        except Database.Error:
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
        if drivers.resolve(self.pool_config.driver) != DRIVER.name:
            raise ImproperlyConfigured(
                f"DATABASES[{alias!r}]: DRIVER {self.pool_config.driver!r}, but Django's postgresql backend "
                f"runs on {DRIVER.name} in this process (one driver per process: see DRIVER in the README)"
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
        """Return a LocalPool of plain driver connections to this alias's database.

        Kept apart from the ORM's connections, whose session state (autocommit,
        time zone, psycopg 3 adapters) Django sets up; both draw on the same budget.
        """
        params = self.get_connection_params()
        for key in ("cursor_factory", "context", "prepare_threshold"):
            params.pop(key, None)
        return pool_for(self.pool_config, params, kind="raw")

    @property
    def pool(self) -> Any:
        """Django's own psycopg_pool pool (``OPTIONS["pool"]``), its connections under the budget.

        Django builds it from its settings as usual (so ``min_size``,
        ``max_size``, ``timeout`` keep their per-process meaning); only its
        ``connection_class`` is ours: each connection takes a permit before
        connecting and gives it back after a synchronous close.
        """
        options = self.settings_dict["OPTIONS"].get("pool")
        if not options or self.alias == NO_DB_ALIAS or self.alias in self._connection_pools:
            return super().pool
        extra = options if isinstance(options, Mapping) else {}
        params = {**self.get_connection_params(), "autocommit": True}  # as Django's pool connects
        permit_class = _permit_connection_class(
            extra.get("connection_class", Database.Connection), self.pool_config, params
        )
        settings_dict = self.settings_dict
        # Django's property reads this wrapper's (per-thread) settings_dict: hand it ours for the call.
        self.settings_dict = {
            **settings_dict,
            "OPTIONS": {**settings_dict["OPTIONS"], "pool": {**extra, "connection_class": permit_class}},
        }
        try:
            pool = super().pool
        finally:
            self.settings_dict = settings_dict
        if pool.connection_class is permit_class:
            permit_class._owner = weakref.ref(pool)
        return pool

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
        if self.pool:
            return super().ensure_timezone()
        if self.connection is None:
            return False
        return self._configure_timezone(self.connection)

    # -- health checks: a connection Django finds unusable is discarded, not pooled ----

    def close_if_health_check_failed(self) -> None:
        if self.pool:
            return super().close_if_health_check_failed()
        if self.connection is None or not self.health_check_enabled or self.health_check_done:
            return
        if not self.is_usable():
            self._discard_on_close = True
            self.close()
        self.health_check_done = True

    def close_if_unusable_or_obsolete(self) -> None:
        # Django's logic, except that a connection failing is_usable() is discarded (Django's own
        # pool: Django's). The end of a request gives the connection back whatever CONN_MAX_AGE
        # says: see _give_back_at_request_end.
        if self.pool:
            return super().close_if_unusable_or_obsolete()
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
        if self.pool:
            return super().get_new_connection(conn_params)
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
            if DRIVER.name == "psycopg2":
                # Dummy loads() as in Django: no decode -> json.dumps() -> json.loads() round trip.
                Database.extras.register_default_jsonb(conn_or_curs=connection, loads=lambda x: x)
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
    """Return the LocalPool of raw driver connections for a DATABASES alias using this ENGINE."""
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
    when given back. A later checkout starts afresh. Django's own pools
    (``OPTIONS["pool"]``) on the budget are closed too.
    """
    global _pools_generation
    _give_back_orphans()
    with _pools_lock:
        _pools_generation += 1
        keys = [key for key in _pools if name is None or key[1].name == name]
        names = {key[1].name for key in keys}
        for key in keys:
            _pools.pop(key).close()
    django_pools = postgresql.DatabaseWrapper._connection_pools
    for alias, pool in list(django_pools.items()):
        if issubclass(pool.connection_class, PermitConnection):
            pool_name = pool.connection_class._local.config.name
            if name is None or pool_name == name:
                names.add(pool_name)
                if django_pools.pop(alias, None) is pool:
                    pool.close()
    for pool_name in names:
        close_all(pool_name)


class PermitConnection:
    """Mixin for psycopg's connection class: each connection holds a permit while it is open.

    psycopg_pool opens connections with ``connection_class.connect()`` (in its
    worker threads) and closes them with ``close()``: connect checks out of a
    LocalPool of its own (permit, then connect with Django's params), close
    gives back with discard (synchronous close, then the permit).
    """

    _local: LocalPool
    _pool: Any = None  # psycopg_pool sets it on each connection it holds
    _owner: "weakref.ref[Any] | None" = None  # the Django pool, once built
    _permit_held = 0  # the pid of the process holding this connection's permit

    @classmethod
    def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
        """Take a permit (waiting up to TIMEOUT) and connect with the Django pool's params.

        The wait goes in slices so that a pool closed meanwhile (its workers
        joined for 5 s at most) stops waiting for a permit it no longer needs.
        """
        local = cls._local
        deadline = time.monotonic() + local.config.timeout
        while True:
            try:
                conn = local.getconn(timeout=min(PERMIT_WAIT_SLICE, max(deadline - time.monotonic(), 0.0)))
                break
            except PoolTimeout as err:
                owner = cls._owner and cls._owner()
                if owner is None or owner.closed:
                    raise
                if time.monotonic() >= deadline:
                    raise PoolTimeout(f"{err}; tried for TIMEOUT ({local.config.timeout:.1f} s)") from None
        conn._permit_held = os.getpid()
        return conn

    def close(self) -> None:
        if self._permit_held != os.getpid() or getattr(self._pool, "close_returns", False):
            # Not ours to give back (a child dropping an inherited connection:
            # its socket already points at /dev/null), or psycopg's own return
            # to a pool that asks for it.
            self._permit_held = 0
            return super().close()
        self._permit_held = 0
        self._local.putconn(self, discard=True)  # closes synchronously (back here), then posts the permit


def _permit_connection_class(base: type, config: Any, params: Mapping[str, Any]) -> type:
    """Make the connection class of one Django pool: ``base`` with permits, on its own LocalPool."""
    cls = type(f"PermitConnection[{base.__name__}]", (PermitConnection, base), {})
    cls._local = LocalPool(config, connect=super(PermitConnection, cls).connect, **params)
    return cls


PERMIT_WAIT_SLICE = 0.2  # seconds; how soon a closed Django pool's worker stops waiting for a permit


_inherited_pools: list[Any] = []


def _forget_django_pools_after_fork() -> None:
    """Child after fork: drop Django pools of permit connections (their threads stayed in the parent).

    Their connections were already dropped without I/O with the LocalPools;
    the pool objects stay referenced so that no finaliser touches their
    locks, and the next checkout builds a pool in this process.
    """
    pools = postgresql.DatabaseWrapper._connection_pools
    for alias, pool in list(pools.items()):
        if issubclass(pool.connection_class, PermitConnection):
            _inherited_pools.append(pools.pop(alias))


forksafe.register(_forget_django_pools_after_fork)


def _give_back_at_request_end(**kwargs: Any) -> None:
    """Give every pooled connection back to the shared pool when a request ends, whatever CONN_MAX_AGE says.

    A worker keeping a connection between requests would starve the others
    once workers outnumber the budget (the guides' CONN_MAX_AGE: 300 turned
    into 500s); the connection goes back idle, so the next request reuses it
    without a reconnect, and CONN_MAX_AGE bounds its age instead (RECYCLE).
    Only the request_finished signal does this: Django's own pool, and code
    that calls close_if_unusable_or_obsolete() itself, keep Django's semantics.
    """
    from django.db import connections

    for wrapper in connections.all(initialized_only=True):
        if isinstance(wrapper, DatabaseWrapper) and wrapper.connection is not None and not wrapper.pool \
                and not wrapper.in_atomic_block:
            wrapper.close()


request_finished.connect(_give_back_at_request_end)
