"""Remove whole sublayers (the attention or the MLP of a pre-norm block), FinerCut-style.

FinerCut (Zhang et al., 2024) treats every attention and every MLP sublayer of a transformer
as a removal candidate and greedily removes, one at a time, the sublayer whose removal changes
the model's outputs on calibration data the least, given the ones already removed. A sublayer
is a residual branch ``x + f(norm(x))``: removing it leaves ``x`` (the branch contributes
zero). The dependency graph finds these branches (:meth:`DependencyGraph.sublayers`: the add
of a residual with the output of one child module that computes its branch entirely), so
this works for any pre-norm model (GPT-2, Llama, ViT, Mistral...) and for residual blocks of
CNNs with identity shortcuts; post-norm blocks (BERT) have no such branch and are skipped.

The removed module is replaced by :class:`ZeroBranch` (zeros shaped like its input, no
parameters) and the norm that only fed it by ``nn.Identity``, so both stop costing anything.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten

from leantorch import validate
from leantorch.compress.change import Change, _patterns, apply_transform, replace_module
from leantorch.compress.graph import Sublayer, build_graph, default_inputs
from leantorch.compress.registry import register_transform
from leantorch.compress.verify import primary_output
from leantorch.errors import LeanError, describe
from leantorch.serialize import register_module

__all__ = ["METRICS", "ZeroBranch", "prune_sublayers", "sublayer_scores"]

METRICS = ("cosine", "mse")


@register_module(name="leantorch.ZeroBranch")
class ZeroBranch(nn.Module):
    """A removed residual branch: returns zeros shaped like its first tensor input (the hidden
    states), alone (``returns="tensor"``) or first in a tuple of ``length`` with ``None`` for
    the rest (what attention modules return).

    forward(hidden_states: (..., dim), *args, **kwargs) -> zeros (..., dim)
    """

    def __init__(self, returns: str = "tensor", length: int = 1) -> None:
        super().__init__()
        if returns not in ("tensor", "tuple"):
            raise LeanError(f"ZeroBranch: returns must be 'tensor' or 'tuple', got {returns!r}")
        self.returns, self.length = returns, int(length)

    def spec(self) -> dict[str, Any]:
        """``{"returns": "tensor" or "tuple", "length": tuple length}``."""
        return {"returns": self.returns, "length": self.length}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``hidden_states (..., dim)`` (by keyword, else the first floating tensor argument) ->
        zeros ``(..., dim)``, or ``(zeros, None, ...)`` of ``length`` when ``returns="tuple"``."""
        hidden = kwargs.get("hidden_states")
        if hidden is None:
            hidden = next(t for t in tree_flatten((args, kwargs))[0]
                          if isinstance(t, torch.Tensor) and t.is_floating_point())
        zeros = torch.zeros_like(hidden)
        if self.returns == "tensor":
            return zeros
        return (zeros,) + (None,) * (self.length - 1)

    def extra_repr(self) -> str:
        return f"returns={self.returns}, length={self.length}"


