"""Settings of the demo project: one DATABASES entry, sharedpool's ENGINE or Django's stock one.

Environment (set by run_demo.py):
DATABASE_URL    postgresql://user[:password]@host:port/dbname
DEMO_BACKEND    sharedpool (default) | pgbouncer (stock ENGINE through PgBouncer; DATABASE_URL
                points at it) | stock
DEMO_BUDGET     POOL_SIZE: server connections all workers on this host may hold
DEMO_POOL       the pool NAME (default "demo")
"""
import os
import sys
from urllib.parse import unquote, urlsplit

# Both runs on the same driver, psycopg2 (Django, and so DRIVER=auto, prefer psycopg 3 when importable).
sys.modules.setdefault("psycopg", None)

SECRET_KEY = "demo-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = []
MIDDLEWARE = []
ROOT_URLCONF = "demoproject.urls"
WSGI_APPLICATION = "demoproject.wsgi.application"
USE_TZ = True

_url = urlsplit(os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
_database = {
    "HOST": _url.hostname or "",
    "PORT": str(_url.port or ""),
    "NAME": unquote(_url.path.lstrip("/")) or "postgres",
    "USER": unquote(_url.username or ""),
    "PASSWORD": unquote(_url.password or ""),
}

if os.environ.get("DEMO_BACKEND", "sharedpool") == "stock":
    DATABASES = {
        "default": {
            **_database,
            "ENGINE": "django.db.backends.postgresql",
            "CONN_MAX_AGE": 60,  # the usual production setting: one persistent connection per worker
            "OPTIONS": {"application_name": "demo-stock"},
        }
    }
elif os.environ.get("DEMO_BACKEND") == "pgbouncer":
    DATABASES = {
        "default": {
            **_database,
            "ENGINE": "django.db.backends.postgresql",
            "CONN_MAX_AGE": None,  # each worker keeps its client connection to PgBouncer
            "DISABLE_SERVER_SIDE_CURSORS": True,  # Django's advice for PgBouncer's transaction mode
            "OPTIONS": {"application_name": "demo-pgbouncer"},  # PgBouncer sets it on its server connections
        }
    }
else:
    DATABASES = {
        "default": {
            **_database,
            "ENGINE": "sharedpool.integrations.django",
            "POOL_SIZE": int(os.environ.get("DEMO_BUDGET", "4")),
            "POOL_OPTIONS": {"NAME": os.environ.get("DEMO_POOL", "demo"), "TIMEOUT": 30},
        }
    }
