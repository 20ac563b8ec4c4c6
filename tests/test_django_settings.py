"""Pool settings in a DATABASES entry: validated once per wrapper, errors name the key.

No server needed: a DatabaseWrapper is built, never connected.
"""
from __future__ import annotations

import os
import re
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
    assert (config.pool_size, config.timeout, config.max_per_process, config.pre_ping) == (6, 2.0, 3, None)
    assert re.fullmatch(r"default-[0-9a-f]{8}", config.name)
    # NAME travels with copies of the settings (nodb, copy()).
    assert db.settings_dict["POOL_OPTIONS"]["NAME"] == config.name
    nodb = DatabaseWrapper({**db.settings_dict, "NAME": None}, alias="__no_db__")
    assert nodb.pool_config.name == config.name
    assert db.copy().pool_config == config


def test_explicit_name_and_no_pool_options():
    assert wrapper("replica", POOL_SIZE=2).pool_config.name.startswith("replica-")
    assert wrapper(POOL_SIZE=2, POOL_OPTIONS={"NAME": "web"}).pool_config.name == "web"


@pytest.mark.parametrize("key", ["HOST", "PORT", "NAME", "USER"])
def test_default_name_follows_the_database_target(key):
    """Two sites on one host, both with the alias 'default', never share a budget by accident."""
    target = {"HOST": "db1", "PORT": "5432", "NAME": "shop", "USER": "shop"}
    name = wrapper(POOL_SIZE=2, **target).pool_config.name
    assert wrapper(POOL_SIZE=2, **target).pool_config.name == name
    assert wrapper(POOL_SIZE=2, **{**target, key: "other"}).pool_config.name != name


def test_default_name_reads_libpq_environment_for_empty_fields(monkeypatch):
    first = wrapper(POOL_SIZE=2, HOST="").pool_config.name
    monkeypatch.setenv("PGHOST", "elsewhere.example")
    assert wrapper(POOL_SIZE=2, HOST="").pool_config.name != first


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
    """django-db-connection-pool's habit: POOL_SIZE in POOL_OPTIONS works as at the top level."""
    assert wrapper(POOL_OPTIONS={"POOL_SIZE": 2}).pool_config.pool_size == 2
    assert wrapper(POOL_SIZE=2, POOL_OPTIONS={"POOL_SIZE": 2}).pool_config.pool_size == 2
    with pytest.raises(ImproperlyConfigured, match=r"DATABASES\['default'\]: POOL_SIZE 2 at the top level disagrees "
                       r"with POOL_SIZE 3 in POOL_OPTIONS"):
        wrapper(POOL_SIZE=2, POOL_OPTIONS={"POOL_SIZE": 3})


def test_missing_pool_size():
    with pytest.raises(ImproperlyConfigured, match=r"POOL_SIZE is required: .* set DATABASES\['default'\]\['POOL_SIZE'\] "
                       r"\(or POOL_OPTIONS\['POOL_SIZE'\], or SHAREDPOOL_POOL_SIZE\)"):
        wrapper(POOL_OPTIONS={"TIMEOUT": 1})


def test_django_db_connection_pool_entry_works_as_copied(caplog):
    """POOL_OPTIONS as django-db-connection-pool documents them: MAX_OVERFLOW is ignored, said once."""
    entry = dict(POOL_OPTIONS={"POOL_SIZE": 10, "MAX_OVERFLOW": 10, "RECYCLE": 24 * 60 * 60, "PRE_PING": True})
    with caplog.at_level("WARNING", logger="sharedpool"):
        config = wrapper("djdbpool", **entry).pool_config
        wrapper("djdbpool", **entry)
    assert (config.pool_size, config.recycle, config.pre_ping) == (10, 86400.0, 0.0)
    warnings = [r.getMessage() for r in caplog.records if "MAX_OVERFLOW" in r.getMessage()]
    assert warnings == ["sharedpool: DATABASES['djdbpool']['POOL_OPTIONS']['MAX_OVERFLOW'] is ignored: POOL_SIZE is the "
                        "budget of all worker processes on this host together, with no overflow above it "
                        "(django-db-connection-pool's POOL_SIZE and MAX_OVERFLOW are per process)"]
    assert wrapper(POOL_SIZE=2, POOL_OPTIONS={"PRE_PING": False}).pool_config.pre_ping is None


@pytest.mark.parametrize(("max_age", "recycle"), [(0, 3600.0), (None, 3600.0), (300, 300.0), (7200, 3600.0)])
def test_conn_max_age_bounds_a_pooled_connections_age(max_age, recycle):
    assert wrapper(POOL_SIZE=2, CONN_MAX_AGE=max_age).pool_config.recycle == recycle
    assert wrapper(POOL_SIZE=2, CONN_MAX_AGE=max_age, POOL_OPTIONS={"RECYCLE": None}).pool_config.recycle == (
        max_age or None)


def test_guide_entry_with_only_the_engine_changed():
    """CONN_MAX_AGE: 300, POOL_SIZE: 20, ATOMIC_REQUESTS: True, as the popular guides write it."""
    config = wrapper(CONN_MAX_AGE=300, POOL_SIZE=20, ATOMIC_REQUESTS=True).pool_config
    assert (config.pool_size, config.recycle) == (20, 300.0)


def test_pool_size_mismatch_names_both_entries_and_the_variable(monkeypatch):
    entries = {
        "default": harness.settings_entry(ENGINE="sharedpool.integrations.django", NAME="db", POOL_SIZE=8,
                                          POOL_OPTIONS={"NAME": "web"}),
        "replica": harness.settings_entry(ENGINE="sharedpool.integrations.django", NAME="db2",
                                          POOL_OPTIONS={"NAME": "web", "POOL_SIZE": 4}),
    }
    harness.use_databases(**entries)
    try:
        with pytest.raises(ImproperlyConfigured) as err:
            DatabaseWrapper(entries["replica"], "replica")
        assert str(err.value) == (
            "pool 'web' is used by DATABASES['replica'] with POOL_SIZE 4 (from DATABASES['replica']['POOL_OPTIONS']"
            "['POOL_SIZE']) and by DATABASES['default'] with POOL_SIZE 8 (from DATABASES['default']['POOL_SIZE']); "
            "one pool has one budget: make them equal, or give each entry its own POOL_OPTIONS['NAME']"
        )
        monkeypatch.setenv("SHAREDPOOL_POOL_SIZE", "6")  # the variable wins for both: they agree
        assert DatabaseWrapper(entries["replica"], "replica").pool_config.pool_size == 6
    finally:
        harness.use_databases()


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
    assert re.fullmatch(r"my_replica-[0-9a-f]{8}", wrapper("my.replica", POOL_SIZE=2).pool_config.name)
    assert re.fullmatch(r"x{31}-[0-9a-f]{8}", wrapper("x" * 60, POOL_SIZE=2).pool_config.name)


def test_pool_name_starting_with_a_dash_is_refused():
    with pytest.raises(ImproperlyConfigured, match="NAME must not start with '-'"):
        wrapper(POOL_SIZE=2, POOL_OPTIONS={"NAME": "-web"})


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
