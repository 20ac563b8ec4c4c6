"""Make Django's postgresql backend load on psycopg2, even when psycopg 3 is importable.

Runs in any process that loads the ENGINE, at import time. Django's backend
picks psycopg 3 whenever ``import psycopg`` succeeds, and decides once, when
``django.db.backends.postgresql.base`` is first imported. sharedpool pools
psycopg2 connections, so that first import is done here with ``psycopg``
hidden for its duration; other code can import psycopg 3 afterwards.
"""
from __future__ import annotations

import sys
import threading

from django.core.exceptions import ImproperlyConfigured

_MODULES = ("django.db.backends.postgresql.psycopg_any", "django.db.backends.postgresql.base")
_lock = threading.Lock()


def require_psycopg2() -> None:
    """Import Django's postgresql backend bound to psycopg2, or say why it cannot be."""
    with _lock:
        loaded = [name for name in _MODULES if name in sys.modules]
        if not loaded:
            missing = object()
            saved = {name: sys.modules.get(name, missing) for name in ("psycopg",)}
            sys.modules["psycopg"] = None  # makes `import psycopg` raise ImportError
            try:
                import django.db.backends.postgresql.base  # noqa: F401
            finally:
                for name, module in saved.items():
                    if module is missing:
                        sys.modules.pop(name, None)
                    else:
                        sys.modules[name] = module
    from django.db.backends.postgresql.psycopg_any import is_psycopg3

    if is_psycopg3:
        raise ImproperlyConfigured(
            "ENGINE 'sharedpool.integrations.django' pools psycopg2 connections, but Django's "
            "postgresql backend was already loaded with psycopg 3 (something imported "
            f"{', '.join(loaded) or 'it'} first, e.g. django.contrib.postgres). Either uninstall "
            "psycopg 3 or `import sharedpool.integrations.django` at the top of the settings module."
        )
