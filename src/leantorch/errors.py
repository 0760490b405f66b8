"""Errors raised by leantorch.

Every error names the argument, the value seen and what would be accepted, so a user can fix
the call without reading the source.
"""

from __future__ import annotations

__all__ = ["LeanError", "LeanTypeError", "UnknownModelError", "describe"]


class LeanError(ValueError):
    """Base class of leantorch's own errors (a ``ValueError``, so callers may catch either)."""


class LeanTypeError(LeanError, TypeError):
    """An argument of the wrong type (also a ``TypeError``)."""


class UnknownModelError(LeanError):
    """A model name, path or ``file.py:factory`` reference could not be resolved."""


def describe(value: object, limit: int = 80) -> str:
    """A short, one-line ``repr`` of ``value`` for error messages."""
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."
