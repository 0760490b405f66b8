"""Small readers of torch.fx nodes from an exported program, shared by the propagation, the op
rules and the sublayer search: an op's name, its arguments by schema name, the shape of a
value, and the module paths that ran it (``nn_module_stack``)."""

from __future__ import annotations

import re
from typing import Any

import torch

__all__ = ["bind", "clean_path", "module_of", "op_name", "shape_of", "stack_paths"]


def shape_of(value: Any) -> tuple[int, ...] | None:
    """The shape of a tensor value (``node.meta["val"]``); ``None`` for anything else."""
    if isinstance(value, torch.Tensor):
        return tuple(int(s) for s in value.shape)
    return None


def op_name(target: Any) -> str:
    """``"aten.linear"`` for ``aten.linear.default`` (the overload dropped): rules are keyed by
    this name."""
    if isinstance(target, torch._ops.OpOverload):
        text = str(target)  # aten.linear.default
        return text.rsplit(".", 1)[0]
    if isinstance(target, torch._ops.OpOverloadPacket):
        return str(target)
    return getattr(target, "__name__", str(target))


def bind(node: torch.fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name (defaults filled in)."""
    schema = node.target._schema
    bound: dict[str, Any] = {}
    positional = list(node.args)
    for index, argument in enumerate(schema.arguments):
        if index < len(positional) and not argument.kwarg_only:
            bound[argument.name] = positional[index]
        elif argument.name in node.kwargs:
            bound[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            bound[argument.name] = argument.default_value
        else:
            bound[argument.name] = None
    return bound


def module_of(node: torch.fx.Node) -> tuple[str, str]:
    """(path, class name) of the innermost module running ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return clean_path(path), name.rsplit(".", 1)[-1]


def clean_path(path: str) -> str:
    """A module path as ``named_modules`` spells it."""
    # non-strict export records plain dotted paths; strict mode writes L['self'].a.b
    path = re.sub(r"^L\['self'\]\.?", "", path)
    return re.sub(r"\[(\d+)\]", r".\1", path).strip(".")


def stack_paths(node: torch.fx.Node) -> list[str]:
    """Paths of the modules running ``node``, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [clean_path(p) for p, _ in stack.values()]
