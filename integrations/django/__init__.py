"""The Django DATABASES ENGINE ``sharedpool.integrations.django``.

Runs in the worker. ``base.DatabaseWrapper`` is Django's postgresql backend
(psycopg 3 or psycopg2, as DRIVER says) with connections checked out of
sharedpool; ``pool_for_alias`` gives the raw-connection API
(``sharedpool.connection("default")``) a pool for an alias. Importing this
package with ``SHAREDPOOL_DRIVER`` set binds Django's postgresql backend to
that driver before anything else (django.contrib.postgres) can load it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from . import driver as _driver

if TYPE_CHECKING:
    from sharedpool.pool import LocalPool

if (_wanted := _driver.wanted()) is not None:
    _driver.bind(_wanted)

__all__ = ["pool_for_alias"]


def pool_for_alias(alias: str = "default") -> "LocalPool":
    """Return the LocalPool of raw driver connections for a DATABASES alias using this ENGINE."""
    from .base import pool_for_alias as _pool_for_alias

    return _pool_for_alias(alias)
