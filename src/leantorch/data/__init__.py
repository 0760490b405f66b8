"""A small bundled English evaluation corpus for checking compressed sentence encoders.

The text is original, written for this package, and fixed: ``sentences.txt`` holds
single sentences on many topics and in several styles, and ``paraphrases.tsv`` holds
pairs of sentences that mean the same thing in different words. Both are read with
:func:`importlib.resources.files`, so they work from an installed wheel as well as
from a source checkout.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from importlib.resources import files
from typing import TypeVar

__all__ = ["paraphrase_pairs", "sentences", "split"]

T = TypeVar("T")


def _lines(name: str) -> tuple[str, ...]:
    """Non-empty, non-comment lines of a bundled data file, stripped of surrounding whitespace."""
    text = files("leantorch.data").joinpath(name).read_text(encoding="utf-8")
    out: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return tuple(out)


@functools.lru_cache(maxsize=1)
def _sentences() -> tuple[str, ...]:
    return _lines("sentences.txt")


@functools.lru_cache(maxsize=1)
def _pairs() -> tuple[tuple[str, str], ...]:
    pairs: list[tuple[str, str]] = []
    for number, line in enumerate(_lines("paraphrases.tsv"), start=1):
        parts = line.split("\t")
        if len(parts) != 2:
            raise ValueError(
                f"paraphrases.tsv: data line {number} has {len(parts)} tab-separated "
                f"columns, expected 2: {line!r}"
            )
        first, second = parts[0].strip(), parts[1].strip()
        pairs.append((first, second))
    return tuple(pairs)


def sentences() -> list[str]:
    """All sentences of the bundled corpus, in file order.

    Returns a new list on each call; the file is read only once.
    """
    return list(_sentences())


def paraphrase_pairs() -> list[tuple[str, str]]:
    """Pairs ``(sentence, paraphrase)`` whose two sides mean the same thing in different words.

    Returns a new list on each call; the file is read only once.
    """
    return list(_pairs())


def split(items: Sequence[T], holdout: float = 0.25, seed: int = 0) -> tuple[list[T], list[T]]:
    """Shuffle ``items`` deterministically and split them into ``(calibration, held_out)``.

    ``holdout`` is the fraction that goes to the held-out part (rounded to the nearest
    whole item); the same ``items`` and ``seed`` always give the same split.

    Raises:
        ValueError: if ``holdout`` is not strictly between 0 and 1.
    """
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be strictly between 0 and 1, got {holdout!r}")
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    n_held = round(len(shuffled) * holdout)
    cut = len(shuffled) - n_held
    return shuffled[:cut], shuffled[cut:]
