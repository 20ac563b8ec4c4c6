"""Declare and validate every public setting, once.

Runs in any process. The same validator serves the Django DATABASES entry,
``SHAREDPOOL_*`` environment variables, the coordinator CLI and reloads.
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from .errors import ConfigError
from .ledger import MAX_BACKENDS

ENV_PREFIX = "SHAREDPOOL_"
# SHAREDPOOL_* variables that are not settings; any other unknown one is an error (a misspelled override).
NOT_SETTINGS = frozenset({
    "SHAREDPOOL_COORDINATOR_ARGS",  # extra coordinator flags in the systemd unit (systemd/)
    "SHAREDPOOL_KEEP_LEAKS",  # tests/conftest.py: keep leaked /dev/shm entries for inspection
    "SHAREDPOOL_TORTURE_KILLS",  # tests/test_torture.py: number of kills
})
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PoolConfig:
    """Settings of one pool. What each key means, and its scope, is documented once: README.md, "Settings"."""

    name: str = "default"
    pool_size: int
    max_per_process: int | None = None
    min_idle: int = 0
    timeout: float = 30.0
    recycle: float | None = 60 * 60.0
    max_idle: float | None = 5 * 60.0
    pre_ping: float | None = 1.0
    check_interval: float | None = 0.1
    reclaim_grace: float = 0.5
    autostart: bool = True
    group: str | None = None
    cluster_budget: int | None = None
    driver: str = "auto"

    def __post_init__(self) -> None:
        if self.group is None:
            # like the CLI's --group and the ENGINE: a worker started from a shell with SHAREDPOOL_GROUP shares the pool
            object.__setattr__(self, "group", os.environ.get(f"{ENV_PREFIX}GROUP") or None)
        for key, (convert, _) in SETTINGS.items():
            field = key.lower()
            object.__setattr__(self, field, convert(key, getattr(self, field)))
        if self.max_per_process is None:
            object.__setattr__(self, "max_per_process", min(self.pool_size, MAX_BACKENDS))
        if self.max_per_process > self.pool_size:
            raise ConfigError(
                f"MAX_PER_PROCESS ({self.max_per_process}) exceeds POOL_SIZE ({self.pool_size})"
            )
        if self.min_idle > self.max_per_process:
            raise ConfigError(
                f"MIN_IDLE ({self.min_idle}) exceeds MAX_PER_PROCESS ({self.max_per_process})"
            )
        if self.check_interval is not None and self.reclaim_grace <= self.check_interval:
            raise ConfigError(
                f"RECLAIM_GRACE ({self.reclaim_grace}) must exceed CHECK_INTERVAL "
                f"({self.check_interval}): a dead worker's backend may live that long"
            )

    @classmethod
    def from_mapping(
        cls,
        values: Mapping[str, Any],
        *,
        env: Mapping[str, str] | None = None,
        source: str = "settings",
    ) -> "PoolConfig":
        """Build from upper-case keys, with ``SHAREDPOOL_<KEY>`` environment overrides winning."""
        unknown = sorted(set(values) - set(SETTINGS))
        if unknown:
            raise ConfigError(
                f"unknown key(s) {', '.join(map(repr, unknown))} in {source}; "
                f"known keys: {', '.join(SETTINGS)}"
            )
        merged = dict(values)
        for key, raw in env_overrides(os.environ if env is None else env).items():
            merged[key] = raw
        if "POOL_SIZE" not in merged:
            raise ConfigError(f"POOL_SIZE is required in {source} (or {ENV_PREFIX}POOL_SIZE)")
        return cls(**{key.lower(): value for key, value in merged.items()})

    def as_mapping(self) -> dict[str, Any]:
        return {key: getattr(self, key.lower()) for key in SETTINGS}


def env_overrides(env: Mapping[str, str]) -> dict[str, str]:
    """Return the ``SHAREDPOOL_*`` overrides by setting; refuse a variable that names no setting."""
    unknown = sorted(
        var for var in env if var.startswith(ENV_PREFIX) and var[len(ENV_PREFIX):] not in SETTINGS and var not in NOT_SETTINGS
    )
    if unknown:
        raise ConfigError(
            f"unknown environment variable(s) {', '.join(unknown)}; "
            f"known: {', '.join(ENV_PREFIX + key for key in SETTINGS)}"
        )
    return {
        key: env[ENV_PREFIX + key] for key in SETTINGS if env.get(ENV_PREFIX + key, "") != ""
    }


def _is_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", ""))


def integer(minimum: int, maximum: int, optional: bool = False) -> Callable[[str, Any], int | None]:
    def convert(key: str, value: Any) -> int | None:
        if optional and _is_none(value):
            return None
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        try:
            number = int(value, 10) if isinstance(value, str) else value
        except ValueError:
            raise ConfigError(f"{key} must be an integer, got {value!r}") from None
        if not isinstance(number, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if not minimum <= number <= maximum:
            raise ConfigError(f"{key} must be between {minimum} and {maximum}, got {number}")
        return number

    return convert


def seconds(minimum: float, optional: bool) -> Callable[[str, Any], float | None]:
    def convert(key: str, value: Any) -> float | None:
        if optional and (_is_none(value) or value is False):
            return None
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number of seconds, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number of seconds, got {value!r}") from None
        if not number >= minimum or number == float("inf"):
            raise ConfigError(f"{key} must be a finite number >= {minimum}, got {value!r}")
        return number

    return convert


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key} must be a boolean, got {value!r}")


def _name(key: str, value: Any) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise ConfigError(f"{key} must be 1-40 characters of [A-Za-z0-9_-], got {value!r}")
    if value.startswith("-"):
        raise ConfigError(f"{key} must not start with '-' (the coordinator command would read it as an option), got {value!r}")
    return value


def _driver(key: str, value: Any) -> str:
    if value not in DRIVERS:
        raise ConfigError(f"{key} must be one of {', '.join(DRIVERS)}, got {value!r}")
    return value


DRIVERS = ("auto", "psycopg", "psycopg2")


def _group(key: str, value: Any) -> str | None:
    if _is_none(value):
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a group name, got {value!r}")
    return value


SETTINGS: dict[str, tuple[Callable[[str, Any], Any], str]] = {
    "NAME": (_name, "pool name"),
    "POOL_SIZE": (integer(1, 100_000), "budget per host"),
    "MAX_PER_PROCESS": (integer(1, MAX_BACKENDS, optional=True), "per-process maximum"),
    "MIN_IDLE": (integer(0, MAX_BACKENDS), "idle connections kept per process"),
    "TIMEOUT": (seconds(0.0, optional=False), "checkout wait limit"),
    "RECYCLE": (seconds(0.0, optional=True), "connection lifetime"),
    "MAX_IDLE": (seconds(0.0, optional=True), "idle expiry"),
    "PRE_PING": (seconds(0.0, optional=True), "idle seconds before a ping"),
    "CHECK_INTERVAL": (seconds(0.001, optional=True), "server-side dead client check"),
    "RECLAIM_GRACE": (seconds(0.0, optional=False), "dead worker grace"),
    "AUTOSTART": (_bool, "start a coordinator on demand"),
    "GROUP": (_group, "shared OS group"),
    "CLUSTER_BUDGET": (integer(1, 1_000_000, optional=True), "server connections of all hosts together"),
    "DRIVER": (_driver, "database driver"),
}
