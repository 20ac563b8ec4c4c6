"""Open a connection under CLUSTER_BUDGET, which PostgreSQL itself enforces.

Runs in the worker, around connect. The hard cap is the CONNECTION LIMIT of
a role used by this pool only (``sharedpool cluster init`` sets it to
CLUSTER_BUDGET): the server counts the role's backends, its own included,
before a new backend is admitted, and refuses the one that would exceed the
limit before it ever shows in ``pg_stat_activity``. So no crash, partition or
coordinator failure can make the role's backends exceed the budget; the
coordinators' shares (coordinator/cluster.py) only decide which host tries,
so that refusals stay rare. A refused connect is retried here until the
checkout's deadline, then raises PoolTimeout.
"""
from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import Any

from .config import PoolConfig
from .errors import ConfigError, PoolTimeout

REFUSED = "too many connections for role"  # PostgreSQL's FATAL message (SQLSTATE 53300)
RETRY_FIRST, RETRY_MAX = 0.01, 0.1  # seconds between tries after a refusal, doubling up to the maximum

_verified: set[tuple[int, str]] = set()  # (pid, pool NAME) whose role this process has checked


def connect(open_: Callable[..., Any], config: PoolConfig, deadline: float, timeout: float, *args: Any, **kwargs: Any) -> Any:
    """Connect, retrying while the server refuses for the role's connection limit.

    Without CLUSTER_BUDGET this is ``open_(*args, **kwargs)``. With it, the
    first connection of each process also checks that the server really
    enforces the budget (``verify``).
    """
    if config.cluster_budget is None:
        return open_(*args, **kwargs)
    delay = RETRY_FIRST
    refusals = 0
    while True:
        try:
            conn = open_(*args, **kwargs)
        except Exception as exc:
            if REFUSED not in str(exc):
                raise
            refusals += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise PoolTimeout(
                    f"pool {config.name!r}: no connection after {timeout:.1f} s: the server refused "
                    f"{refusals} time(s), CLUSTER_BUDGET {config.cluster_budget} reached on the server"
                ) from exc
            time.sleep(min(left, delay * random.uniform(0.5, 1.0)))  # jitter: waiters on many hosts don't try in step
            delay = min(delay * 2, RETRY_MAX)
            continue
        if (os.getpid(), config.name) not in _verified:
            try:
                verify(conn, config)
            except BaseException:
                conn.close()
                raise
            _verified.add((os.getpid(), config.name))
        return conn


def verify(conn: Any, config: PoolConfig) -> None:
    """Refuse to run unless the server enforces CLUSTER_BUDGET on this connection's role.

    A superuser is exempt from CONNECTION LIMIT, and a limit other than the
    budget means ``sharedpool cluster init`` was not run (or ran with another
    budget): either way the cap would silently not hold.
    """
    with conn.cursor() as cur:
        cur.execute("SELECT current_user, rolsuper, rolconnlimit FROM pg_roles WHERE rolname = current_user")
        role, superuser, limit = cur.fetchone()
    if not conn.autocommit:
        conn.rollback()
    fix = (
        f"run `sharedpool cluster init --name {config.name} --budget {config.cluster_budget} "
        f"--role ROLE --dsn ADMIN_DSN` and connect as ROLE, a role used by this pool only"
    )
    if superuser:
        raise ConfigError(
            f"pool {config.name!r}: CLUSTER_BUDGET is enforced by the server as the CONNECTION LIMIT of the "
            f"pool's role, and superuser {role!r} is exempt from it; {fix}"
        )
    if limit != config.cluster_budget:
        raise ConfigError(
            f"pool {config.name!r}: CLUSTER_BUDGET is {config.cluster_budget} but role {role!r} has "
            f"CONNECTION LIMIT {limit}; {fix}"
        )
