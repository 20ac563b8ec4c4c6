"""Run the tiny project's Django inside the pytest process, with DATABASES swapped per test.

Used by tests/test_django_engine.py and tests/test_django_settings.py.
Django is configured once per process (settings.configure); each test then
points the connection handler at entries of its own (its own pool NAME).
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def setup() -> None:
    """Configure Django with project/settings.py (DATABASES left empty) unless already done."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import django
    from django.conf import settings

    if not settings.configured:
        from project import settings as project

        values = {key: getattr(project, key) for key in dir(project) if key.isupper()}
        values["DATABASES"] = {}
        settings.configure(**values)
        django.setup()
    elif "pooltest" not in settings.INSTALLED_APPS:
        raise RuntimeError("Django was configured by another test module without the pooltest app")


def settings_entry(**entry) -> dict:
    """Return a DATABASES entry filled with Django's defaults, as the connection handler keeps it."""
    from django.db import connections

    return connections.configure_settings({"default": entry})["default"]


def use_databases(**entries: dict) -> None:
    """Close this thread's connections and make ``entries`` the DATABASES of the handler."""
    from django.db import connections

    connections.close_all()
    for alias in list(connections.settings):
        try:
            delattr(connections._connections, alias)
        except AttributeError:
            pass
    connections.settings = connections.configure_settings(entries)
