"""Persistent weight masks and unstructured magnitude pruning.

A mask is a :class:`WeightMask` parametrization (``torch.nn.utils.parametrize``): the module's
``weight`` becomes ``where(mask, original, 0)``. The optimiser updates ``original``, but the
weight the module uses is recomputed from the mask on every access, so a pruned weight stays
exactly 0 through any number of SGD (momentum, weight decay) or Adam steps, and its gradient is
exactly 0. :func:`make_permanent` bakes the masks in (plain ``nn.Parameter`` with zeros).

Masks compose: pruning an already-masked weight again ranks only the surviving entries, so the
masks of successive calls are nested (what iterative pruning and lottery tickets need).

Counting rule (used by every mask builder here): a ratio ``r`` over ``n`` weights prunes exactly
``round(r * n)`` of them; ties in the score are broken by position (the earlier entry, in
flattened order and, for global pruning, in module order, is pruned first), so the result is
deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from leantorch import validate
from leantorch.compress.change import Change, apply_transform, select_modules
from leantorch.compress.registry import register_transform
from leantorch.errors import LeanError, LeanTypeError, describe
from leantorch.serialize import register_module

__all__ = [
    "WeightMask",
    "get_mask",
    "input_dim",
    "lowest_k",
    "magnitude",
    "make_permanent",
    "mask_stats",
    "own_class",
    "prunable_modules",
    "prune_magnitude",
    "prune_scores",
    "set_mask",
]


@register_module(name="leantorch.WeightMask")
class WeightMask(nn.Module):
    """Parametrization ``weight -> where(mask, weight, 0)``.

    ``mask``: a bool buffer with the weight's shape (True = kept). ``torch.where`` rather than a
    product so a pruned entry is exactly +0 whatever the original holds (even inf or NaN) and
    its gradient is exactly 0.
    """

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(tuple(shape), dtype=torch.bool))

    def spec(self) -> dict[str, Any]:
        """``{"shape": the mask's (and weight's) shape as a list}``."""
        return {"shape": list(self.mask.shape)}

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (the mask's shape) -> the same tensor with masked entries set to 0."""
        return torch.where(self.mask, weight, 0.0)

    def extra_repr(self) -> str:
        kept = int(self.mask.sum())
        return f"shape={list(self.mask.shape)}, kept={kept}/{self.mask.numel()}"


# --------------------------------------------------------------------------- which weights
def _is_transformers_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a Linear whose weight is stored (in, out)."""
    cls = type(module)
    if parametrize.is_parametrized(module):  # parametrize swaps in a subclass of the class
        cls = cls.__bases__[0]
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_prunable(module: nn.Module) -> bool:
    """Linear, Conv1d/2d/3d and transformers' Conv1D: the layers whose ``weight`` is pruned."""
    return isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d) or \
        _is_transformers_conv1d(module)


def input_dim(module: nn.Module) -> int:
    """The weight dimension that runs along the layer's input: 1 for Linear and convolutions
    (``(out, in, *kernel)``), 0 for transformers' Conv1D (``(in, out)``)."""
    return 0 if _is_transformers_conv1d(module) else 1


def _tied_weights(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every ``path.name`` it is reachable under (tied weights appear twice)."""
    owners: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, parametrize.ParametrizationList):
            continue
        for name, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append(f"{path}.{name}" if path else name)
    return owners


def prunable_modules(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    skipped: dict[str, str] | None = None,
) -> list[tuple[str, nn.Module]]:
    """Prunable layers (see :func:`is_prunable`) selected by ``include``/``exclude`` globs over
    module paths. A layer whose weight is tied to another module's (GPT-2's ``lm_head`` and the
    token embedding) is left out and, when ``skipped`` is given, noted there with the reason:
    masking it would silently mask, or not mask, the other use."""
    owners = _tied_weights(model)
    chosen = []
    for path, module in _select(model, include, exclude):
        if not is_prunable(module):
            continue
        original = _original(module)
        names = owners.get(id(original), [])
        if len(names) > 1:
            if skipped is not None:
                others = ", ".join(n for n in names if n != f"{path}.weight")
                skipped[path] = f"weight is tied to {others}; untie it to prune this layer"
            continue
        chosen.append((path, module))
    return chosen


def _select(
    model: nn.Module,
    include: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
) -> list[tuple[str, nn.Module]]:
    """:func:`select_modules`, plus the model itself (path ``""``) when it is a single layer
    and no ``include`` pattern narrows the choice."""
    chosen = list(select_modules(model, nn.Module, include, exclude))
    if include is None and (is_prunable(model) or get_mask(model) is not None):
        chosen.insert(0, ("", model))
    return chosen


# --------------------------------------------------------------------------- masks on modules
def _original(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The tensor the optimiser updates: ``parametrizations.<name>.original`` when
    parametrized, the plain parameter otherwise."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, name)


def _mask_entry(module: nn.Module, name: str = "weight") -> WeightMask | None:
    if not parametrize.is_parametrized(module, name):
        return None
    for entry in module.parametrizations[name]:
        if isinstance(entry, WeightMask):
            return entry
    return None


def get_mask(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """The bool mask on ``module.<name>`` (True = kept), or None when it is not masked."""
    entry = _mask_entry(module, name)
    return None if entry is None else entry.mask


def own_class(module: nn.Module) -> None:
    """Give a parametrized ``module`` a class of its own before its parametrizations change.

    ``parametrize`` keeps each parametrized tensor as a property on a class made for the
    module, and ``copy.deepcopy`` shares that class between the copy and the original: without
    this, removing (or adding) a parametrization on a copy would remove (or add) the property
    on the caller's model too."""
    cls = type(module)
    if parametrize.is_parametrized(module):
        module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))


