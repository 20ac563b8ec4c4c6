"""sharedpool: one PostgreSQL connection budget per host, shared by every worker process.

Worker-side API. Import-safe before fork: nothing process-wide is opened
until the first checkout in the process that makes it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from .config import PoolConfig
from .errors import (
    ConfigError,
    LedgerError,
    PoolClosed,
    PoolPermissionError,
    PoolTimeout,
    PoolUnavailable,
    SharedPoolError,
    SlotsExhausted,
)
from .pool import LocalPool, ProcessBudget

__all__ = [
    "ConfigError",
    "ConnectionProxy",
    "LedgerError",
    "LocalPool",
    "PoolClosed",
    "PoolConfig",
    "PoolPermissionError",
    "PoolTimeout",
    "PoolUnavailable",
    "SharedPoolError",
    "SlotsExhausted",
    "connection",
    "stats",
]


def _resolve(alias_or_pool: "str | LocalPool") -> LocalPool:
    if isinstance(alias_or_pool, LocalPool):
        return alias_or_pool
    from .integrations.django import pool_for_alias

    return pool_for_alias(alias_or_pool)


@contextlib.contextmanager
def connection(alias_or_pool: "str | LocalPool" = "default", timeout: float | None = None) -> Iterator[Any]:
    """Check out a raw driver connection (psycopg 3 or psycopg2, per DRIVER) for a block; it goes back (rolled back on error) on exit.

    ``alias_or_pool`` is a Django DATABASES alias using the sharedpool ENGINE, or a LocalPool.
    """
    with _resolve(alias_or_pool).connection(timeout) as conn:
        yield conn


class ConnectionProxy:
    """A connection that checks itself out on first use and back in on ``close()``.

    For code written against django-db-connection-pool's raw-connection habit:
    ``conn = ConnectionProxy("default"); cur = conn.cursor(); ...; conn.close()``.
    """

    def __init__(self, alias_or_pool: "str | LocalPool" = "default") -> None:
        self._pool = _resolve(alias_or_pool)
        self._conn: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._conn is None:
            self._conn = self._pool.getconn()
        return getattr(self._conn, name)

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            self._pool.putconn(conn)

    def __enter__(self) -> "ConnectionProxy":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None and self._conn is not None and not self._conn.closed:
            with contextlib.suppress(Exception):
                self._conn.rollback()
        self.close()


def stats() -> dict[str, dict[str, int]]:
    """Counters and gauges of every pool in this process, by pool name (summed over targets)."""
    result: dict[str, dict[str, int]] = {}
    for name, budget in list(ProcessBudget._by_name.items()):
        total: dict[str, int] = {}
        for pool in list(budget.pools):
            for key, value in pool.get_stats().items():
                total[key] = value if key in ("pool_max", "pool_size", "budget") else total.get(key, 0) + value
        result[name] = total
    return result
