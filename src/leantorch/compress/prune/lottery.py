"""Lottery tickets: iterative magnitude pruning with rewinding (Frankle & Carbin, 2019; rewinding
to an early step k: Frankle et al., 2020).

1. Save the weights at step ``rewind_step`` (0: the initialisation) and train to the end.
2. Prune ``rate`` of the surviving weights by magnitude (per layer or globally).
3. Reset the survivors to the saved weights; the masks stay.
4. Retrain from step ``rewind_step``; repeat for ``rounds`` rounds, so the density is
   ``(1 - rate) ** rounds`` (exactly: each round prunes ``round(rate * survivors)``).

The control the paper compares with is the same mask on a random re-initialisation
(:func:`reinitialized_state`); :func:`find_ticket` trains it beside the ticket in every round
when ``control_seed`` is given.

Training is yours: ``train(model, steps)`` trains ``model`` in place for the steps in the
``range`` ``steps`` (use ``steps.start`` for a learning-rate schedule), building its own
optimiser. Round 0 calls it twice, ``range(0, k)`` then ``range(k, total)``, so that every
round, the first included, trains from step k with a fresh optimiser.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from leantorch import validate
from leantorch.compress.prune.masks import (
    WeightMask,
    _check_scope,
    _count,
    _scores,
    get_mask,
    lowest_k,
    mask_stats,
    own_class,
    prunable_modules,
    set_mask,
)
from leantorch.errors import LeanError, LeanTypeError, describe

__all__ = [
    "LotteryResult",
    "RoundResult",
    "find_ticket",
    "prune_round",
    "reinitialized_state",
    "rewind",
    "snapshot",
]

Train = Callable[[nn.Module, range], Any]
Evaluate = Callable[[nn.Module], Any]


# --------------------------------------------------------------------------- states
def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` under its logical name (``path.weight`` for
    a masked weight, whose tensor is the parametrization's ``original``). Masks are not
    part of it: rewinding keeps them."""
    inside: set[int] = set()
    for module in model.modules():
        if isinstance(module, parametrize.ParametrizationList):
            inside.update(id(m) for m in module.modules())
    tensors: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        if id(module) in inside:
            continue
        prefix = f"{path}." if path else ""
        for name, param in module._parameters.items():
            if param is not None:
                tensors[prefix + name] = param
        if parametrize.is_parametrized(module):
            for name, entry in module.parametrizations.items():
                tensors[prefix + name] = entry.original
        for name, buffer in module._buffers.items():
            if buffer is not None:
                tensors[prefix + name] = buffer
    return tensors


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the weights to rewind to: every parameter (a masked weight's unmasked
    ``original``) and buffer (BatchNorm statistics), masks excluded."""
    return {name: t.detach().clone() for name, t in _state_tensors(model).items()}


def rewind(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (from :func:`snapshot`) back into ``model`` bit-exactly, in place;
    masks are kept, so a pruned weight stays 0."""
    tensors = _state_tensors(model)
    if set(tensors) != set(state):
        missing, extra = sorted(set(tensors) - set(state)), sorted(set(state) - set(tensors))
        raise LeanError(f"rewind: state does not match the model (missing {missing[:5]}, "
                        f"unexpected {extra[:5]})")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if tensor.shape != state[name].shape:
                raise LeanError(f"rewind: {name} has shape {list(tensor.shape)}, state has "
                                f"{list(state[name].shape)}")
            tensor.copy_(state[name])


