"""Bind Django's postgresql backend to the driver DRIVER names, and tell which one it is.

Runs in any process that loads the ENGINE, at import time. Django's backend
uses psycopg 3 whenever ``import psycopg`` succeeds and decides once, when
``django.db.backends.postgresql`` is first imported (``django.contrib.postgres``
does that during ``django.setup()``). DRIVER=auto (the default) is that same
choice. DRIVER=psycopg2 with psycopg 3 installed imports the backend with
``psycopg`` hidden, which works only if nothing imported the backend first:
then set ``SHAREDPOOL_DRIVER=psycopg2`` in the environment and import
``sharedpool.integrations.django`` at the top of the settings module.
"""
from __future__ import annotations

import os
import sys
import threading
from collections.abc import Mapping

from django.core.exceptions import ImproperlyConfigured

from sharedpool import drivers
from sharedpool.config import ENV_PREFIX, SETTINGS
from sharedpool.errors import ConfigError

ENGINE = "sharedpool.integrations.django"
_MODULES = ("django.db.backends.postgresql.psycopg_any", "django.db.backends.postgresql.base")
_lock = threading.Lock()


def wanted() -> str | None:
    """Return the driver this process's settings ask for, or None before settings are configured.

    ``SHAREDPOOL_DRIVER`` wins; otherwise every DATABASES entry on this ENGINE
    must resolve to the same driver, since Django's backend runs on one.
    """
    convert = SETTINGS["DRIVER"][0]
    try:
        if os.environ.get(ENV_PREFIX + "DRIVER"):
            return drivers.resolve(convert(ENV_PREFIX + "DRIVER", os.environ[ENV_PREFIX + "DRIVER"]))
        from django.conf import settings

        if not settings.configured:  # e.g. imported from the settings module itself
            return None
        chosen = {}
        for alias, entry in settings.DATABASES.items():
            if entry.get("ENGINE") == ENGINE:
                options = entry.get("POOL_OPTIONS")  # not a dict: config.py says so, with the entry
                setting = options.get("DRIVER", "auto") if isinstance(options, Mapping) else "auto"
                chosen[alias] = drivers.resolve(convert(f"DATABASES[{alias!r}]['POOL_OPTIONS']['DRIVER']", setting))
    except ConfigError as err:
        raise ImproperlyConfigured(str(err)) from err
    if len(set(chosen.values())) > 1:
        raise ImproperlyConfigured(
            "DATABASES entries on ENGINE 'sharedpool.integrations.django' ask for different drivers "
            f"({', '.join(f'{alias!r}: {name}' for alias, name in sorted(chosen.items()))}); "
            "Django's postgresql backend runs on one driver per process"
        )
    return next(iter(chosen.values()), drivers.resolve("auto"))


def bind(name: str) -> drivers.Driver:
    """Import Django's postgresql backend on driver ``name`` (psycopg, psycopg2), or say why it cannot be."""
    try:
        driver = drivers.get(name)
    except ConfigError as err:
        raise ImproperlyConfigured(str(err)) from err
    with _lock:
        loaded = [module for module in _MODULES if module in sys.modules]
        if not loaded and name == "psycopg2":
            missing = object()
            saved = sys.modules.get("psycopg", missing)
            sys.modules["psycopg"] = None  # makes `import psycopg` raise ImportError
            try:
                import django.db.backends.postgresql.base  # noqa: F401
            finally:
                if saved is missing:
                    sys.modules.pop("psycopg", None)
                else:
                    sys.modules["psycopg"] = saved
    from django.db.backends.postgresql.psycopg_any import is_psycopg3

    if is_psycopg3 != (name == "psycopg"):
        raise ImproperlyConfigured(
            f"ENGINE 'sharedpool.integrations.django' is set to DRIVER {name}, but Django's postgresql "
            f"backend was already loaded with {'psycopg 3' if is_psycopg3 else 'psycopg2'} (something imported "
            f"{', '.join(loaded) or 'it'} first, e.g. django.contrib.postgres). Set SHAREDPOOL_DRIVER={name} "
            "in the environment and `import sharedpool.integrations.django` at the top of the settings "
            "module, or use DRIVER 'auto'."
        )
    return driver


def bound() -> drivers.Driver:
    """Return the driver Django's postgresql backend runs on in this process, binding it first if needed."""
    return bind(wanted() or drivers.resolve("auto"))
