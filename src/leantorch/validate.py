"""Argument checks shared by every module and transform, so each error reads the same way:
``"<owner>: <name>=<value>; expected <what is accepted>"``.

    >>> from leantorch.validate import positive_int, ratio
    >>> positive_int("Attention", "num_heads", 4)
    4
    >>> ratio("prune.structured", "ratio", 0.3)
    0.3
"""

from __future__ import annotations

import math
from typing import Any

from leantorch.errors import LeanError, LeanTypeError, describe

__all__ = ["one_of", "positive_int", "ratio"]


def positive_int(owner: str, name: str, value: Any, *, minimum: int = 1) -> int:
    """``value`` if it is an ``int`` (not a ``bool``) of at least ``minimum``; otherwise a
    :class:`LeanError` (a :class:`LeanTypeError` for a non-int) naming ``owner`` and ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise LeanTypeError(f"{owner}: {name}={describe(value)}; expected an int >= {minimum}")
    if value < minimum:
        raise LeanError(f"{owner}: {name}={describe(value)}; expected an int >= {minimum}")
    return value


def ratio(owner: str, name: str, value: Any, *, low: float = 0.0, high: float = 1.0,
          include_low: bool = True, include_high: bool = False) -> float:
    """``float(value)`` if it is a real number (not a ``bool``, not NaN) in the interval from
    ``low`` to ``high`` (closed or open at each end as ``include_low`` / ``include_high`` say;
    by default ``[0, 1)``); otherwise a :class:`LeanError` naming the interval."""
    bracket = ("[" if include_low else "(") + f"{low:g}, {high:g}" + ("]" if include_high else ")")
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise LeanTypeError(f"{owner}: {name}={describe(value)}; expected a number in {bracket}")
    above = value >= low if include_low else value > low
    below = value <= high if include_high else value < high
    if not (above and below):
        raise LeanError(f"{owner}: {name}={describe(value)}; expected a number in {bracket}")
    return float(value)


def one_of(owner: str, name: str, value: Any, accepted: tuple[Any, ...] | list[Any]) -> Any:
    """``value`` if it is one of ``accepted``; otherwise a :class:`LeanError` listing them."""
    try:
        ok = value in accepted
    except TypeError:  # an unhashable or uncomparable value
        ok = False
    if not ok:
        choices = ", ".join(repr(a) for a in accepted)
        raise LeanError(f"{owner}: {name}={describe(value)}; expected one of {choices}")
    return value
