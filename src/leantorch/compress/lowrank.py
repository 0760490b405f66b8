"""Low-rank factorisation of Linear layers by truncated SVD.

``W (out x in) ~= U_r S_r V_r^T`` is stored as two Linears: ``down = sqrt(S_r) V_r^T`` (in -> r)
and ``up = U_r sqrt(S_r)`` (r -> out, with the bias). A Linear costs ``in * out`` MACs per row,
the pair ``r * (in + out)``, so a rank only pays when ``r < in * out / (in + out)``; layers where
it would not are skipped and reported.

Rank is chosen explicitly (``rank``), by the fraction of spectral energy kept (``energy``:
smallest r with ``sum(s[:r]^2) >= energy * sum(s^2)``) or by a parameter budget
(``param_ratio``: the largest r whose factors hold at most that fraction of the layer's weights).

Activation-aware mode (``activation_aware=True``, needs calibration data) minimises the error
on the layer's real inputs instead of on the weights: with ``G = X^T X / n = L L^T`` (Cholesky of
the input Gram matrix), ``||(W - W') X||_F^2 = n ||(W - W') L||_F^2``, so truncating the SVD of
``W L`` and mapping back with ``L^-1`` is optimal for those inputs (the whitening of SVD-LLM).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from leantorch import validate
from leantorch.compress.change import (
    Change,
    apply_transform,
    replace_module,
    run_calibration,
    select_modules,
)
from leantorch.compress.registry import register_transform
from leantorch.errors import LeanError
from leantorch.serialize import register_module

__all__ = ["LowRankLinear", "choose_rank", "factorize_linear", "lowrank", "svd"]


@register_module(name="leantorch.LowRankLinear")
class LowRankLinear(nn.Module):
    """``y = up(down(x))``: a rank-``rank`` Linear. x: (..., in_features) -> (..., out_features)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def spec(self) -> dict[str, Any]:
        """Constructor arguments: ``in_features``, ``out_features``, ``rank`` and ``bias`` (whether
        ``up`` has one)."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "bias": self.up.bias is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., in_features)`` -> ``(..., out_features)`` through ``(..., rank)``."""
        return self.up(self.down(x))

    def weight(self) -> torch.Tensor:
        """The dense (out, in) weight the factors represent."""
        return self.up.weight @ self.down.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def break_even_rank(in_features: int, out_features: int) -> int:
    """The largest rank whose factors are strictly smaller than the dense weight."""
    return (in_features * out_features - 1) // (in_features + out_features)


def choose_rank(
    singular_values: torch.Tensor,
    in_features: int,
    out_features: int,
    *,
    rank: int | None = None,
    energy: float | None = None,
    param_ratio: float | None = None,
) -> int:
    """The rank one of ``rank`` / ``energy`` / ``param_ratio`` asks for (exactly one given)."""
    given = [name for name, v in (("rank", rank), ("energy", energy), ("param_ratio", param_ratio))
             if v is not None]
    if len(given) != 1:
        raise LeanError(f"lowrank: give exactly one of rank, energy, param_ratio; got "
                        f"{given or 'none'}")
    full = min(in_features, out_features)
    if rank is not None:
        return min(validate.positive_int("lowrank.svd", "rank", rank), full)
    for name, value in (("energy", energy), ("param_ratio", param_ratio)):
        if value is not None:
            validate.ratio("lowrank.svd", name, value, include_low=False, include_high=True)
    if energy is not None:
        squares = singular_values.double() ** 2
        kept = torch.cumsum(squares, 0) / squares.sum().clamp_min(1e-300)
        # smallest r with kept[r-1] >= energy (a tiny slack absorbs float rounding at 1.0)
        return int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype))) + 1
    return max(1, math.floor(param_ratio * in_features * out_features /
                             (in_features + out_features)))


def factorize_linear(
    linear: nn.Linear,
    rank: int,
    gram: torch.Tensor | None = None,
    damping: float = 1e-6,
) -> LowRankLinear:
    """Rank-``rank`` factors of ``linear``; with ``gram`` (in x in, ``X^T X / n`` of its inputs)
    the error on those inputs is minimised instead of the weight error."""
    weight = linear.weight.detach().double()
    if gram is None:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        down = s[:rank, None].sqrt() * vh[:rank]
    else:
        g = gram.double()
        g = g + damping * g.diagonal().mean().clamp_min(1e-12) * torch.eye(
            g.shape[0], dtype=g.dtype, device=g.device)
        chol = torch.linalg.cholesky(g)
        u, s, vh = torch.linalg.svd(weight @ chol, full_matrices=False)
        # down = sqrt(S) V^T L^-1, by solving X L = sqrt(S) V^T rather than inverting L
        down = torch.linalg.solve_triangular(chol, s[:rank, None].sqrt() * vh[:rank],
                                             upper=False, left=False)
    up = u[:, :rank] * s[:rank].sqrt()
    new = LowRankLinear(linear.in_features, linear.out_features, rank, linear.bias is not None)
    new = new.to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.down.weight.copy_(down)
        new.up.weight.copy_(up)
        if linear.bias is not None:
            new.up.bias.copy_(linear.bias.detach())
    new.train(linear.training)
    return new


