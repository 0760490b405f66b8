"""Sublayers: residual branches ``x + f(x)`` that one module computes entirely.

:func:`find_sublayers` reads the exported program (which module ran each node) and finds the
adds whose one operand comes out of a single child module fed only by the other operand, or by
a norm of it (pre-norm blocks), with nothing else leaving that module. Such a module can be
replaced by zeros (``prune.sublayers``). The kind (``"attention"``, ``"mlp"``, ``"block"``)
comes from what the module holds: an attention op the propagator recorded, a convolution.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from leantorch.compress.graph.fx import op_name, shape_of, stack_paths
from leantorch.compress.graph.propagation import IGNORED

if TYPE_CHECKING:
    from leantorch.compress.graph.propagation import Propagator

__all__ = ["Sublayer", "find_sublayers", "is_norm"]


@dataclass
class Sublayer:
    """A residual branch ``x + f(x)`` whose module ``path`` computes ``f`` entirely (pre-norm
    blocks: attention or MLP), so replacing it by zeros removes the sublayer. ``norm`` is the
    module whose output only feeds the branch (becomes dead when the branch goes)."""

    path: str
    kind: str  # "attention" | "mlp" | "block" (a convolutional residual block)
    norm: str | None
    add_scope: str



_NORM_TYPES = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm,
               nn.modules.instancenorm._InstanceNorm)


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer: torch's layer, RMS, group, batch or
    instance norm, or any class with ``Norm`` in its name (transformers' own norms)."""
    return isinstance(module, _NORM_TYPES) or "Norm" in type(module).__name__



_THROUGH = {"aten.dropout", "aten.dropout_", "aten.alias", "aten.clone", "aten.to",
            "aten._to_copy", "aten.contiguous"}


def _walk_back(node: Any) -> Any:
    """Through ops that do not change values (dropout in eval, dtype no-ops, aliases)."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.args and \
            op_name(node.target) in _THROUGH:
        node = node.args[0]
    return node


def find_sublayers(program: Any, p: Propagator, model: nn.Module) -> list[Sublayer]:
    """Residual adds ``x + f(x)`` where ``f`` runs entirely inside one child module whose input
    is ``x`` or ``norm(x)`` (pre-norm blocks)."""
    graph = program.graph
    inside: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_function":
            for path in stack_paths(node):
                inside.setdefault(path, []).append(node)
    members = {path: set(nodes) for path, nodes in inside.items()}

    def external_inputs(path: str) -> set[Any]:
        own = members.get(path, set())
        return {arg for n in own for arg in n.all_input_nodes if arg not in own}

    found: dict[str, Sublayer] = {}
    for node in graph.nodes:
        if node.op != "call_function" or op_name(node.target) not in ("aten.add", "aten.add_"):
            continue
        operands = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
        if len(operands) != 2:
            continue
        shapes = [shape_of(a.meta.get("val")) for a in operands]
        if shapes[0] is None or shapes[0] != shapes[1]:
            continue
        scope = stack_paths(node)
        for branch, residual in (operands, operands[::-1]):
            source = _walk_back(branch)
            stack = stack_paths(source) if isinstance(source, torch.fx.Node) else []
            if len(stack) <= len(scope) or stack[:len(scope)] != scope:
                continue
            path = stack[len(scope)]
            if not path or path in found:
                continue
            module = model.get_submodule(path)
            if next(module.parameters(), None) is None or \
                    residual in members.get(path, set()):
                continue
            own = members.get(path, set())
            chain = {branch, source}
            walker = branch
            while walker is not source:
                walker = walker.args[0]
                chain.add(walker)
            if not _closed(own, chain):
                continue
            root = _walk_back(residual)
            norm = None
            fed = False
            for arg in external_inputs(path):
                if _walk_back(arg) is root:
                    fed = True
                    continue
                arg_stack = stack_paths(arg)
                norms = [q for q in arg_stack if q and is_norm(model.get_submodule(q))]
                if norms and root in {_walk_back(a) for a in external_inputs(norms[-1])} | \
                        {_walk_back(a) for a in members.get(norms[-1], set())}:
                    fed = True
                    if all(u in own for u in arg.users):
                        norm = norms[-1]
            if not fed:
                continue
            if any(s["module"] == path or s["module"].startswith(path + ".")
                   for s in p.attention):
                kind = "attention"
            elif any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules()):
                kind = "block"
            else:
                kind = "mlp"
            found[path] = Sublayer(path, kind, norm, scope[-1] if scope else "")
            break
    return list(found.values())


def _closed(own: set[torch.fx.Node], out: set[torch.fx.Node]) -> bool:
    """Only the branch output (``out``: it and the pass-through ops before it) leaves the
    module; other results are unused or only checked."""
    for node in own:
        if node in out:
            continue
        for user in node.users:
            if user in own:
                continue
            if user.op == "call_function" and (op_name(user.target) in IGNORED or
                                               (user.target is operator.getitem and
                                                not user.users)):
                continue
            if user in out:
                continue
            return False
    return True
