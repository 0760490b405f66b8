"""How much each unit of a group matters: the scoring half of structured pruning.

An importance maps each group to a ``(group.size,)`` score vector (low = cut first). Every
score is summed over all the tensors a unit occupies, so a head is judged by its query, key,
value rows and its output-projection columns together.

- ``"l1"`` / ``"l2"``: group magnitude, ``sum |w|`` or ``sqrt(sum w^2)`` over the unit's slices
  of every weight (biases and buffers left out).
- ``"bn"``: ``|gamma|`` of the unit's normalisation layers (BatchNorm scale; network slimming);
  groups without one fall back to ``"l1"``.
- ``"taylor"``: first-order Taylor, ``sum over batches (sum_slice w * dL/dw)^2`` (Molchanov et
  al. 2019), the estimated loss change of removing the unit (:func:`taylor_saliency`, shared
  with block pruning). Needs calibration batches. With ``loss_fn(output, batch)`` the loss is
  yours; without it the model's own ``.loss`` when the batches carry labels, else a fixed
  random projection of the model's output, so the score estimates how much the output moves
  (expected squared change) when the unit goes.
- ``"random"``: uniform scores from ``seed`` (the control).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from leantorch.compress.graph import DependencyGraph, Group, TensorSlice, default_inputs
from leantorch.compress.verify import primary_output
from leantorch.errors import LeanError, LeanTypeError, describe

__all__ = ["IMPORTANCES", "LossFn", "check_loss_fn", "group_scores", "score_groups",
           "taylor_saliency"]

#: ``loss_fn(output, batch) -> scalar tensor``: ``output`` is what the model returned on
#: ``batch``, one calibration batch as it was given (so labels can ride along).
LossFn = Callable[[Any, Any], torch.Tensor]

IMPORTANCES = ("l1", "l2", "bn", "taylor", "random")
_WEIGHT_ROLES = ("out", "in", "param", "norm", "rows")


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    path, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(path), attr)


def _per_unit(group: Group, member: TensorSlice, per_index: torch.Tensor) -> torch.Tensor:
    """Sum ``per_index`` (one value per index of the member's dimension) into units."""
    unit_of = member.unit_of
    valid = unit_of >= 0
    out = torch.zeros(group.size, dtype=torch.float64)
    out.index_add_(0, unit_of[valid], per_index.double().cpu()[valid])
    return out


def _reduce_except(tensor: torch.Tensor, dim: int, fn: Callable[[torch.Tensor], torch.Tensor]
                   ) -> torch.Tensor:
    values = fn(tensor.detach().double())
    if values.dim() == 0:
        return values.reshape(1)
    dims = [d for d in range(values.dim()) if d != dim]
    return values.sum(dim=dims) if dims else values


def group_scores(model: nn.Module, group: Group, fn: Callable[[torch.Tensor], torch.Tensor],
                 roles: Sequence[str] = _WEIGHT_ROLES,
                 tensors: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``sum over members with a role in roles of fn(tensor)`` summed per unit: (size,)."""
    total = torch.zeros(group.size, dtype=torch.float64)
    for member in group.tensors:
        if member.role not in roles:
            continue
        tensor = tensors[member.tensor] if tensors is not None else _tensor(model, member.tensor)
        if not isinstance(tensor, nn.Parameter) and tensors is None:
            continue
        total += _per_unit(group, member, _reduce_except(tensor, member.dim, fn))
    return total


def _magnitude(model: nn.Module, groups: Sequence[Group], p: int) -> dict[int, torch.Tensor]:
    power = (lambda w: w.abs()) if p == 1 else (lambda w: w * w)
    scores = {}
    for g in groups:
        s = group_scores(model, g, power)
        scores[g.id] = s if p == 1 else s.sqrt()
    return scores


def _bn(model: nn.Module, groups: Sequence[Group]) -> tuple[dict[int, torch.Tensor], list[str]]:
    scores, fallback = {}, []
    for g in groups:
        norms = [m for m in g.tensors if m.role == "norm" and m.tensor.endswith("weight")]
        if not norms:
            fallback.append(g.name)
            scores[g.id] = group_scores(model, g, lambda w: w.abs())
            continue
        total = torch.zeros(g.size, dtype=torch.float64)
        for member in norms:
            total += _per_unit(g, member, _tensor(model, member.tensor).detach().abs())
        scores[g.id] = total
    return scores, fallback


def _random(groups: Sequence[Group], seed: int) -> dict[int, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {g.id: torch.rand(g.size, generator=generator, dtype=torch.float64) for g in groups}


def check_loss_fn(owner: str, loss_fn: Any) -> LossFn | None:
    """``loss_fn`` if it is None or a callable that can be called as ``loss_fn(output, batch)``
    (the one signature every leantorch loss hook takes: ``output`` is what the model returned,
    ``batch`` the calibration inputs it ran on, in the form they were given); otherwise a
    :class:`LeanError` naming ``owner``, what was seen and what is accepted."""
    if loss_fn is None:
        return None
    if not callable(loss_fn):
        raise LeanTypeError(f"{owner}: loss_fn={describe(loss_fn)}; expected a callable "
                            "loss_fn(output, batch) -> scalar tensor")
    try:
        signature = inspect.signature(loss_fn)
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        return loss_fn
    try:
        signature.bind(None, None)
    except TypeError as error:
        raise LeanError(f"{owner}: loss_fn{signature} cannot be called as loss_fn(output, "
                        f"batch) ({error}); expected a callable of two arguments, the model "
                        "output and the calibration batch, returning a scalar tensor") from None
    return loss_fn


def taylor_saliency(
    model: nn.Module,
    weights: Mapping[str, torch.Tensor],
    calibration: Sequence[Any],
    reduce: Callable[[dict[str, torch.Tensor]], dict[Any, torch.Tensor]],
    *,
    loss_fn: LossFn | None = None,
    seed: int = 0,
    owner: str = "importance='taylor'",
) -> dict[Any, torch.Tensor]:
    """First-order Taylor saliency (Molchanov et al. 2019), the one used by structured and
    block pruning.

    For each calibration batch ``b`` the per-weight products ``p_b[name] = w * dL_b/dw``
    (float64, shaped like ``weights[name]``) are handed to ``reduce``, which sums them over
    each unit the caller removes as one (a channel's slices, a ``b x b`` tile) and returns
    ``{key: (k,) or (r, c) tensor}``; the score of a unit is ``sum over batches of
    reduce(p_b)[key] ** 2``, the estimated squared loss change of removing it.

    The loss ``L_b`` is ``loss_fn(output, batch)`` when given (see :func:`check_loss_fn`),
    else the model's own ``output.loss`` (calibration batches that carry labels), else a fixed
    random projection (from ``seed``) of the model's primary output, so the score estimates how
    much the output moves when the unit goes.

    ``weights``: name -> leaf tensor of ``model`` (a parameter; the original of a parametrized
    weight). Gradients are taken for these alone; every parameter's ``requires_grad`` and
    ``.grad`` and the train/eval mode are restored afterwards, also when a forward raises.
    """
    if not calibration:
        raise LeanError(f"{owner} needs calibration data: a list of model inputs (each a "
                        "tensor, a tuple of positional inputs or a dict of keyword inputs), "
                        "got none")
    loss_fn = check_loss_fn(owner, loss_fn)
    chosen = {id(w) for w in weights.values()}
    everything = list(model.parameters())
    state = [(p.requires_grad, p.grad) for p in everything]
    scores: dict[Any, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(seed)
    projection: torch.Tensor | None = None
    training = model.training
    try:
        model.eval()
        for p in everything:
            p.requires_grad_(id(p) in chosen)  # only the scored weights need gradients
            p.grad = None
        for w in weights.values():
            w.requires_grad_(True)
            w.grad = None
        for batch in calibration:
            args, kwargs = default_inputs(model, batch)
            with torch.enable_grad():
                output = model(*args, **kwargs)
                if loss_fn is not None:
                    loss = loss_fn(output, batch)
                elif isinstance(getattr(output, "loss", None), torch.Tensor):
                    loss = output.loss
                else:
                    out = primary_output(output, owner, "; pass loss_fn(output, batch) -> "
                                         "scalar")
                    if projection is None or projection.shape != out.shape[-1:]:
                        projection = torch.randn(out.shape[-1], generator=generator,
                                                 dtype=out.dtype).to(out.device)
                    loss = (out * projection).sum()
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise LeanError(f"{owner}: the loss is {describe(loss)}; expected a scalar "
                                    "tensor from loss_fn(output, batch)")
                loss.backward()
            products = {name: (w.detach() * w.grad).double() for name, w in weights.items()
                        if w.grad is not None}
            for key, value in reduce(products).items():
                square = value.double() ** 2
                scores[key] = scores[key] + square if key in scores else square
            for w in weights.values():
                w.grad = None
    finally:
        for p, (flag, grad) in zip(everything, state, strict=True):
            p.requires_grad_(flag)
            p.grad = grad
        model.train(training)
    return scores


def _taylor(model: nn.Module, groups: Sequence[Group], calibration: Sequence[Any],
            loss_fn: LossFn | None, seed: int) -> dict[int, torch.Tensor]:
    params = dict(model.named_parameters())
    names = sorted({m.tensor for g in groups for m in g.tensors if m.tensor in params})

    def per_unit(products: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
        sums = {}
        for g in groups:
            z = torch.zeros(g.size, dtype=torch.float64)
            for member in g.tensors:
                if member.tensor not in products:
                    continue
                product = products[member.tensor]
                dims = [d for d in range(product.dim()) if d != member.dim]
                per_index = product.sum(dim=dims) if dims else product
                z += _per_unit(g, member, per_index)
            sums[g.id] = z
        return sums

    scores = taylor_saliency(model, {n: params[n] for n in names}, calibration, per_unit,
                             loss_fn=loss_fn, seed=seed)
    return {g.id: scores.get(g.id, torch.zeros(g.size, dtype=torch.float64)) for g in groups}


def score_groups(
    model: nn.Module,
    graph: DependencyGraph,
    groups: Sequence[Group],
    importance: str | Callable[..., dict[int, torch.Tensor]] = "l2",
    *,
    calibration: Sequence[Any] | None = None,
    loss_fn: LossFn | None = None,
    seed: int = 0,
) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """Scores ``{group id: (size,) float64}`` for ``groups`` and notes about how they were made.

    ``importance`` is a name (see the module docstring) or a callable
    ``fn(model, graph, groups, calibration=...) -> {group id: scores}``."""
    notes: dict[str, Any] = {}
    if callable(importance):
        scores = importance(model, graph, groups, calibration=calibration)
    elif importance == "l1":
        scores = _magnitude(model, groups, 1)
    elif importance == "l2":
        scores = _magnitude(model, groups, 2)
    elif importance == "bn":
        scores, fallback = _bn(model, groups)
        if fallback:
            notes["bn_fallback_to_l1"] = fallback
    elif importance == "taylor":
        scores = _taylor(model, groups, calibration or [], loss_fn, seed)
    elif importance == "random":
        scores = _random(groups, seed)
    else:
        raise LeanError(f"importance must be one of {', '.join(IMPORTANCES)} or a callable, got "
                        f"{importance!r}")
    for g in groups:
        s = scores.get(g.id)
        if s is None or tuple(s.shape) != (g.size,):
            raise LeanError(f"importance {importance!r} gave no (size,) scores for group "
                            f"{g.name!r}")
    return scores, notes
