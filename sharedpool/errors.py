"""One error hierarchy for sharedpool; every message names the pool.

Imported in every process (workers and coordinator).
"""
import psycopg2


class SharedPoolError(Exception):
    """Root of every error raised by sharedpool."""


class ConfigError(SharedPoolError, ValueError):
    """A setting is unknown, ill-typed or out of range."""


class LedgerError(SharedPoolError):
    """The shared-memory ledger is missing, foreign, corrupted or of another version."""


class PoolPermissionError(LedgerError):
    """The pool's objects belong to someone else, or are open to more users than configured."""


class PoolUnavailable(SharedPoolError, psycopg2.OperationalError):
    """No ledger exists for the pool and none could be started."""


class PoolTimeout(SharedPoolError, psycopg2.OperationalError):
    """No permit or connection became free within TIMEOUT."""


class PoolClosed(SharedPoolError):
    """The pool was closed and cannot hand out connections."""


class SlotsExhausted(SharedPoolError):
    """Every worker slot of the ledger is taken by a live process."""
