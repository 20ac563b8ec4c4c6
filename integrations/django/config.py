"""Read a DATABASES entry's pool settings into a PoolConfig, or raise ImproperlyConfigured.

Runs in the worker, once per DatabaseWrapper. The entry holds ``POOL_SIZE``
(the per-host budget) at its top level and every other PoolConfig key, upper
case, in ``POOL_OPTIONS``; ``SHAREDPOOL_<KEY>`` environment variables win.
``POOL_OPTIONS["NAME"]`` defaults to the alias.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from sharedpool.config import ENV_PREFIX, SETTINGS, PoolConfig, env_overrides
from sharedpool.errors import ConfigError

TOP_LEVEL_KEYS = ("POOL_SIZE", "POOL_OPTIONS")


def pool_config(settings_dict: Mapping[str, Any], alias: str, env: Mapping[str, str] | None = None) -> PoolConfig:
    """Validate the pool keys of ``DATABASES[alias]``; name the offending key on error."""
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
    if "POOL_SIZE" in options:
        raise ImproperlyConfigured(
            f"{where}['POOL_OPTIONS']: POOL_SIZE goes at the top level of {where}, not in POOL_OPTIONS"
        )
    bad = sorted(repr(key) for key in options if not isinstance(key, str))
    if bad:
        raise ImproperlyConfigured(f"{where}['POOL_OPTIONS']: unknown key(s) {', '.join(bad)}")
    values = {"NAME": alias, **options}
    if "POOL_SIZE" in settings_dict:
        values["POOL_SIZE"] = settings_dict["POOL_SIZE"]
    env = os.environ if env is None else env
    try:
        return PoolConfig.from_mapping(values, env=env, source=f"{where}['POOL_OPTIONS']")
    except ConfigError as err:
        hints = [
            f"{ENV_PREFIX}{key}={raw!r} is set in the environment"
            for key, raw in env_overrides(env).items() if key in str(err)
        ]
        if "NAME" in str(err) and "NAME" not in options:
            hints.append("POOL_OPTIONS['NAME'] defaults to the alias; set it explicitly")
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise ImproperlyConfigured(f"{where}: {err}{hint}") from err
