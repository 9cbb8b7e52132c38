"""One-line refusals of the library's arguments (model builders, the fusion parts), named as
the Python call names them."""

from __future__ import annotations

import math

from cenfusion.errors import CenError


def check_count(name: str, value: object, least: int = 1) -> None:
    """An integer of at least ``least`` (a bool is no count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise CenError(f"{name}={value!r}: expected an integer of at least {least}")


def check_rate(name: str, value: object) -> None:
    """A probability of dropping, ``0 <= value < 1``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise CenError(f"{name}={value!r}: expected a number in [0, 1)")


def check_non_negative(name: str, value: object) -> None:
    """A finite number of at least 0 (an exchange threshold, a penalty weight)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not 0 <= value < math.inf:
        raise CenError(f"{name}={value!r}: expected a finite number >= 0")
