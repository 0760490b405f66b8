"""Every registered transform and its knobs, as data.

:func:`transforms` reads the registry (through :mod:`leantorch.compress.registry`'s functions
only) and describes each transform by its signature and docstring: the arguments a caller may
turn (the *knobs*), each with its annotation as written, its default and a one-line doc taken
from the docstring's ``Args:`` section. The contract arguments every transform shares
(``model``, ``inplace``, ``example_inputs``, ``calibration``) are not knobs; whether a
transform reads calibration data is said once, by :attr:`TransformInfo.uses_calibration`.

This is what ``leantorch transforms`` prints and what a search over transforms enumerates::

    >>> from leantorch.compress import transforms
    >>> [t.name for t in transforms()][:2]                 # doctest: +SKIP
    ['lowrank.svd', 'moefy.split']
    >>> transforms()[0].knobs[0].to_dict()                 # doctest: +SKIP
    {'name': 'rank', 'annotation': 'int | None', 'required': False, 'default': None, ...}
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from leantorch.compress.registry import argument_check, get_transform, transform_names

__all__ = ["CONTRACT_ARGUMENTS", "Knob", "TransformInfo", "describe_transform", "transforms"]

# arguments every registered transform shares by contract (see registry.py); not search knobs
CONTRACT_ARGUMENTS = frozenset({"model", "inplace", "example_inputs", "calibration"})


@dataclass(frozen=True)
class Knob:
    """One argument of a transform that a caller may turn.

    ``annotation`` is the annotation as written in the signature (``""`` when there is none);
    ``default`` is the default value, meaningful only when ``required`` is False; ``doc`` is
    the argument's entry in the docstring, on one line (``""`` when the docstring has none).
    """

    name: str
    annotation: str
    required: bool
    default: Any
    doc: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; a default JSON cannot hold (a tuple, an object) is kept as its
        ``repr`` under ``default`` and flagged by ``default_repr: True``."""
        default, is_repr = _json_value(self.default)
        out: dict[str, Any] = {"name": self.name, "annotation": self.annotation,
                               "required": self.required, "default": default, "doc": self.doc}
        if is_repr:
            out["default_repr"] = True
        return out


@dataclass(frozen=True)
class TransformInfo:
    """A registered transform: its registry ``name``, the function's import path
    (``module:qualname``), the first paragraph of its docstring, its knobs in signature order,
    whether it reads ``calibration`` data, whether it registered an argument check, and the
    name of its ``**kwargs`` catch-all (passed on to what it builds; ``""`` when it has none)."""

    name: str
    function: str
    summary: str
    knobs: tuple[Knob, ...]
    uses_calibration: bool
    has_check: bool
    extra_keywords: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (knobs as :meth:`Knob.to_dict`)."""
        return {"name": self.name, "function": self.function, "summary": self.summary,
                "uses_calibration": self.uses_calibration, "has_check": self.has_check,
                "extra_keywords": self.extra_keywords, "knobs": [k.to_dict() for k in self.knobs]}


def transforms() -> list[TransformInfo]:
    """Every registered transform, sorted by name (importing the providers on first call)."""
    return [describe_transform(name) for name in transform_names()]


def describe_transform(name: str) -> TransformInfo:
    """The :class:`TransformInfo` of the transform registered as ``name`` (an unknown name
    raises :class:`~leantorch.errors.LeanError` listing the known ones)."""
    fn = get_transform(name)
    parameters = inspect.signature(fn).parameters
    docs = argument_docs(inspect.getdoc(fn) or "")
    knobs = tuple(
        Knob(name=p.name, annotation=_annotation_text(p.annotation),
             required=p.default is inspect.Parameter.empty,
             default=None if p.default is inspect.Parameter.empty else p.default,
             doc=docs.get(p.name, ""))
        for p in parameters.values()
        if p.name not in CONTRACT_ARGUMENTS
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD))
    extra = next((p.name for p in parameters.values()
                  if p.kind is inspect.Parameter.VAR_KEYWORD), "")
    return TransformInfo(name=name, function=_import_path(fn), summary=_summary(fn),
                         knobs=knobs, uses_calibration="calibration" in parameters,
                         has_check=argument_check(name) is not None, extra_keywords=extra)


# a section header alone on its line ("Args:", "Returns:", "Example:"); only the argument
# sections are read, the others are kept out of the prose fallback
_SECTION = re.compile(r"^(\s*)([A-Z]\w*(?: [A-Za-z]\w*)?):\s*$")
_ARGUMENT_SECTIONS = frozenset({"Args", "Arguments", "Parameters", "Keyword Args",
                                "Keyword Arguments"})
_ENTRY = re.compile(r"^(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def argument_docs(docstring: str) -> dict[str, str]:
    """``{argument: one-line doc}`` from a docstring.

    Read from the Google-style ``Args:`` section (``name: text`` lines, continuation lines
    indented deeper, joined into one line). An argument the section does not list, or a
    docstring without one, falls back to the prose form this code base also uses:
    ````name``: text`` or ``name: text`` starting a sentence, up to the end of that
    sentence or clause (``.``, ``;``)."""
    docs: dict[str, str] = {}
    lines = docstring.expandtabs().splitlines()
    prose: list[str] = []  # the lines outside the sections, for the fallback
    i = 0
    while i < len(lines):
        header = _SECTION.match(lines[i])
        i += 1
        if not header:
            prose.append(lines[i - 1])
            continue
        base = len(header.group(1))
        entry_indent: int | None = None
        current: str | None = None
        while i < len(lines):
            line = lines[i]
            stripped = line.strip()
            indent = len(line) - len(line.lstrip())
            if stripped and indent <= base:
                break  # the next section (or the end of this one)
            i += 1
            if not stripped or header.group(2) not in _ARGUMENT_SECTIONS:
                continue
            if entry_indent is None:
                entry_indent = indent
            match = _ENTRY.match(stripped) if indent == entry_indent else None
            if match:
                current = match.group(1)
                docs.setdefault(current, match.group(2).strip())
            elif current is not None and indent > entry_indent:
                docs[current] = f"{docs[current]} {stripped}".strip()
    flat = " ".join(" ".join(prose).split())
    for match in _INLINE.finditer(flat):
        docs.setdefault(match.group(1) or match.group(2), _clause(flat, match.end()))
    return docs


# ``name``: text anywhere, or name: text at the start of the docstring or of a sentence or
# clause (a bare word followed by a colon in the middle of prose is not an entry)
_INLINE = re.compile(r"(?:``(\w+)``|(?:^|(?<=[.;] ))(\w+))\s*:\s+")


def _clause(text: str, start: int) -> str:
    """``text[start:]`` up to the first ``.`` or ``;`` followed by a space (or the end) that
    is outside parentheses and brackets, so "(e.g. 8; None: off)" stays whole."""
    depth = 0
    for i in range(start, len(text)):
        char = text[i]
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth = max(depth - 1, 0)
        elif char in ".;" and depth == 0 and (i + 1 == len(text) or text[i + 1] == " "):
            return text[start:i].strip()
    return text[start:].strip()


def _annotation_text(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return ""
    if isinstance(annotation, str):  # postponed annotations: the text as written
        return annotation
    return inspect.formatannotation(annotation)


def _summary(fn: Callable[..., Any]) -> str:
    doc = inspect.getdoc(fn) or ""
    return " ".join(doc.split("\n\n", 1)[0].split())


def _import_path(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def _json_value(value: Any) -> tuple[Any, bool]:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return repr(value), True
    if isinstance(value, tuple):  # JSON would silently make it a list
        return repr(value), True
    return value, False