def _zero_hook(_module: nn.Module, _args: Any, output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return torch.zeros_like(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (torch.zeros_like(output[0]), *tuple(output[1:]))
    raise LeanError(f"prune.sublayers: cannot zero an output of type {type(output).__name__}")


def _run(model: nn.Module, calibration: Sequence[Any], zeroed: Sequence[str]) -> list[torch.Tensor]:
    handles = [model.get_submodule(p).register_forward_hook(_zero_hook) for p in zeroed]
    try:
        outputs = []
        with torch.no_grad():
            for batch in calibration:
                args, kwargs = default_inputs(model, batch)
                outputs.append(primary_output(model(*args, **kwargs), "prune.sublayers")
                               .detach().double())
        return outputs
    finally:
        for handle in handles:
            handle.remove()


def _distance(metric: str, outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    total = 0.0
    for out, ref in zip(outputs, reference, strict=True):
        if metric == "cosine":
            a, b = out.reshape(-1, out.shape[-1]), ref.reshape(-1, ref.shape[-1])
            total += float((1 - F.cosine_similarity(a, b, dim=-1)).clamp_min(0).mean())
        else:
            total += float(((out - ref) ** 2).mean() / (ref ** 2).mean().clamp_min(1e-300))
    return total / len(reference)


def sublayer_scores(model: nn.Module, candidates: Sequence[str], calibration: Sequence[Any],
                    removed: Sequence[str] = (), metric: str = "cosine") -> dict[str, float]:
    """How much the output moves (``metric``: mean ``1 - cosine`` over output rows, or MSE
    relative to the output's mean square) when each candidate sublayer is removed on top of
    ``removed``, on the calibration batches. 0 means the sublayer contributes nothing."""
    if metric not in METRICS:
        raise LeanError(f"prune.sublayers: metric must be one of {', '.join(METRICS)}, got "
                        f"{metric!r}")
    training = model.training
    model.eval()
    try:
        reference = _run(model, calibration, [])
        return {path: _distance(metric, _run(model, calibration, [*removed, path]), reference)
                for path in candidates}
    finally:
        model.train(training)


def _return_structure(model: nn.Module, path: str, batch: Any) -> tuple[str, int]:
    seen: list[Any] = []

    def hook(_m: nn.Module, _a: Any, out: Any) -> None:
        seen.append(out)

    handle = model.get_submodule(path).register_forward_hook(hook)
    try:
        with torch.no_grad():
            args, kwargs = default_inputs(model, batch)
            model(*args, **kwargs)
    finally:
        handle.remove()
    out = seen[0]
    if isinstance(out, torch.Tensor):
        return "tensor", 1
    if isinstance(out, tuple):
        return "tuple", len(out)
    raise LeanError(f"prune.sublayers: {path} returns {type(out).__name__}; only modules "
                    "returning a tensor or a tuple can be removed")


@register_transform("prune.sublayers")
def sublayers(
    model: nn.Module,
    *,
    count: int | None = None,
    ratio: float | None = None,
    kinds: str | Sequence[str] = ("attention", "mlp", "block"),
    metric: str = "cosine",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    leaf_modules: Sequence[str] | None = None,
    example_inputs: Any = None,
    calibration: Sequence[Any] | None = None,
    inplace: bool = False,
) -> tuple[nn.Module, Change]:
    """Greedily remove ``count`` sublayers (or ``ratio`` of the candidates), each time the one
    whose removal changes the calibration outputs least (FinerCut).
    ``change.details["order"]`` lists the removals with the output distance after each.

    Args:
        count: sublayers to remove. Exactly one of ``count`` and ``ratio`` is given.
        ratio: fraction of the candidate sublayers to remove (rounded down), in [0, 1).
        kinds: "attention", "mlp", "block" (a convolutional residual block with an identity
            shortcut).
        metric: how far the outputs move: ``"cosine"`` (mean ``1 - cosine`` over output
            rows) or ``"mse"`` (mean squared error over the original output's mean square).
        include: ``fnmatch`` globs over the sublayers' module paths (as every transform's);
            candidates must match one (None: all).
        exclude: globs of sublayer paths never removed.
        leaf_modules: modules the dependency graph treats as black boxes when it finds the
            sublayers (see ``build_graph``).
    """
    if (count is None) == (ratio is None):
        raise LeanError("prune.sublayers: give exactly one of count or ratio")
    if count is not None:
        validate.positive_int("prune.sublayers", "count", count, minimum=0)
    if ratio is not None:
        validate.ratio("prune.sublayers", "ratio", ratio)
    wanted = [kinds] if isinstance(kinds, str) else list(kinds)
    if not wanted or any(k not in ("attention", "mlp", "block") for k in wanted):
        raise LeanError(f"prune.sublayers: kinds must be among attention, mlp, block, got "
                        f"{describe(kinds)}")
    if metric not in METRICS:
        raise LeanError(f"prune.sublayers: metric must be one of {', '.join(METRICS)}, got "
                        f"{metric!r}")
    if not calibration:
        raise LeanError("prune.sublayers needs calibration data: a list of model inputs "
                        "(each a tuple of positional inputs or a dict of keyword inputs)")
    inputs = example_inputs if example_inputs is not None else calibration[0]
    includes, excludes = _patterns("include", include), _patterns("exclude", exclude) or []
    params = {"count": count, "ratio": ratio, "kinds": wanted, "metric": metric,
              "include": includes, "exclude": excludes}

    def chosen(path: str) -> bool:
        if includes is not None and not any(fnmatch.fnmatchcase(path, p) for p in includes):
            return False
        return not any(fnmatch.fnmatchcase(path, p) for p in excludes)

    def edit(target: nn.Module, change: Change) -> None:
        graph = build_graph(target, inputs, leaf_modules=leaf_modules)
        found: list[Sublayer] = [s for s in graph.sublayers()
                                 if s.kind in wanted and chosen(s.path)]
        budget = count if count is not None else math.floor(ratio * len(found) + 1e-9)
        if budget > len(found):
            raise LeanError(f"prune.sublayers: count={budget} but only {len(found)} removable "
                            f"sublayers of kinds {wanted} were found: "
                            f"{[s.path for s in found]}")
        removed: list[str] = []
        order = []
        remaining = [s.path for s in found]
        for _ in range(budget):
            scores = sublayer_scores(target, remaining, calibration, removed, metric)
            best = min(remaining, key=lambda p: (scores[p], remaining.index(p)))
            removed.append(best)
            remaining.remove(best)
            order.append({"path": best, "distance": scores[best]})
        by_path = {s.path: s for s in found}
        for path in removed:
            returns, length = _return_structure(target, path, inputs)
            replace_module(target, path, ZeroBranch(returns, length))
            change.replaced.append(path)
            norm = by_path[path].norm
            if norm is not None:
                replace_module(target, norm, nn.Identity())
                change.replaced.append(norm)
        change.details["order"] = order
        change.details["candidates"] = [s.path for s in found]

    return apply_transform("prune.sublayers", model, edit, params=params,
                           example_inputs=example_inputs, inplace=inplace)


# the family-prefixed public name (registry names are <family>.<function name>; see
# leantorch.compress.registry)
prune_sublayers = sublayers
