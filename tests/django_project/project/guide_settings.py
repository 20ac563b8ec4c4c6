"""The tiny project with DATABASES as the popular guides write it, only the ENGINE changed.

Used by tests/test_django_gunicorn.py: CONN_MAX_AGE 300, POOL_SIZE, ATOMIC_REQUESTS,
no pool NAME (the default: alias plus a hash of the database target). The
server comes from libpq's environment, the database from DJPROJ_DB.
"""
import os

from .settings import *  # noqa: F403 - the project's settings, DATABASES and URLs replaced

ROOT_URLCONF = "project.guide_urls"
DATABASES = {
    "default": {
        "ENGINE": "sharedpool.integrations.django",
        "NAME": os.environ["DJPROJ_DB"],
        "CONN_MAX_AGE": 300,
        "POOL_SIZE": 4,
        "ATOMIC_REQUESTS": True,
    }
}
