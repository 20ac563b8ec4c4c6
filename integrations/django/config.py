"""Read a DATABASES entry's pool settings into a PoolConfig, or raise ImproperlyConfigured.

Runs in the worker, once per DatabaseWrapper, and in the server's arbiter
(integrations/servers.py). The entry holds ``POOL_SIZE`` (the per-host
budget) at its top level or in ``POOL_OPTIONS``, and every other PoolConfig
key, upper case, in ``POOL_OPTIONS``; ``SHAREDPOOL_<KEY>`` environment
variables win. Entries copied from the usual guides work as they are:

- ``POOL_OPTIONS["NAME"]`` defaults to the alias plus a short hash of the
  database target (host, port, database, user), so two sites on one host
  never share a budget by accident; an explicit NAME shares on purpose.
- ``CONN_MAX_AGE`` > 0 bounds a pooled connection's age (RECYCLE); the
  connection itself goes back to the shared pool after every request
  whatever CONN_MAX_AGE says (base.py).
- ``CONN_HEALTH_CHECKS: True`` makes PRE_PING 0 (a ping at every checkout)
  unless PRE_PING is set.
- django-db-connection-pool's ``MAX_OVERFLOW`` is ignored with a warning and
  its ``PRE_PING: True/False`` means "ping on every checkout" / "never".
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from sharedpool.config import ENV_PREFIX, SETTINGS, PoolConfig, env_overrides
from sharedpool.errors import ConfigError

ENGINE = "sharedpool.integrations.django"
TOP_LEVEL_KEYS = ("POOL_SIZE", "POOL_OPTIONS")
IGNORED_OPTIONS = {
    "MAX_OVERFLOW": "POOL_SIZE is the budget of all worker processes on this host together, with no "
    "overflow above it (django-db-connection-pool's POOL_SIZE and MAX_OVERFLOW are per process)",
}
# libpq's environment fills what the entry leaves empty: part of the target too
TARGET_KEYS = (("HOST", "PGHOST"), ("PORT", "PGPORT"), ("NAME", "PGDATABASE"), ("USER", "PGUSER"))

log = logging.getLogger("sharedpool")
_warned: set[tuple[str, str]] = set()


def pool_config(settings_dict: Mapping[str, Any], alias: str, env: Mapping[str, str] | None = None) -> PoolConfig:
    """Validate the pool keys of ``DATABASES[alias]``; name the offending key on error.

    Also refuse a POOL_SIZE that disagrees with another entry of the same pool NAME.
    """
    env = os.environ if env is None else env
    config, source = _resolve(settings_dict, alias, env)
    for other, entry in _other_entries(alias):
        try:
            theirs, their_source = _resolve(entry, other, env)
        except ImproperlyConfigured:
            continue  # that entry raises its own error when it is used
        if theirs.name == config.name and theirs.pool_size != config.pool_size:
            raise ImproperlyConfigured(
                f"pool {config.name!r} is used by DATABASES[{alias!r}] with POOL_SIZE {config.pool_size} "
                f"(from {source}) and by DATABASES[{other!r}] with POOL_SIZE {theirs.pool_size} (from "
                f"{their_source}); one pool has one budget: make them equal, or give each entry its own "
                f"POOL_OPTIONS['NAME']"
            )
    return config


def default_name(settings_dict: Mapping[str, Any], alias: str, env: Mapping[str, str]) -> str:
    """Return the alias plus a short hash of the database target: one pool per site and database."""
    target = "\0".join(str(settings_dict.get(key) or env.get(var) or "") for key, var in TARGET_KEYS)
    digest = hashlib.blake2s(target.encode(), digest_size=4).hexdigest()
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", alias)[:31].lstrip("-") or "db"
    return f"{stem}-{digest}"


def _resolve(settings_dict: Mapping[str, Any], alias: str, env: Mapping[str, str]) -> tuple[PoolConfig, str]:
    """Build the entry's PoolConfig; also return where its POOL_SIZE came from."""
    where = f"DATABASES[{alias!r}]"
    misplaced = sorted(
        key for key in settings_dict
        if isinstance(key, str) and key not in TOP_LEVEL_KEYS
        and (key.startswith("POOL") or (key in SETTINGS and key != "NAME"))
    )
    if misplaced:
        raise ImproperlyConfigured(
            f"{where}: unknown key(s) {', '.join(map(repr, misplaced))} at the top level; only "
            f"POOL_SIZE goes there, the other sharedpool settings go in POOL_OPTIONS "
            f"(known: {', '.join(k for k in SETTINGS if k != 'POOL_SIZE')})"
        )
    options = settings_dict.get("POOL_OPTIONS")
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise ImproperlyConfigured(
            f"{where}['POOL_OPTIONS'] must be a dict of sharedpool settings, got {type(options).__name__}"
        )
    bad = sorted(repr(key) for key in options if not isinstance(key, str))
    if bad:
        raise ImproperlyConfigured(f"{where}['POOL_OPTIONS']: unknown key(s) {', '.join(bad)}")
    values = {key: value for key, value in options.items() if key not in IGNORED_OPTIONS}
    for key in IGNORED_OPTIONS.keys() & options.keys():
        if (alias, key) not in _warned:
            _warned.add((alias, key))
            log.warning("sharedpool: %s['POOL_OPTIONS']['%s'] is ignored: %s", where, key, IGNORED_OPTIONS[key])
    if isinstance(values.get("PRE_PING"), bool):  # SQLAlchemy's pool_pre_ping habit
        values["PRE_PING"] = 0.0 if values["PRE_PING"] else None
    if settings_dict.get("CONN_HEALTH_CHECKS"):
        values.setdefault("PRE_PING", 0.0)  # Django checks at each request's first use: ping every checkout
    values.setdefault("NAME", default_name(settings_dict, alias, env))
    source = _pool_size_source(settings_dict, options, where, env)
    if "POOL_SIZE" in settings_dict:
        values["POOL_SIZE"] = settings_dict["POOL_SIZE"]
    try:
        config = PoolConfig.from_mapping(values, env=env, source=f"{where}['POOL_OPTIONS']")
        max_age = settings_dict.get("CONN_MAX_AGE")
        if max_age and (config.recycle is None or max_age < config.recycle):
            config = dataclasses.replace(config, recycle=max_age)
    except ConfigError as err:
        hints = [
            f"{ENV_PREFIX}{key}={raw!r} is set in the environment"
            for key, raw in env_overrides(env).items() if key in str(err)
        ]
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise ImproperlyConfigured(f"{where}: {err}{hint}") from err
    return config, source


