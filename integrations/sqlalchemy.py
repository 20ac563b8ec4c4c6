"""A SQLAlchemy pool class that puts an Engine's connections under the host budget.

Runs in the worker (Flask, FastAPI or any app under gunicorn or uWSGI, a
script, a Celery task)::

    from sqlalchemy import create_engine
    from sharedpool.integrations.sqlalchemy import SharedPool

    engine = create_engine(
        "postgresql+psycopg2://app@db/app",
        poolclass=SharedPool,
        sharedpool={"NAME": "web", "POOL_SIZE": 8, "TIMEOUT": 10},  # the README's Settings
    )

Without ``sharedpool=`` the settings come from ``SHAREDPOOL_*`` environment
variables (``SHAREDPOOL_POOL_SIZE`` is then required), which is also where the
gunicorn hooks and the Celery integration look for the pool.

The pooling is sharedpool's: a ``LocalPool`` keeps the idle connections (LIFO,
RECYCLE, MAX_IDLE, PRE_PING, shedding when other workers wait), and this class
is the thin SQLAlchemy face over it. SQLAlchemy's own sizing arguments
(``pool_size``, ``max_overflow``, ``pool_timeout``) are not accepted:
``create_engine`` rejects them, and ``MAX_PER_PROCESS`` and ``TIMEOUT`` say it
instead. Each DBAPI connection keeps one ``ConnectionPoolEntry`` while it
lives, so ``connect`` events run once per connection and ``.info`` persists.
Connections are opened from the URL and ``connect_args`` (``do_connect``
events run as usual), with sharedpool's ``application_name`` and
``client_connection_check_interval`` added; a custom ``creator=`` cannot
carry them, so the first connection it opens is closed with a ConfigError.

Every path gives its permit back: a returned connection goes back to the
``LocalPool`` (or is closed there under pressure); an invalidated one, a
recycled one, a detached one when closed and one whose ``connect`` event
failed are closed synchronously and their permits posted; ``engine.dispose()``
closes this process's idle connections. In a forked child the parent's
connections were already forgotten without I/O (sharedpool's fork hook), so
``engine.dispose()`` or ``engine.dispose(close=False)`` there closes nothing
of the parent's.
"""
from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping
from typing import Any

from sqlalchemy import event
from sqlalchemy.pool import ConnectionPoolEntry, Pool

from sharedpool import LocalPool, PoolConfig, forksafe
from sharedpool.errors import ConfigError

__all__ = ["SharedPool"]

# LocalPool's server options (application_name, client_connection_check_interval)
# for the connect call under way in this thread; the dialect's do_connect event reads them.
_connecting = threading.local()


