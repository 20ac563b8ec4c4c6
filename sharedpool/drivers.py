"""Speak to either PostgreSQL driver, psycopg 3 or psycopg2, through one small object.

Runs in the worker. ``LocalPool`` and the Django ENGINE hold a ``Driver`` and
call it where the two drivers differ (connect, their error classes, how the
transaction status is read cheaply); everything else they share: ``closed``
(truthy once closed or broken), ``fileno()``, ``rollback()``, ``cursor()``,
``autocommit``, ``info.backend_pid`` and ``info.host``. Both report libpq's
transaction status values, named here once.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import operator
from collections.abc import Callable
from types import ModuleType
from typing import Any

from .errors import ConfigError

# libpq's PGTransactionStatusType: what psycopg2's get_transaction_status() and
# psycopg 3's pgconn.transaction_status both return.
IDLE, ACTIVE, INTRANS, INERROR, UNKNOWN = range(5)


@dataclasses.dataclass(frozen=True)
class Driver:
    """One DB-API driver as the pool uses it."""

    name: str  # "psycopg" or "psycopg2", as in DRIVER
    module: ModuleType
    connect: Callable[..., Any]
    Error: type[Exception]
    # Read without building an info object: it runs on every return to the pool.
    transaction_status: Callable[[Any], int]


def _load_psycopg() -> Driver:
    import psycopg

    return Driver("psycopg", psycopg, psycopg.connect, psycopg.Error, operator.attrgetter("pgconn.transaction_status"))


def _load_psycopg2() -> Driver:
    import psycopg2
    import psycopg2.extensions

    return Driver("psycopg2", psycopg2, psycopg2.connect, psycopg2.Error, psycopg2.extensions.connection.get_transaction_status)


_LOADERS = {"psycopg": _load_psycopg, "psycopg2": _load_psycopg2}
_PACKAGES = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary"}


def resolve(setting: str) -> str:
    """Name the driver DRIVER means: ``auto`` is psycopg 3 when importable, else psycopg2 (as Django picks)."""
    if setting != "auto":
        return setting
    try:
        importlib.import_module("psycopg")
    except ImportError:
        return "psycopg2"
    return "psycopg"


def get(setting: str = "auto") -> Driver:
    """Return the driver for a DRIVER value (auto, psycopg, psycopg2), or say which package is missing."""
    name = resolve(setting)
    try:
        return _load(name)
    except ImportError as err:
        if setting == "auto":
            wanted, install = "psycopg 3 or psycopg2", "the extra sharedpool[psycopg] or sharedpool[psycopg2]"
        else:
            wanted, install = name, f"{_PACKAGES[name]} (extra sharedpool[{name}])"
        raise ConfigError(f"DRIVER={setting!r} needs {wanted}, which cannot be imported ({err}); install {install}") from err


@functools.cache
def _load(name: str) -> Driver:
    return _LOADERS[name]()