def _pool_size_source(settings_dict: Mapping[str, Any], options: Mapping[str, Any], where: str, env: Mapping[str, str]) -> str:
    """Say where POOL_SIZE comes from; refuse two places that disagree, or none."""
    top, inner = settings_dict.get("POOL_SIZE"), options.get("POOL_SIZE")
    if "POOL_SIZE" in settings_dict and "POOL_SIZE" in options and top != inner:
        raise ImproperlyConfigured(
            f"{where}: POOL_SIZE {top!r} at the top level disagrees with POOL_SIZE {inner!r} in "
            f"POOL_OPTIONS; set it in one place (it is the budget of all workers on this host)"
        )
    if env.get(f"{ENV_PREFIX}POOL_SIZE"):
        return f"the environment variable {ENV_PREFIX}POOL_SIZE"
    if "POOL_SIZE" in settings_dict:
        return f"{where}['POOL_SIZE']"
    if "POOL_SIZE" in options:
        return f"{where}['POOL_OPTIONS']['POOL_SIZE']"
    raise ImproperlyConfigured(
        f"{where}: POOL_SIZE is required: the server connections all workers on this host may open "
        f"together; set {where}['POOL_SIZE'] (or POOL_OPTIONS['POOL_SIZE'], or {ENV_PREFIX}POOL_SIZE)"
    )


def _other_entries(alias: str) -> list[tuple[str, Mapping[str, Any]]]:
    """The other DATABASES entries on this ENGINE, as Django's connection handler holds them."""
    from django.db import connections

    try:
        databases = connections.settings
    except ImproperlyConfigured:  # settings not configured: a lone entry, nothing to compare with
        return []
    return [(other, entry) for other, entry in databases.items() if other != alias and entry.get("ENGINE") == ENGINE]
