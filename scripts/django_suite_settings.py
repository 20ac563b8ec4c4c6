"""Django test-suite settings for running Django's own tests/runtests.py
against a real PostgreSQL, with either the stock backend or ours.

Used by scripts/django_suite.sh (``--settings=django_suite_settings`` with
scripts/ on PYTHONPATH).  Environment:

  DJANGO_SUITE_ENGINE     ENGINE for both aliases
                          (default: django.db.backends.postgresql)
  DJANGO_SUITE_POOL_SIZE  POOL_SIZE, only for sharedpool.integrations.django
                          (default: 8)
  DATABASE_URL            postgresql://user:pass@host:port/dbname — host, port,
                          user and password are taken from it (the database
                          name is ignored: the suite always uses its own)
  PGHOST PGPORT PGUSER PGPASSWORD
                          used when DATABASE_URL is not set

The test runner connects to the maintenance database ('postgres') to CREATE
DATABASE test_django_suite / test_django_suite_other; NAME itself need not
exist.
"""

import os
from urllib.parse import unquote, urlsplit

SHAREDPOOL_ENGINE = "sharedpool.integrations.django"

ENGINE = os.environ.get("DJANGO_SUITE_ENGINE") or "django.db.backends.postgresql"


def _target():
    url = os.environ.get("DATABASE_URL")
    if url:
        parts = urlsplit(url)
        return {
            "HOST": unquote(parts.hostname or "") or os.environ.get("PGHOST", ""),
            "PORT": str(parts.port or os.environ.get("PGPORT", "")),
            "USER": unquote(parts.username or "") or os.environ.get("PGUSER", ""),
            "PASSWORD": unquote(parts.password or "")
            or os.environ.get("PGPASSWORD", ""),
        }
    return {
        "HOST": os.environ.get("PGHOST", "127.0.0.1"),
        "PORT": os.environ.get("PGPORT", "5432"),
        "USER": os.environ.get("PGUSER", "postgres"),
        "PASSWORD": os.environ.get("PGPASSWORD", ""),
    }


def _database(alias, name):
    db = {"ENGINE": ENGINE, "NAME": name, **_target()}
    if ENGINE == SHAREDPOOL_ENGINE:
        # Only our engine gets these keys; the stock backend never sees them.
        db["POOL_SIZE"] = int(os.environ.get("DJANGO_SUITE_POOL_SIZE", "8"))
        # One pool (coordinator ledger + semaphore) per run and per alias, so
        # concurrent runs and the two aliases never share a budget.
        db["POOL_OPTIONS"] = {"NAME": f"djs{os.getpid()}{alias}"}
    return db


DATABASES = {
    "default": _database("default", "django_suite"),
    "other": _database("other", "django_suite_other"),
}

SECRET_KEY = "django_tests_secret_key"

# Use a fast hasher to speed up tests.
PASSWORD_HASHERS = [
    "django.contrib.auth.hashers.MD5PasswordHasher",
]

DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

USE_TZ = False
