"""Django settings for the bench app: one module, one variant per strategy.

Chosen by environment variables set by bench/run.py:

BENCH_STRATEGY   direct | persistent | djdbpool | pgbouncer | pgbouncer-session | sharedpool
                 | sharedpool-nofollow
BENCH_DB_HOST, BENCH_DB_PORT, BENCH_DB_NAME, BENCH_DB_USER, BENCH_DB_PASSWORD
BENCH_BUDGET     the per-host connection budget of the scenario
BENCH_WORKERS    gunicorn workers (djdbpool sizes its per-process pool from it)
BENCH_DRIVER     psycopg2 (default) or psycopg (psycopg 3): every strategy,
                 sharedpool's ENGINE included (DRIVER auto), on that driver
SHAREDPOOL_NAME  unique pool name for the sharedpool strategy
"""
import os
import sys

if os.environ.get("BENCH_DRIVER", "psycopg2") == "psycopg2":
    # Django (and django-db-connection-pool) prefer psycopg 3 when importable;
    # hide it so that every strategy runs on psycopg2.
    sys.modules["psycopg"] = None

STRATEGY = os.environ.get("BENCH_STRATEGY", "persistent")
BUDGET = int(os.environ.get("BENCH_BUDGET", "4"))
WORKERS = int(os.environ.get("BENCH_WORKERS", "4"))

SECRET_KEY = "bench-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = ["app"]
MIDDLEWARE = []
ROOT_URLCONF = "app.urls"
WSGI_APPLICATION = "app.wsgi.application"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["stderr"], "level": "WARNING"},
}

_db = {
    "ENGINE": "django.db.backends.postgresql",
    "HOST": os.environ.get("BENCH_DB_HOST", "127.0.0.1"),
    "PORT": os.environ.get("BENCH_DB_PORT", "5432"),
    "NAME": os.environ.get("BENCH_DB_NAME", "bench"),
    "USER": os.environ.get("BENCH_DB_USER", "postgres"),
    "PASSWORD": os.environ.get("BENCH_DB_PASSWORD", ""),
    "CONN_MAX_AGE": 0,
    "OPTIONS": {"application_name": f"bench-{STRATEGY}"},
}

if STRATEGY == "direct":
    _db["CONN_MAX_AGE"] = 0
elif STRATEGY == "persistent":
    _db["CONN_MAX_AGE"] = None
elif STRATEGY == "djdbpool":
    # One SQLAlchemy QueuePool per process; workers x size = budget where it
    # divides (a pool cannot be smaller than 1: with more workers than budget
    # the cap cannot be expressed and the run records it).
    _db["ENGINE"] = "dj_db_conn_pool.backends.postgresql"
    _db["POOL_OPTIONS"] = {
        "POOL_SIZE": max(1, BUDGET // WORKERS),
        "MAX_OVERFLOW": 0,
        "TIMEOUT": 30,
    }
elif STRATEGY == "pgbouncer":
    # Clients keep their connection to PgBouncer; PgBouncer (transaction mode)
    # multiplexes them onto at most `budget` server connections. HOST/PORT
    # point at PgBouncer (set by the harness). Server-side cursors are left
    # enabled on purpose: S5 reports what breaks.
    _db["CONN_MAX_AGE"] = None
elif STRATEGY == "pgbouncer-session":
    # Session mode gives a client a server connection for as long as the
    # client stays connected: with more workers than the pool, a worker must
    # disconnect after each request (CONN_MAX_AGE 0) or the others wait forever.
    _db["CONN_MAX_AGE"] = 0
elif STRATEGY in ("sharedpool", "sharedpool-nofollow"):
    _db["ENGINE"] = "sharedpool.integrations.django"
    _db["CONN_MAX_AGE"] = 0
    _db["POOL_SIZE"] = BUDGET
    _db["POOL_OPTIONS"] = {
        "NAME": os.environ.get("SHAREDPOOL_NAME", "bench"),
        "MAX_PER_PROCESS": int(os.environ.get("BENCH_MAX_PER_PROCESS", str(BUDGET))),
        "TIMEOUT": 30,
    }
else:
    raise RuntimeError(f"unknown BENCH_STRATEGY={STRATEGY!r}")

DATABASES = {"default": _db}
