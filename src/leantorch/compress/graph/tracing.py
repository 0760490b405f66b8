"""Tracing: the model's forward as an aten graph, by ``torch.export`` (non-strict, on the
example inputs).

:func:`export_model` exports the model in eval mode (or training mode), with any leaf modules
swapped for :class:`_LeafStandIn`: a module whose forward is one opaque custom op,
``leantorch::graph_leaf``, whose fake kernel returns the output shapes recorded on one real
forward (the graph then blocks everything entering or leaving it, see the ``leaf`` rule in
:mod:`.rules.layers`). The model is restored afterwards (mode, modules, no hooks left, the
caller's RNG untouched). When export fails, :func:`untraceable` names the innermost module that
was running (kept by :func:`module_path_stack`) and says how to make it a leaf.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from leantorch.errors import LeanError

__all__ = ["export_model", "module_path_stack", "untraceable"]

_LEAF_OUTPUTS: dict[int, list[tuple[tuple[int, ...], torch.dtype]]] = {}


@torch.library.custom_op("leantorch::graph_leaf", mutates_args=())
def _graph_leaf(inputs: list[torch.Tensor], key: int) -> list[torch.Tensor]:
    """Stand-in for a leaf module during tracing (never run for real)."""
    raise LeanError("leantorch::graph_leaf only exists while a dependency graph is traced")


@_graph_leaf.register_fake
def _graph_leaf_fake(inputs: list[torch.Tensor], key: int) -> list[torch.Tensor]:
    device = inputs[0].device if inputs else torch.device("cpu")
    return [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in _LEAF_OUTPUTS[key]]


class _LeafStandIn(nn.Module):
    """Replaces a leaf module while tracing: one opaque op with the recorded output shapes."""

    def __init__(self, key: int, spec: Any, path: str) -> None:
        super().__init__()
        self.key, self.spec, self.path = key, spec, path

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = torch.ops.leantorch.graph_leaf(tensors, self.key)
        return tree_unflatten(list(outputs), self.spec)


def module_path_stack(model: nn.Module) -> tuple[list[str], list[Any]]:
    """Hooks that keep the stack of modules being run (the innermost one left on the stack
    when a forward raises tells which module could not be traced)."""
    stack: list[str] = []
    handles = []
    for path, module in model.named_modules():
        def pre(_m: nn.Module, _args: Any, path: str = path) -> None:
            stack.append(path)

        def post(_m: nn.Module, _args: Any, _out: Any, path: str = path) -> None:
            if stack and stack[-1] == path:
                stack.pop()
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    return stack, handles


def _leaf_outputs(model: nn.Module, leaves: dict[str, nn.Module], args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> dict[str, Any]:
    """Each leaf's output on one real forward (the stand-ins reproduce their shapes)."""
    recorded: dict[str, Any] = {}
    handles = []
    for path, module in leaves.items():
        def hook(_m: nn.Module, _a: Any, out: Any, path: str = path) -> None:
            recorded.setdefault(path, out)
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    for path, out in ((p, recorded.get(p)) for p in leaves):
        if out is None:
            raise LeanError(f"leaf_modules: {path!r} did not run on the example inputs")
        if not all(isinstance(t, torch.Tensor) for t in tree_flatten(out)[0]):
            raise LeanError(f"leaf_modules: {path!r} returns something other than tensors "
                            f"({type(out).__name__}); only modules returning tensors (or "
                            "tuples/lists of them) can be leaves")
    return recorded


def export_model(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
            leaf_modules: Sequence[str], training: bool = False) -> Any:
    """torch.export the model in eval mode (``training``: in training mode), leaf modules
    swapped for opaque stand-ins, all restored afterwards. The leaves' output shapes are
    recorded on one eval-mode forward in both modes (a training-mode forward would update
    BatchNorm statistics)."""
    from leantorch.compress.change import get_module, replace_module

    leaves = {}
    for path in leaf_modules:
        if not path:
            raise LeanError("leaf_modules: '' is the whole model; name a submodule")
        try:
            leaves[path] = get_module(model, path)
        except LeanError as error:
            raise LeanError(f"leaf_modules: no module at path {path!r} in "
                            f"{type(model).__name__}") from error
    was_training = model.training
    model.eval()
    swapped: list[str] = []
    handles: list[Any] = []
    try:
        recorded = _leaf_outputs(model, leaves, args, kwargs) if leaves else {}
        for path, module in leaves.items():
            flat, spec = tree_flatten(recorded[path])
            _LEAF_OUTPUTS[id(module)] = [(tuple(t.shape), t.dtype) for t in flat]
            replace_module(model, path, _LeafStandIn(id(module), spec, path))
            swapped.append(path)
        stack, handles = module_path_stack(model)
        model.train(training)
        try:
            # fake tensors run the forward, so buffers keep their values; the RNG is forked
            # anyway so that tracing dropout never shifts the caller's random stream
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                # nn.LSTM re-caches its weights in forward; export warns about that list
                warnings.filterwarnings("ignore", message=r"The tensor attributes .*_flat_weights")
                return torch.export.export(model, args, kwargs, strict=False)
        except Exception as error:
            raise untraceable(model, stack, error) from error
    finally:
        for handle in handles:
            handle.remove()
        for path in reversed(swapped):
            replace_module(model, path, leaves[path])
        for module in leaves.values():
            _LEAF_OUTPUTS.pop(id(module), None)
        model.train(was_training)


def untraceable(model: nn.Module, stack: list[str], error: Exception) -> LeanError:
    """The LeanError for a ``torch.export`` failure ``error``: names the innermost module on
    ``stack`` being traced when it failed and how to get past it (a leaf module, or a
    traceable forward)."""
    first = " ".join(str(error).split())[:300]
    if stack:
        path = stack[-1]
        kind = type(model.get_submodule(path)).__name__ if path else type(model).__name__
        where = f"the module at {path!r} ({kind})" if path else f"the model's own forward ({kind})"
        hint = (f"mark it as a leaf: build_graph(model, inputs, leaf_modules=[{path!r}]) (its "
                "tensors are then never cut), or make its forward traceable by torch.export "
                "(no data-dependent Python control flow, no .item() / .tolist() / numpy)")
        if not path:
            hint = ("make the forward traceable by torch.export (no data-dependent Python control "
                    "flow, no .item() / .tolist() / numpy), or mark the failing submodule as a leaf")
        return LeanError(f"build_graph: torch.export could not trace {where}: "
                         f"{type(error).__name__}: {first}; {hint}")
    return LeanError(f"build_graph: torch.export could not trace the model: "
                     f"{type(error).__name__}: {first}")
