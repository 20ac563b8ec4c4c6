"""Pool settings in a DATABASES entry: validated once per wrapper, errors name the key.

No server needed: a DatabaseWrapper is built, never connected.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "django_project"))
pytest.importorskip("django")

import harness  # noqa: E402

harness.setup()

from django.core.exceptions import ImproperlyConfigured  # noqa: E402

from sharedpool.integrations.django.base import DatabaseWrapper  # noqa: E402
from sharedpool.integrations.django.config import pool_config  # noqa: E402


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("SHAREDPOOL_"):
            monkeypatch.delenv(key)


def wrapper(alias="default", **entry):
    entry.setdefault("ENGINE", "sharedpool.integrations.django")
    entry.setdefault("NAME", "db")
    return DatabaseWrapper(harness.settings_entry(**entry), alias)


def test_valid_settings_and_defaults():
    db = wrapper(POOL_SIZE=6, POOL_OPTIONS={"TIMEOUT": 2, "MAX_PER_PROCESS": 3, "PRE_PING": None})
    config = db.pool_config
    assert (config.name, config.pool_size, config.timeout, config.max_per_process, config.pre_ping) == (
        "default", 6, 2.0, 3, None)
    # NAME defaults to the alias and travels with copies of the settings (nodb, copy()).
    assert db.settings_dict["POOL_OPTIONS"]["NAME"] == "default"
    nodb = DatabaseWrapper({**db.settings_dict, "NAME": None}, alias="__no_db__")
    assert nodb.pool_config.name == "default"
    assert db.copy().pool_config == config


def test_explicit_name_and_no_pool_options():
    assert wrapper("replica", POOL_SIZE=2).pool_config.name == "replica"
    assert wrapper(POOL_SIZE=2, POOL_OPTIONS={"NAME": "web"}).pool_config.name == "web"


def test_unknown_key_in_pool_options():
    with pytest.raises(ImproperlyConfigured, match=r"DATABASES\['default'\].*'MAX_IDEL'"):
        wrapper(POOL_SIZE=2, POOL_OPTIONS={"MAX_IDEL": 5})


def test_lower_case_key_is_unknown():
    with pytest.raises(ImproperlyConfigured, match="'timeout'"):
        wrapper(POOL_SIZE=2, POOL_OPTIONS={"timeout": 5})


def test_pool_setting_at_top_level():
    with pytest.raises(ImproperlyConfigured, match="'TIMEOUT'.*POOL_OPTIONS"):
        wrapper(POOL_SIZE=2, TIMEOUT=5)
    with pytest.raises(ImproperlyConfigured, match="'POOL_OPTONS'"):
        wrapper(POOL_SIZE=2, POOL_OPTONS={})


def test_pool_size_inside_pool_options():
    with pytest.raises(ImproperlyConfigured, match="POOL_SIZE goes at the top level"):
        wrapper(POOL_OPTIONS={"POOL_SIZE": 2})


def test_missing_pool_size():
    with pytest.raises(ImproperlyConfigured, match="POOL_SIZE is required"):
        wrapper(POOL_OPTIONS={"TIMEOUT": 1})


@pytest.mark.parametrize(
    ("entry", "key"),
    [
        ({"POOL_SIZE": "eight"}, "POOL_SIZE"),
        ({"POOL_SIZE": 0}, "POOL_SIZE"),
        ({"POOL_SIZE": True}, "POOL_SIZE"),
        ({"POOL_SIZE": 2, "POOL_OPTIONS": {"TIMEOUT": "soon"}}, "TIMEOUT"),
        ({"POOL_SIZE": 2, "POOL_OPTIONS": {"AUTOSTART": "maybe"}}, "AUTOSTART"),
        ({"POOL_SIZE": 2, "POOL_OPTIONS": {"NAME": "has space"}}, "NAME"),
        ({"POOL_SIZE": 2, "POOL_OPTIONS": {"MAX_PER_PROCESS": 3}}, "MAX_PER_PROCESS"),
    ],
)
def test_wrong_type_or_range(entry, key):
    with pytest.raises(ImproperlyConfigured, match=key):
        wrapper(**entry)


def test_pool_options_not_a_dict():
    with pytest.raises(ImproperlyConfigured, match=r"\['POOL_OPTIONS'\] must be a dict"):
        wrapper(POOL_SIZE=2, POOL_OPTIONS=["TIMEOUT", 1])


def test_alias_that_is_not_a_pool_name():
    with pytest.raises(ImproperlyConfigured, match="defaults to the alias"):
        wrapper("my.replica", POOL_SIZE=2)


def test_env_overrides_win(monkeypatch):
    monkeypatch.setenv("SHAREDPOOL_POOL_SIZE", "12")
    monkeypatch.setenv("SHAREDPOOL_TIMEOUT", "0.5")
    config = wrapper(POOL_SIZE=2, POOL_OPTIONS={"TIMEOUT": 9}).pool_config
    assert (config.pool_size, config.timeout) == (12, 0.5)


def test_env_supplies_pool_size(monkeypatch):
    monkeypatch.setenv("SHAREDPOOL_POOL_SIZE", "3")
    assert wrapper().pool_config.pool_size == 3


@pytest.mark.parametrize(("var", "value"), [("SHAREDPOOL_TIMEOUT", "abc"), ("SHAREDPOOL_POOL_SIZE", "-1"),
                                            ("SHAREDPOOL_PRE_PING", "often")])
def test_bad_env_value(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    key = var.removeprefix("SHAREDPOOL_")
    with pytest.raises(ImproperlyConfigured, match=rf"{key} .*{var}={value!r} is set in the environment"):
        wrapper(POOL_SIZE=2)


def test_validated_once_per_wrapper(monkeypatch):
    calls = []
    import sharedpool.integrations.django.base as base

    monkeypatch.setattr(base, "pool_config", lambda *a: calls.append(a) or pool_config(*a))
    db = wrapper(POOL_SIZE=2)
    db.settings_dict["POOL_OPTIONS"] = {"TIMEOUT": "not checked again"}
    assert len(calls) == 1
    assert db.pool_config.timeout == 30.0


def test_django_pool_option_is_accepted():
    # Django's own pool runs under the budget (tests/test_django_drivers.py runs it on the server).
    db = wrapper(POOL_SIZE=2, OPTIONS={"pool": {"max_size": 4}})
    assert db.settings_dict["OPTIONS"]["pool"] == {"max_size": 4}