def reinitialized_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A fresh random initialisation of ``model``'s weights, as a :func:`snapshot`: every
    module's own ``reset_parameters()`` (the distributions it was first built with) run on
    a copy under ``torch.manual_seed(seed)``. The masks are not touched; :func:`rewind` the
    model to this state for the paper's random re-initialisation control."""
    fresh = copy.deepcopy(model)
    for module in list(fresh.modules()):
        if parametrize.is_parametrized(module):
            own_class(module)  # the copy shares its class with the model (see own_class)
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for path, module in fresh.named_modules():
            if any(p is not None for p in module._parameters.values()):
                reset = getattr(module, "reset_parameters", None)
                if not callable(reset):
                    raise LeanError(f"reinitialized_state: module {path or '(model)'} "
                                    f"({type(module).__name__}) has parameters but no "
                                    "reset_parameters(); leantorch cannot re-draw them")
                reset()
    return snapshot(fresh)


# --------------------------------------------------------------------------- pruning
def prune_round(
    model: nn.Module,
    rate: float,
    *,
    scope: str = "global",
    layer_rates: dict[str, float] | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> dict[str, dict[str, int | float]]:
    """Prune ``rate`` of the surviving weights of ``model`` in place, by magnitude.

    scope ``"global"``: ``round(rate * survivors)`` over all selected layers together;
    ``"layer"``: ``round(rate * survivors_l)`` in every layer, where ``layer_rates``
    (``{glob over paths: rate}``, first match wins) overrides ``rate`` (the paper prunes the
    output layer at half the rate). Masks nest: nothing pruned comes back. Returns
    :func:`mask_stats`.
    """
    rate = validate.ratio("prune_round", "rate", rate, include_high=True)
    _check_scope("prune_round", scope, ("layer", "global"))
    if layer_rates is not None and scope != "layer":
        raise LeanError("prune_round: layer_rates apply to scope='layer' only, got "
                        f"scope={scope!r}")
    modules = prunable_modules(model, include, exclude)
    if not modules:
        raise LeanError(f"prune_round: no Linear or Conv layer matches include={include!r}, "
                        f"exclude={exclude!r}")
    scores = {path: _scores(module) for path, module in modules}
    dead = {path: int((s < 0).sum()) for path, s in scores.items()}
    with torch.no_grad():
        if scope == "layer":
            for path, module in modules:
                layer_rate = rate
                for pattern, value in (layer_rates or {}).items():
                    if fnmatch.fnmatchcase(path, pattern):
                        layer_rate = validate.ratio("prune_round", f"layer_rates[{pattern!r}]",
                                                    value, include_high=True)
                        break
                survivors = scores[path].numel() - dead[path]
                k = dead[path] + _count(layer_rate, survivors)
                set_mask(module, ~lowest_k(scores[path], k))
        else:
            flat = torch.cat([s.reshape(-1).float().cpu() for s in scores.values()])
            survivors = flat.numel() - sum(dead.values())
            pruned = lowest_k(flat, sum(dead.values()) + _count(rate, survivors))
            start = 0
            for path, module in modules:
                n = scores[path].numel()
                keep = ~pruned[start:start + n].reshape(scores[path].shape)
                set_mask(module, keep.to(scores[path].device))
                start += n
    return mask_stats(model)


# --------------------------------------------------------------------------- experiment
@dataclass
class RoundResult:
    """One round: the density after its pruning, and the trained model's metrics."""

    round: int
    kept: int
    total: int
    metrics: Any = None
    control_metrics: Any = None  # the same mask on a random re-initialisation

    @property
    def density(self) -> float:
        """Fraction of the prunable weights still kept: ``kept / total`` (1.0
        when there are none)."""
        return self.kept / self.total if self.total else 1.0

    def to_dict(self) -> dict[str, Any]:
        """``{"round", "kept", "total", "density", "metrics", "control_metrics"}`` (metrics as the
        evaluation function returned them)."""
        return {"round": self.round, "kept": self.kept, "total": self.total,
                "density": self.density, "metrics": self.metrics,
                "control_metrics": self.control_metrics}


@dataclass
class LotteryResult:
    """``model``: the ticket after the last round, trained (masked weights stay 0);
    ``rewind_state``: the weights every round restarted from; ``history``: round 0 (dense)
    first."""

    model: nn.Module
    rewind_state: dict[str, torch.Tensor]
    history: list[RoundResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """``{"history": [RoundResult.to_dict() per round]}``: the model and rewind weights are
        left out."""
        return {"history": [r.to_dict() for r in self.history]}


def _kept(model: nn.Module, modules: list[tuple[str, nn.Module]]) -> tuple[int, int]:
    kept = total = 0
    for _, module in modules:
        mask = get_mask(module)
        n = module.weight.numel()
        kept += n if mask is None else int(mask.sum())
        total += n
    return kept, total


def find_ticket(
    model: nn.Module,
    train: Train,
    *,
    steps: int,
    rounds: int,
    rate: float = 0.2,
    rewind_step: int = 0,
    scope: str = "global",
    layer_rates: dict[str, float] | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    evaluate: Evaluate | None = None,
    control_seed: int | None = None,
    inplace: bool = False,
) -> LotteryResult:
    """Iterative magnitude pruning with rewinding (the lottery ticket procedure).

    model: the untrained model (copied unless ``inplace``). train: ``train(model, steps_range)``
    trains in place. steps: training steps per round. rounds: pruning rounds after the dense
    run; rate: fraction of surviving weights pruned per round (scope, layer_rates, include,
    exclude: as in :func:`prune_round`). rewind_step: 0 rewinds to the initialisation, k > 0
    to the weights after k steps of the dense run. evaluate: ``evaluate(model)`` -> metrics,
    recorded each round. control_seed: when given, each pruned round also trains the same
    mask from a random re-initialisation (seed ``control_seed + round``) for all ``steps``.
    """
    if not isinstance(model, nn.Module):
        raise LeanTypeError(f"find_ticket: model must be an nn.Module, got {describe(model)}")
    if not callable(train):
        raise LeanTypeError(f"find_ticket: train must be callable(model, steps: range), got "
                            f"{describe(train)}")
    for name, value, low in (("steps", steps, 1), ("rounds", rounds, 0),
                             ("rewind_step", rewind_step, 0)):
        validate.positive_int("find_ticket", name, value, minimum=low)
    if rewind_step >= steps:
        raise LeanError(f"find_ticket: rewind_step must be < steps ({steps}), got "
                        f"{rewind_step}")
    validate.ratio("find_ticket", "rate", rate, include_high=True)
    _check_scope("find_ticket", scope, ("layer", "global"))
    if any(isinstance(m, WeightMask) for m in model.modules()):
        raise LeanError("find_ticket: the model already carries masks; start from a dense "
                        "model (make_permanent() bakes existing masks in)")

    ticket = model if inplace else copy.deepcopy(model)
    modules = prunable_modules(ticket, include, exclude)
    if not modules:
        raise LeanError(f"find_ticket: no Linear or Conv layer matches include={include!r}, "
                        f"exclude={exclude!r}")

    def measure(m: nn.Module) -> Any:
        return None if evaluate is None else evaluate(m)

    ticket.train()
    if rewind_step:
        train(ticket, range(0, rewind_step))
    rewind_state = snapshot(ticket)
    train(ticket, range(rewind_step, steps))
    kept, total = _kept(ticket, modules)
    result = LotteryResult(ticket, rewind_state, [RoundResult(0, kept, total, measure(ticket))])
    for index in range(1, rounds + 1):
        prune_round(ticket, rate, scope=scope, layer_rates=layer_rates, include=include,
                    exclude=exclude)
        control_metrics = None
        if control_seed is not None:
            control = copy.deepcopy(ticket)
            rewind(control, reinitialized_state(control, control_seed + index))
            control.train()
            train(control, range(0, steps))
            control_metrics = measure(control)
            del control
        rewind(ticket, rewind_state)
        ticket.train()
        train(ticket, range(rewind_step, steps))
        kept, total = _kept(ticket, modules)
        result.history.append(RoundResult(index, kept, total, measure(ticket), control_metrics))
    return result
