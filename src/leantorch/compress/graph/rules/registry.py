"""The one registry of op rules, and the helpers every rule uses.

A rule is ``rule(p, node, val, where) -> value``: ``p`` is the running
:class:`~leantorch.compress.graph.propagation.Propagator` (its ``dims`` hold the facts),
``node`` the aten call, ``val`` its fake output (``node.meta["val"]``) and ``where`` the text
used in reasons (``"aten.linear in encoder.layer.0"``). It returns the terms of the output (a
list of terms per axis; a list of such lists for an op with several outputs) after stating
which input and output axes are the same (``p.unify``), which may not be cut
(``p.dims.block``) and which are read whole (``p.dims.mark_inexact``). A rule that meets a
form it does not handle raises :class:`Unsupported`: the op is then opaque (its inputs and
outputs are fixed), never guessed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from leantorch.compress.graph.terms import Term, is_term

if TYPE_CHECKING:
    from leantorch.compress.graph.propagation import Propagator

__all__ = ["RULES", "Rule", "Unsupported", "axis", "rule", "terms_of"]

Rule = Callable[..., Any]  # (p: Propagator, node: fx.Node, val: Any, where: str) -> value
RULES: dict[str, Rule] = {}  # op name (``op_name``) -> rule


class Unsupported(Exception):
    """Raised by a rule for a form of its op it does not handle (the op becomes opaque)."""


def rule(*names: str) -> Callable[[Rule], Rule]:
    """Register the decorated function as the rule of the ops ``names`` (``"aten.linear"``)."""
    def register(fn: Rule) -> Rule:
        for n in names:
            RULES[n] = fn
        return fn
    return register


def terms_of(p: Propagator, arg: Any) -> list[Term]:
    """The terms of a tensor argument; :class:`Unsupported` when the graph does not follow it."""
    value = p.value(arg)
    if not (isinstance(value, list) and all(is_term(t) for t in value)):
        raise Unsupported("an input the graph does not follow")
    return list(value)


def axis(d: int, rank: int) -> int:
    """A dimension argument made non-negative."""
    return d + rank if d < 0 else d
