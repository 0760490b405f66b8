"""Dense FFN -> mixture of experts by upcycling (sparse upcycling, BAM).

``E`` copies of the FFN and a new router; with gates that sum to one (``"renorm"``) the layer
equals the dense FFN at initialisation for any router. ``noise > 0`` perturbs each copy
(multiplicatively, seeded) to break the symmetry, after which the equality no longer holds.
Registered as ``"moefy.upcycle"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from leantorch.compress.change import Change, apply_transform
from leantorch.compress.moefy.sites import (
    FFNSite,
    check_k,
    moe_for,
    replace_site,
    transform_sites,
)
from leantorch.compress.registry import register_transform
from leantorch.nn.moe import MoE
from leantorch.validate import ratio

__all__ = ["moefy_upcycle", "upcycle", "upcycle_ffn"]


def upcycle_ffn(site: FFNSite, num_experts: int, k: int, *, noise: float = 0.0,
                router_std: float = 0.02, seed: int = 0, **moe_args: Any) -> MoE:
    """``num_experts`` copies of ``site`` with a new router (normal, ``router_std``) and gates
    that sum to one; ``noise``: relative std of a multiplicative perturbation of each copy."""
    ratio("moefy", "noise", noise, high=float("inf"))
    has_bias = site.b_in is not None or site.b_out is not None
    moe = moe_for(site, site.hidden, num_experts, k, bias=has_bias, output_bias=False,
                  gates=moe_args.pop("gates", "renorm"), router_bias=False, moe_args=moe_args)
    generator = torch.Generator().manual_seed(seed)
    experts = moe.experts

    def perturbed(t: Tensor) -> Tensor:
        copies = t.unsqueeze(0).expand(num_experts, *t.shape)
        if not noise:
            return copies
        factor = torch.randn(copies.shape, generator=generator, dtype=torch.float64)
        return copies * (1 + noise * factor).to(t.dtype).to(t.device)

    with torch.no_grad():
        experts.w_in.copy_(perturbed(site.w_in))
        experts.w_out.copy_(perturbed(site.w_out))
        if has_bias:
            zeros_in = torch.zeros(site.w_in.shape[1], dtype=site.w_in.dtype)
            zeros_out = torch.zeros(site.dim, dtype=site.w_in.dtype)
            experts.b_in.copy_(perturbed(site.b_in if site.b_in is not None else zeros_in))
            experts.b_out.copy_(perturbed(site.b_out if site.b_out is not None else zeros_out))
        weight = torch.randn(moe.router.weight.shape, generator=generator, dtype=torch.float64)
        moe.router.weight.copy_(weight * router_std)
    return moe


@register_transform("moefy.upcycle")
def upcycle(
    model: nn.Module,
    *,
    num_experts: int = 8,
    k: int = 2,
    noise: float = 0.0,
    router_std: float = 0.02,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    example_inputs: Any = None,
    calibration: Sequence[Any] | None = None,
    inplace: bool = False,
    seed: int = 0,
    **moe_args: Any,
) -> tuple[nn.Module, Change]:
    """Replace every selected dense FFN with ``num_experts`` copies of it and a new router
    (top-``k``, renormalised gates): the model is unchanged at initialisation when
    ``noise == 0`` (see the module docstring). ``moe_args`` go to
    :class:`~leantorch.nn.moe.MoE`. The FFNs are found by tracing the model on
    ``example_inputs`` (default: the first ``calibration`` batch; only leantorch
    ``FeedForward`` modules are found without either). Upcycling itself looks at weights
    only.

    Args:
        num_experts: copies of each FFN.
        k: experts each token runs; their gates sum to one.
        noise: relative std of a seeded multiplicative perturbation of each copy's weights
            (0: exact copies, the model's outputs unchanged).
        router_std: std of the new router's normal initial weights.
        include: ``fnmatch`` globs over module paths (``"encoder.layer.*"``); only
            FFNs matching one are changed (None: all of them).
        exclude: globs of module paths left as they are, even when ``include`` matches.
        seed: seeds the router and the noise (the FFN at position ``i`` uses ``seed + i``).
    """
    check_k("moefy.upcycle", num_experts, k)

    def edit(target: nn.Module, change: Change) -> None:
        sites = transform_sites(target, "moefy.upcycle", example_inputs, calibration, include,
                                exclude, change.skipped)
        for index, site in enumerate(sites):
            moe = upcycle_ffn(site, num_experts, k, noise=noise, router_std=router_std,
                              seed=seed + index, **dict(moe_args))
            moe.train(target.get_submodule(site.path).training)
            replace_site(target, site, moe)
            change.replaced.append(site.path)
            if site.identity_path is not None:
                change.replaced.append(site.identity_path)
            change.details[site.path] = {"kind": site.kind, "expert_hidden": site.hidden,
                                         "active_params": moe.active_params()}

    return apply_transform(
        "moefy.upcycle", model, edit, example_inputs=example_inputs, inplace=inplace,
        params={"num_experts": num_experts, "k": k, "noise": noise, "router_std": router_std,
                "include": include, "exclude": exclude, "seed": seed, **moe_args})


# the name before registry names matched function names (kept as an alias)
moefy_upcycle = upcycle
