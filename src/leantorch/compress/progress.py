"""A minimal progress bar for long loops (calibration passes, fine-tunes), shown on stderr
only when a caller turned it on with :func:`showing` (the recipe runner does, the CLI asks)."""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["showing", "track"]

T = TypeVar("T")
_SHOW = contextvars.ContextVar("leantorch_progress", default=False)


@contextlib.contextmanager
def showing(enabled: bool = True) -> Iterator[None]:
    """Within this block, :func:`track` draws its bar."""
    token = _SHOW.set(enabled)
    try:
        yield
    finally:
        _SHOW.reset(token)


def track(items: Iterable[T], total: int | None, label: str) -> Iterator[T]:
    """Yield ``items``, drawing ``label [#####     ] i/total`` when progress is on."""
    if not _SHOW.get():
        yield from items
        return
    total = total or 0
    drawn = False
    try:
        for done, item in enumerate(items, start=1):
            yield item
            if total:
                bar = "#" * (20 * done // total)
                print(f"\r  {label} [{bar:<20}] {done}/{total}", end="", file=sys.stderr,
                      flush=True)
                drawn = True
    finally:
        # end the bar's line even when the loop stops early (an error, Ctrl-C), so the
        # message that follows starts on a line of its own
        if drawn:
            print(file=sys.stderr, flush=True)
