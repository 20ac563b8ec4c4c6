"""One error hierarchy for sharedpool; every message names the pool.

Imported in every process (workers and coordinator).
"""
import importlib


def _driver_operational_errors() -> tuple[type[Exception], ...]:
    """OperationalError of each installed driver (psycopg 3, psycopg2).

    PoolTimeout and PoolUnavailable subclass them, so code (and Django's error
    wrapper) that catches the driver's OperationalError also catches a pool that
    cannot hand out a connection, whichever driver is in use. Neither driver
    is required: with none installed they are plain SharedPoolErrors.
    """
    found = []
    for name in ("psycopg", "psycopg2"):
        try:
            found.append(importlib.import_module(name).OperationalError)
        except ImportError:
            continue  # not installed (or unusable: using it as DRIVER says why)
    return tuple(found)


_OPERATIONAL = _driver_operational_errors()


class SharedPoolError(Exception):
    """Root of every error raised by sharedpool."""


class ConfigError(SharedPoolError, ValueError):
    """A setting is unknown, ill-typed or out of range."""


class LedgerError(SharedPoolError):
    """The shared-memory ledger is missing, foreign, corrupted or of another version."""


class PoolPermissionError(LedgerError):
    """The pool's objects belong to someone else, or are open to more users than configured."""


class PoolUnavailable(SharedPoolError, *_OPERATIONAL):
    """No ledger exists for the pool and none could be started."""


class PoolTimeout(SharedPoolError, *_OPERATIONAL):
    """No permit or connection became free within TIMEOUT."""


class PoolClosed(SharedPoolError):
    """The pool was closed and cannot hand out connections."""


class SlotsExhausted(SharedPoolError):
    """Every worker slot of the ledger is taken by a live process."""
