"""Settings: one declaration, one validator, one documentation table."""
from __future__ import annotations

import os
import re

import pytest

from sharedpool.config import SETTINGS, PoolConfig
from sharedpool.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_documents_exactly_the_declared_settings():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme.split("## Settings", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `([A-Z_]+)` \|", section, flags=re.M)
    assert documented == list(SETTINGS)


def test_environment_strings_are_coerced_and_win():
    config = PoolConfig.from_mapping(
        {"POOL_SIZE": 4, "TIMEOUT": 1},
        env={"SHAREDPOOL_POOL_SIZE": "8", "SHAREDPOOL_RECYCLE": "none", "SHAREDPOOL_AUTOSTART": "off"},
    )
    assert (config.pool_size, config.timeout, config.recycle, config.autostart) == (8, 1.0, None, False)
    assert config.max_per_process == 8


@pytest.mark.parametrize(
    "values, env, message",
    [
        ({"POOL_SIZE": 4, "TIMEOUTT": 1}, {}, "unknown key(s) 'TIMEOUTT'"),
        ({}, {}, "POOL_SIZE is required"),
        ({"POOL_SIZE": "four"}, {}, "POOL_SIZE must be an integer, got 'four'"),
        ({"POOL_SIZE": 4}, {"SHAREDPOOL_TIMEOUT": "soon"}, "TIMEOUT must be a number of seconds, got 'soon'"),
        ({"POOL_SIZE": 4, "MAX_PER_PROCESS": 5}, {}, "MAX_PER_PROCESS (5) exceeds POOL_SIZE (4)"),
        ({"POOL_SIZE": 4, "NAME": "a/b"}, {}, "NAME must be 1-40 characters"),
        ({"POOL_SIZE": 4, "RECLAIM_GRACE": 0.05}, {}, "RECLAIM_GRACE (0.05) must exceed CHECK_INTERVAL"),
        ({"POOL_SIZE": 4, "AUTOSTART": "maybe"}, {}, "AUTOSTART must be a boolean"),
        ({"POOL_SIZE": 4, "TIMEOUT": float("nan")}, {}, "TIMEOUT must be a finite number"),
        ({"POOL_SIZE": 4}, {"SHAREDPOOL_TIMEOUTT": "1"}, "unknown environment variable(s) SHAREDPOOL_TIMEOUTT"),
    ],
)
def test_bad_settings_name_the_key(values, env, message):
    with pytest.raises(ConfigError) as info:
        PoolConfig.from_mapping(values, env=env)
    assert message in str(info.value)


def test_non_setting_variables_of_the_project_are_allowed():
    env = {"SHAREDPOOL_COORDINATOR_ARGS": "--slots 64", "SHAREDPOOL_KEEP_LEAKS": "1", "SHAREDPOOL_TORTURE_KILLS": "5"}
    assert PoolConfig.from_mapping({"POOL_SIZE": 2}, env=env).pool_size == 2