def _collect_grams(model: nn.Module, paths: Sequence[str],
                   calibration: Sequence[Any]) -> dict[str, torch.Tensor]:
    """X^T X / n of the inputs of each Linear at ``paths`` over the calibration batches."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(paths, 0)

    def accumulate(path: str):
        def fn(x: torch.Tensor) -> None:
            x = x.reshape(-1, x.shape[-1]).double()
            sums[path] = sums.get(path, 0) + x.T @ x
            counts[path] += x.shape[0]
        return fn

    run_calibration(model, calibration, {p: accumulate(p) for p in paths})
    return {p: sums[p] / counts[p] for p in paths if counts[p]}


def _check_arguments(*, rank: int | None = None, energy: float | None = None,
                     param_ratio: float | None = None, **_: Any) -> None:
    """What a recipe step can check without the model: one valid way to choose the rank."""
    choose_rank(torch.ones(1), 1, 1, rank=rank, energy=energy, param_ratio=param_ratio)


@register_transform("lowrank.svd", check=_check_arguments)
def svd(
    model: nn.Module,
    *,
    rank: int | None = None,
    energy: float | None = None,
    param_ratio: float | None = None,
    activation_aware: bool = False,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    calibration: Sequence[Any] | None = None,
    example_inputs: Any = None,
    inplace: bool = False,
) -> tuple[nn.Module, Change]:
    """Factorise the selected Linear layers (see the module docstring for the three ways to
    choose the rank). Layers whose factors would not be smaller are skipped, with the reason in
    ``change.skipped``; ``change.details[path]`` has the rank and the energy kept.

    Args:
        rank: the same rank ``r`` for every layer (at most ``min(in, out)``). Exactly one of
            ``rank``, ``energy`` and ``param_ratio`` is given.
        energy: per layer, the smallest ``r`` whose singular values keep this fraction of
            ``sum(s^2)``, in (0, 1].
        param_ratio: per layer, the largest ``r`` whose two factors hold at most this
            fraction of the dense weight's entries (at least 1), in (0, 1].
        activation_aware: truncate the SVD of the weight whitened by the layer's calibration
            inputs (SVD-LLM), minimising the output error on them; needs ``calibration``.
        include: ``fnmatch`` globs over module paths (``"encoder.layer.*"``); only
            Linear layers matching one are changed (None: all of them).
        exclude: globs of module paths left as they are, even when ``include`` matches.

    Example::

        >>> small, change = lowrank(model, param_ratio=0.5, exclude="*classifier*")  # doctest: +SKIP
    """
    if activation_aware and not calibration:
        raise LeanError("lowrank: activation_aware=True needs calibration data (a list of model "
                        "inputs)")
    # check the arguments before copying the model
    _check_arguments(rank=rank, energy=energy, param_ratio=param_ratio)

    def edit(target: nn.Module, change: Change) -> None:
        chosen = [(p, m) for p, m in select_modules(target, nn.Linear, include, exclude)
                  if type(m) is nn.Linear]
        grams = _collect_grams(target, [p for p, _ in chosen], calibration) \
            if activation_aware else {}
        for path, linear in chosen:
            n_in, n_out = linear.in_features, linear.out_features
            limit = break_even_rank(n_in, n_out)
            s = torch.linalg.svdvals(linear.weight.detach().double())
            r = choose_rank(s, n_in, n_out, rank=rank, energy=energy, param_ratio=param_ratio)
            if r > limit:
                change.skipped[path] = (f"rank {r} needs {r * (n_in + n_out):,} weights, not "
                                        f"fewer than the dense {n_in * n_out:,}")
                continue
            if activation_aware and path not in grams:
                change.skipped[path] = "never ran on the calibration data"
                continue
            replace_module(target, path, factorize_linear(linear, r, grams.get(path)))
            change.replaced.append(path)
            kept = float((s[:r] ** 2).sum() / (s**2).sum().clamp_min(1e-300))
            change.details[path] = {"rank": r, "energy_kept": kept}

    return apply_transform(
        "lowrank.svd", model, edit, inplace=inplace, example_inputs=example_inputs,
        params={"rank": rank, "energy": energy, "param_ratio": param_ratio,
                "activation_aware": activation_aware, "include": include, "exclude": exclude})


# the name this transform had before registry names equalled function names (see
# leantorch.compress.registry); kept so existing imports work
lowrank = svd
