"""The Django DATABASES ENGINE ``sharedpool.integrations.django``.

Runs in the worker. ``base.DatabaseWrapper`` is Django's postgresql backend
on psycopg2 with connections checked out of sharedpool; ``pool_for_alias``
gives the raw-connection API (``sharedpool.connection("default")``) a pool
for an alias. Importing this package binds Django's postgresql backend to
psycopg2 even when psycopg 3 is installed: import it at the top of the
settings module if something (django.contrib.postgres) would load that
backend first.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .driver import require_psycopg2

if TYPE_CHECKING:
    from sharedpool.pool import LocalPool

require_psycopg2()

__all__ = ["pool_for_alias"]


def pool_for_alias(alias: str = "default") -> "LocalPool":
    """Return the LocalPool of raw psycopg2 connections for a DATABASES alias using this ENGINE."""
    from .base import pool_for_alias as _pool_for_alias

    return _pool_for_alias(alias)