def set_mask(module: nn.Module, mask: torch.Tensor, name: str = "weight") -> None:
    """Mask ``module.<name>`` with ``mask`` (bool, the tensor's shape). An existing mask is
    intersected with the new one (masks only ever shrink), so successive prunings nest."""
    weight = getattr(module, name)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise LeanTypeError(f"set_mask: mask must be a bool tensor, got {describe(mask)}")
    if mask.shape != weight.shape:
        raise LeanError(f"set_mask: mask shape {list(mask.shape)} does not match "
                        f"{name} shape {list(weight.shape)}")
    entry = _mask_entry(module, name)
    if entry is None:
        entry = WeightMask(weight.shape).to(weight.device)
        entry.mask.copy_(mask)
        own_class(module)
        parametrize.register_parametrization(module, name, entry)
    else:
        entry.mask.logical_and_(mask.to(entry.mask.device))


def _scores(module: nn.Module) -> torch.Tensor:
    """|w| of the weight as the module uses it, with already-pruned entries scored -1 so they
    are pruned first (and counted toward the target). Float32 or wider, so ties are real."""
    weight = _original(module).detach()
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    scores = weight.abs().to(dtype)
    mask = get_mask(module)
    if mask is not None:
        scores = torch.where(mask, scores, -1.0)
    return scores


def lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool tensor (``scores``' shape), True at the ``k`` lowest scores. Ties are broken by
    position in flattened order (earlier first), so the count is exactly ``k``."""
    flat = scores.reshape(-1)
    n = flat.numel()
    if not 0 <= k <= n:
        raise LeanError(f"lowest_k: k must be in [0, {n}], got {k}")
    chosen = torch.zeros(n, dtype=torch.bool, device=flat.device)
    if k == n:
        chosen.fill_(True)
    elif k > 0:
        threshold = torch.kthvalue(flat, k).values
        chosen = flat < threshold
        ties = torch.nonzero(flat == threshold).flatten()
        chosen[ties[: k - int(chosen.sum())]] = True
    return chosen.reshape(scores.shape)


def _count(ratio: float, n: int) -> int:
    return min(n, max(0, round(ratio * n)))


def _check_scope(name: str, scope: Any, allowed: Sequence[str]) -> str:
    if scope not in allowed:
        raise LeanError(f"{name}: scope must be one of {', '.join(map(repr, allowed))}, got "
                        f"{describe(scope)}")
    return scope


def prune_scores(
    scores: dict[str, torch.Tensor], ratio: float, scope: str = "layer"
) -> dict[str, torch.Tensor]:
    """Keep masks from scores (the readable core of magnitude pruning).

    scores: ``{path: tensor}``, higher = more important; an entry that is already pruned must
    score below every live one (the module helpers use -1 for it). ``scope="layer"`` prunes
    ``round(ratio * n_l)`` of every tensor; ``"global"`` prunes ``round(ratio * sum n_l)``
    lowest scores over all of them together (ties: earlier path, then earlier position).
    Returns ``{path: bool keep mask}``.
    """
    ratio = validate.ratio("prune_scores", "ratio", ratio, include_high=True)
    _check_scope("prune_scores", scope, ("layer", "global"))
    if scope == "layer":
        return {path: ~lowest_k(s, _count(ratio, s.numel())) for path, s in scores.items()}
    if not scores:
        return {}
    dtype = torch.float64 if any(s.dtype == torch.float64 for s in scores.values()) \
        else torch.float32
    flat = torch.cat([s.reshape(-1).to(dtype).cpu() for s in scores.values()])
    pruned = lowest_k(flat, _count(ratio, flat.numel()))
    masks, start = {}, 0
    for path, s in scores.items():
        masks[path] = ~pruned[start:start + s.numel()].reshape(s.shape).to(s.device)
        start += s.numel()
    return masks


def mask_stats(model: nn.Module) -> dict[str, dict[str, int | float]]:
    """Per masked weight ``{path: {kept, total, sparsity}}`` plus ``"total"`` over them all."""
    stats: dict[str, dict[str, int | float]] = {}
    kept_all = total_all = 0
    for path, module in model.named_modules():
        mask = get_mask(module)
        if mask is None:
            continue
        kept, total = int(mask.sum()), mask.numel()
        stats[path] = {"kept": kept, "total": total, "sparsity": 1 - kept / total}
        kept_all, total_all = kept_all + kept, total_all + total
    stats["total"] = {"kept": kept_all, "total": total_all,
                      "sparsity": 1 - kept_all / total_all if total_all else 0.0}
    return stats


def _record_sparsity(target: nn.Module, change: Change) -> None:
    stats = mask_stats(target)
    change.details["sparsity"] = {p: round(s["sparsity"], 6) for p, s in stats.items()}
    change.details["kept"] = stats["total"]["kept"]
    change.details["total"] = stats["total"]["total"]


# --------------------------------------------------------------------------- transforms
@register_transform("prune.magnitude")
def magnitude(
    model: nn.Module,
    *,
    ratio: float = 0.5,
    scope: str = "layer",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    example_inputs: Any = None,
    inplace: bool = False,
) -> tuple[nn.Module, Change]:
    """Unstructured magnitude pruning: mask the smallest ``|w|`` of every Linear / Conv weight.

    An already-masked weight keeps its mask and loses more entries until it reaches the
    target; a layer already sparser than the target is left as it is. Biases are never pruned.

    Args:
        ratio: fraction of weights removed, ``round(ratio * n)`` exactly (0 leaves the model as
            it is, with no parametrization).
        scope: ``"layer"`` (every layer loses ``ratio`` of its weights) or ``"global"`` (one
            threshold over all selected layers).
        include: ``fnmatch`` globs over module paths (``"encoder.layer.*"``); only
            Linear / Conv layers matching one are changed (None: all of them).
        exclude: globs of module paths left as they are, even when ``include`` matches.
    """
    ratio = validate.ratio("prune.magnitude", "ratio", ratio, include_high=True)
    _check_scope("prune.magnitude", scope, ("layer", "global"))

    def edit(target: nn.Module, change: Change) -> None:
        if ratio == 0:
            return
        modules = prunable_modules(target, include, exclude, change.skipped)
        if not modules:
            raise LeanError("prune.magnitude: no Linear or Conv layer matches include="
                            f"{include!r}, exclude={exclude!r}")
        scores = {path: _scores(module) for path, module in modules}
        masks = prune_scores(scores, ratio, scope)
        for path, module in modules:
            set_mask(module, masks[path])
            change.replaced.append(path)
        _record_sparsity(target, change)

    return apply_transform("prune.magnitude", model, edit,
                           params={"ratio": ratio, "scope": scope, "include": include,
                                   "exclude": exclude},
                           example_inputs=example_inputs, inplace=inplace)


# the family-prefixed public name (registry names are <family>.<function name>; see
# leantorch.compress.registry)
prune_magnitude = magnitude


def _bake(module: nn.Module, name: str = "weight") -> None:
    """Replace the parametrized ``name`` by a plain parameter holding the masked values."""
    own_class(module)
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)


@register_transform("prune.make_permanent")
def make_permanent(
    model: nn.Module,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    example_inputs: Any = None,
    inplace: bool = False,
) -> tuple[nn.Module, Change]:
    """Bake every :class:`WeightMask` in: the parametrization is removed and the weight becomes
    a plain ``nn.Parameter`` that is 0 where the mask was False. Outputs are unchanged; the
    optimiser can revive the zeros from here on. Other parametrizations stacked on the same
    weight are baked in with it (``remove_parametrizations`` works per tensor).

    Args:
        include: ``fnmatch`` globs over module paths (``"encoder.layer.*"``); only
            masked layers matching one are changed (None: all of them).
        exclude: globs of module paths left as they are, even when ``include`` matches.
    """

    def edit(target: nn.Module, change: Change) -> None:
        for path, module in _select(target, include, exclude):
            if get_mask(module) is not None:
                _bake(module)
                change.replaced.append(path)

    return apply_transform("prune.make_permanent", model, edit,
                           params={"include": include, "exclude": exclude},
                           example_inputs=example_inputs, inplace=inplace)
