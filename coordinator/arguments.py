"""Turn the settings' validators into argparse types, so the CLI checks exactly what config.py checks.

Any command of ``sharedpool``.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from sharedpool.config import SETTINGS
from sharedpool.errors import SharedPoolError


def setting_type(convert: Callable[[str, Any], Any] | str, option: str) -> Callable[[str], Any]:
    """An argparse type for ``option`` from a validator, or from the name of a setting."""
    if isinstance(convert, str):
        convert = SETTINGS[convert][0]

    def parse(value: str) -> Any:
        try:
            return convert(option, value)
        except SharedPoolError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse
