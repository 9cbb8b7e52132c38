"""One-line refusals of a model builder's arguments, named as the Python call names them."""

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


def check_threshold(name: str, value: object) -> None:
    """An exchange threshold on ``|gamma|``: a finite number of at least 0."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not 0 <= value < math.inf:
        raise CenError(f"{name}={value!r}: expected a finite number >= 0")
