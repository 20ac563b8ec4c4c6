"""gunicorn config for the --preload test: sharedpool's hooks imported into a user's config.

Shows the chaining the hooks module documents: the user's own ``on_exit``
runs its check first, then calls sharedpool's. The check (in the arbiter,
after the workers served) writes "ok" to $TEST_RESULT_FILE when the
connection the preloaded app checked out before fork still works.
"""
import os

from sharedpool.integrations import gunicorn as sharedpool_hooks
from sharedpool.integrations.gunicorn import child_exit, on_starting, post_fork, worker_exit  # noqa: F401

preload_app = True


def on_exit(server):
    import pool_app

    result = "ok" if pool_app.parent_connection_ok() else "broken"
    with open(os.environ["TEST_RESULT_FILE"], "w") as f:
        f.write(result)
    sharedpool_hooks.on_exit(server)
