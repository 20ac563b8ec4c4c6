"""Settings of the tiny project used by tests/test_django_engine.py.

The server comes from libpq's environment (PGHOST, PGPORT, PGUSER,
PGPASSWORD); DJPROJ_DB names the database (``manage.py test`` creates and
drops ``test_<DJPROJ_DB>``), DJPROJ_POOL the sharedpool pool NAME and
DJPROJ_POOL_SIZE its budget.
"""
import os

SECRET_KEY = "sharedpool-tests"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "localhost"]
INSTALLED_APPS = ["pooltest"]
MIDDLEWARE = []
ROOT_URLCONF = "project.urls"
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"


def database(name, pool, pool_size=4, **extra):
    """One DATABASES entry on the sharedpool ENGINE."""
    return {
        "ENGINE": "sharedpool.integrations.django",
        "NAME": name,
        "POOL_SIZE": pool_size,
        "POOL_OPTIONS": {"NAME": pool, "TIMEOUT": 10},
        **extra,
    }


DATABASES = {
    "default": database(
        os.environ.get("DJPROJ_DB", "sharedpool_demo"),
        os.environ.get("DJPROJ_POOL", "demo"),
        int(os.environ.get("DJPROJ_POOL_SIZE", "4")),
    ),
}
