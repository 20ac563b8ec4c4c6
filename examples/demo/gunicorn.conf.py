"""gunicorn config of the demo's sharedpool run: sharedpool's hooks imported into a regular config.

The stock run uses no config file. With DJANGO_SETTINGS_MODULE set, the hooks
find the pool in DATABASES (ENGINE sharedpool.integrations.django).
"""
from sharedpool.integrations.gunicorn import child_exit, on_exit, on_starting, post_fork, worker_exit  # noqa: F401

graceful_timeout = 10
timeout = 60
