"""Small English corpora for calibrating and checking compressed sentence encoders.

The bundled text is original, written for this package, and fixed: ``sentences.txt`` holds
single sentences on many topics and in several styles, and ``paraphrases.tsv`` holds
pairs of sentences that mean the same thing in different words. Both are read with
:func:`importlib.resources.files`, so they work from an installed wheel as well as
from a source checkout.

:func:`reference_sentences` is a second text set of a different kind: technical prose from
the Python language reference, which every CPython ships as ``pydoc_data.topics`` (the text
behind ``help("assert")``). It is never used for calibration or fine-tuning, so fidelity on
it shows how far a compression's claim carries beyond the text it was tuned on.
:func:`corpora` puts the three together: calibration, held-out and second set, disjoint.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import TypeVar

__all__ = ["Corpora", "corpora", "paraphrase_pairs", "reference_sentences", "sentences",
           "split"]

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


# a sentence ends at . ! or ? (maybe inside a closing quote), white space, a capital letter
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\u2019\u201d]))\s+(?=[A-Z])")
# underlines of reST headings ("*****", "=====")
_UNDERLINE = re.compile(r"[*=\-~^]{3,}")
# code, grammar and markup characters, ellipses and abbreviations whose dot would cut a sentence
_CODE_LIKE = re.compile(r'[=(){}\[\]<>|\\_`*"#@$%]|\.\.\.|::|\b(?:e\.g|i\.e|etc|cf|vs)\.')


@functools.lru_cache(maxsize=1)
def _reference_sentences() -> tuple[str, ...]:
    from pydoc_data.topics import topics  # part of every CPython's standard library

    out: list[str] = []
    seen: set[str] = set()
    for key in sorted(topics):  # sorted: the same order on every run
        for paragraph in re.split(r"\n\s*\n", topics[key]):
            lines = paragraph.split("\n")
            # indented blocks are code, grammar or tables; underlined lines are headings
            if any(line.startswith((" ", "\t")) for line in lines):
                continue
            if any(_UNDERLINE.fullmatch(line.strip()) for line in lines):
                continue
            text = ""
            for line in lines:  # rejoin the wrapped lines; "user-\ndefined" is one word
                line = line.strip()
                text += line if text.endswith("-") or not text else " " + line
            for sentence in _SENTENCE_END.split(text):
                words = sentence.split()
                sentence = " ".join(words)
                if not 6 <= len(words) <= 40 or not sentence[0].isupper():
                    continue
                if not sentence.endswith(".") or _CODE_LIKE.search(sentence):
                    continue
                if sum(c.isalpha() for c in sentence) < 0.75 * len(sentence):
                    continue  # mostly digits, punctuation or spaces: not prose
                if sentence not in seen:
                    seen.add(sentence)
                    out.append(sentence)
    return tuple(out)


def reference_sentences() -> list[str]:
    """English sentences from the Python language reference shipped with the standard library.

    A second text set, different in kind from :func:`sentences` (technical prose about a
    programming language instead of everyday sentences written for this package), for
    checking that a compressed encoder's fidelity holds on text it was not tuned on.
    Extracted deterministically from ``pydoc_data.topics``: paragraphs that are not indented
    (code, grammar) and not headings, rejoined and cut into sentences, kept when a sentence
    has 6 to 40 words, starts with a capital letter, ends with a full stop, holds no code or
    markup characters and is at least 75% letters. About 400 sentences on CPython 3.11; the
    exact set follows the interpreter's version of the reference.

    Returns a new list on each call; the text is extracted only once.
    """
    return list(_reference_sentences())


@dataclass(frozen=True)
class Corpora:
    """Three disjoint text sets: ``calibration`` (transforms and fine-tune), ``held_out`` (of
    the same kind, for verification and gates) and ``second`` (a different kind of text,
    never used for tuning)."""

    calibration: list[str]
    held_out: list[str]
    second: list[str]


def corpora(holdout: float = 0.25, seed: int = 0) -> Corpora:
    """The calibration, held-out and second text sets, disjoint.

    ``held_out`` is the ``holdout`` fraction of :func:`sentences` (by :func:`split` with
    ``seed``). ``calibration`` is the rest of :func:`sentences` followed by both sides of
    every :func:`paraphrase_pairs` pair (about 950 texts for the default split, so that a
    fine-tune sees more varied text than the held-out set's own kind), shuffled with ``seed``
    so that any prefix mixes both sources. ``second`` is :func:`reference_sentences`.

    Raises:
        ValueError: if ``holdout`` is not strictly between 0 and 1.
    """
    calibration, held_out = split(sentences(), holdout=holdout, seed=seed)
    extra = [text for pair in paraphrase_pairs() for text in pair]
    mixed = calibration + extra
    random.Random(seed).shuffle(mixed)
    # the bundled files are written to be distinct; drop any overlap rather than leak it
    excluded = set(held_out) | set(_reference_sentences())
    unique = list(dict.fromkeys(t for t in mixed if t not in excluded))
    return Corpora(unique, held_out, reference_sentences())
