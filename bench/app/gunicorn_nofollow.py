"""gunicorn config for the ``sharedpool-nofollow`` strategy: sharedpool's hooks, accepts not deferred.

Isolates what letting work follow connections changes (compare with ``sharedpool``).
"""
from sharedpool.integrations.gunicorn import child_exit, follow_connections, on_exit, on_starting, post_fork, worker_exit

__all__ = ["on_starting", "post_fork", "child_exit", "worker_exit", "on_exit"]

follow_connections(False)