class SharedPool(Pool):
    """SQLAlchemy pool over a sharedpool ``LocalPool``: ``create_engine(url, poolclass=SharedPool)``."""

    def __init__(
        self,
        creator: Any,
        sharedpool: PoolConfig | Mapping[str, Any] | None = None,
        _local: LocalPool | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(creator, **kw)
        dialect = kw.get("dialect")
        config = _pool_config(sharedpool)
        if config.driver == "auto" and getattr(dialect, "driver", None) in ("psycopg", "psycopg2"):
            config = dataclasses.replace(config, driver=dialect.driver)  # the engine's driver, not the default
        self._config = config
        # connections reach SQLAlchemy's records from the LocalPool, never from the creator directly
        self._open_raw = self._invoke_creator
        self._invoke_creator = self._take_for_record
        self._local = _local if _local is not None else LocalPool(self._config, connect=self._open)
        self._records: dict[int, ConnectionPoolEntry] = {}  # id(DBAPI connection) -> its entry
        self._handoff = threading.local()
        if dialect is not None and hasattr(dialect, "dispatch"):
            event.listen(dialect, "do_connect", _add_server_options)  # once per dialect: same function

    # -- SQLAlchemy's Pool interface -------------------------------------------------

    def _do_get(self) -> ConnectionPoolEntry:
        """Check a connection out of the LocalPool and return its entry (a new one for a new connection)."""
        conn = self._local.getconn()
        record = self._records.get(id(conn))
        if record is not None and record.dbapi_connection is conn:
            return record
        self._forget_closed()
        self._handoff.conn = conn
        try:
            return self._create_connection()  # runs the connect events on ``conn``
        except BaseException:
            self._handoff.conn = None
            self._local.putconn(conn, discard=True)  # a no-op if SQLAlchemy already closed it
            raise

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        """Give the connection back to the LocalPool (an invalidated entry has none left)."""
        conn = record.dbapi_connection
        if conn is not None:
            self._local.putconn(conn)

    def _close_connection(self, connection: Any, *, terminate: bool = False) -> None:
        """Close through the LocalPool: synchronously, then its permit is posted."""
        self._records.pop(id(connection), None)
        self._local.putconn(connection, discard=True)

    def dispose(self) -> None:
        """Close this process's idle connections; the parent's, in a forked child, are already forgotten."""
        forksafe.after_fork_in_child()  # servers that fork from C may not have run the hook yet
        self._local.close()
        self._forget_closed()

    def recreate(self) -> "SharedPool":
        """Return a pool with the same arguments over the same LocalPool (``engine.dispose()``)."""
        self.logger.info("Pool recreating")
        return self.__class__(
            self._creator,
            sharedpool=self._config,
            _local=self._local,
            recycle=self._recycle,
            echo=self.echo,
            logging_name=self._orig_logging_name,
            reset_on_return=self._reset_on_return,
            pre_ping=self._pre_ping,
            _dispatch=self.dispatch,
            dialect=self._dialect,
        )

    def status(self) -> str:
        stats = self._local.get_stats()
        return (
            f"SharedPool {self._config.name!r}: budget {self._config.pool_size} per host; this process: "
            f"{stats['pool_in_use']} checked out, {stats['pool_available']} idle, {stats['pool_size']} open"
        )

    # -- connections -------------------------------------------------------------------

    def _take_for_record(self, record: ConnectionPoolEntry) -> Any:
        """The creator SQLAlchemy's entries call: the connection ``_do_get`` took, or a new checkout.

        An entry reconnects by itself after an invalidation or a recycle; that
        checkout comes from the LocalPool too, so it also holds a permit.
        """
        conn = getattr(self._handoff, "conn", None)
        if conn is None:
            conn = self._local.getconn()
        self._handoff.conn = None
        self._records[id(conn)] = record
        return conn

    def _open(self, **server_options: Any) -> Any:
        """Open a DBAPI connection for the LocalPool, with its server options (it holds a permit)."""
        _connecting.options = server_options
        _connecting.applied = False
        try:
            conn = self._open_raw(None)
            if not _connecting.applied:
                conn.close()
                raise ConfigError(
                    f"pool {self._config.name!r}: SharedPool opens connections from create_engine's URL and "
                    "connect_args; a custom creator= (or a do_connect handler returning its own connection) "
                    "would open them without sharedpool's application_name and client_connection_check_interval"
                )
            return conn
        finally:
            _connecting.options = None

    def _forget_closed(self) -> None:
        for key, record in list(self._records.items()):
            conn = record.dbapi_connection
            if conn is None or conn.closed:
                self._records.pop(key, None)


def _add_server_options(dialect: Any, conn_rec: Any, cargs: list, cparams: dict) -> None:
    """do_connect event: add LocalPool's application_name and check interval to this connect call."""
    options = getattr(_connecting, "options", None)
    if options is None:
        return  # a connection not opened by a SharedPool
    for key, value in options.items():
        if key == "options" and cparams.get("options"):
            if value not in cparams["options"]:
                cparams["options"] = f"{cparams['options']} {value}"
        else:
            cparams.setdefault(key, value)
    _connecting.applied = True


def _pool_config(value: PoolConfig | Mapping[str, Any] | None) -> PoolConfig:
    if isinstance(value, PoolConfig):
        return value
    if value is None:
        return PoolConfig.from_mapping({}, source="the environment (SHAREDPOOL_*)")
    if isinstance(value, Mapping):
        return PoolConfig.from_mapping(value, source="create_engine(sharedpool=...)")
    raise ConfigError(f"sharedpool= must be a PoolConfig or a mapping of settings, got {type(value).__name__}")
