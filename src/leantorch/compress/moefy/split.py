"""Dense FFN -> mixture of experts by an exact split of the hidden neurons (MoEfication,
FactorLLM, Dense2MoE).

The hidden units of ``y = act(x W_in + b_in) W_out + b_out`` (gated: ``act(x W_gate) *
(x W_up)``) are partitioned into ``E`` disjoint groups; expert ``e`` takes its columns of
``W_in`` (and ``W_gate``), its entries of ``b_in`` and its rows of ``W_out``, and ``b_out``
becomes one shared output bias. The activation acts unit by unit, so the sum of all experts is
the dense FFN (``k = E`` reproduces it to rounding); with ``k < E`` a token skips the experts
whose contribution is smallest. Groups are equal-sized (``ceil(hidden / E)`` units; when ``E``
does not divide ``hidden`` the last experts get zero units, which contribute exactly 0). The
partition comes from

* ``"cluster"``: balanced k-means over the neurons' activation patterns on calibration data
  (neurons that fire together share an expert, as MoEfication does);
* ``"random"``: a seeded balanced random permutation; ``"contiguous"``: units in order.

The router is fitted to the activation statistics (``router="calibrated"``): on calibration
tokens, the size of each expert's contribution ``||h_e(x) W_out,e||`` is regressed on ``x``
(ridge least squares), and the router picks the ``k`` experts with the largest predicted
contribution. Gates are ``"unit"`` (every chosen expert's output is added as is, the gradient
still reaches the router), so the split layer is the dense FFN minus the skipped experts.

The FFNs are found by :mod:`leantorch.compress.moefy.sites` (the dependency graph's neuron
groups, on the example inputs). Registered as ``"moefy.split"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from leantorch.compress.change import Change, apply_transform, run_calibration
from leantorch.compress.moefy.sites import (
    FFNSite,
    check_k,
    moe_for,
    replace_site,
    transform_sites,
)
from leantorch.compress.registry import register_transform
from leantorch.errors import LeanError
from leantorch.nn.moe import MoE
from leantorch.validate import one_of, positive_int

__all__ = [
    "PARTITIONS",
    "ROUTER_INITS",
    "fit_router",
    "moefy_split",
    "partition_neurons",
    "split",
    "split_ffn",
]

PARTITIONS = ("cluster", "random", "contiguous")
ROUTER_INITS = ("calibrated", "random")


# --------------------------------------------------------------------------- partitions
def _balanced_assign(similarity: Tensor, size: int) -> Tensor:
    """Greedy balanced assignment: (neuron, cluster) pairs by decreasing similarity; a neuron
    takes the first cluster that still has room. ``similarity (n, E)`` -> cluster ids ``(n,)``."""
    n, clusters = similarity.shape
    order = torch.argsort(similarity.reshape(-1), descending=True, stable=True).tolist()
    assigned = [-1] * n
    room = [size] * clusters
    left = n
    for flat in order:
        neuron, cluster = divmod(flat, clusters)
        if assigned[neuron] >= 0 or room[cluster] == 0:
            continue
        assigned[neuron] = cluster
        room[cluster] -= 1
        left -= 1
        if left == 0:
            break
    return torch.tensor(assigned)


def partition_neurons(
    hidden: int,
    num_experts: int,
    method: str = "cluster",
    activations: Tensor | None = None,
    *,
    seed: int = 0,
    iterations: int = 10,
) -> list[list[int]]:
    """Split ``range(hidden)`` into ``num_experts`` disjoint groups of
    ``ceil(hidden / num_experts)`` units at most (the groups that come short are padded by the
    caller). ``activations (tokens, hidden)`` are needed for ``method="cluster"``."""
    one_of("moefy", "partition", method, PARTITIONS)
    positive_int("moefy", "num_experts", num_experts)
    if num_experts > hidden:
        raise LeanError(f"moefy: num_experts={num_experts}; expected an int in [1, {hidden}] "
                        "(the hidden units)")
    size = math.ceil(hidden / num_experts)
    if method == "contiguous":
        units = list(range(hidden))
        return [units[e * size: (e + 1) * size] for e in range(num_experts)]
    generator = torch.Generator().manual_seed(seed)
    if method == "random":
        units = torch.randperm(hidden, generator=generator).tolist()
        return [sorted(units[e * size: (e + 1) * size]) for e in range(num_experts)]
    if activations is None:
        raise LeanError("moefy: partition='cluster' groups neurons by their activations on "
                        "calibration data; pass calibration=[inputs...] or use "
                        "partition='random'")
    # each neuron is the (normalised) pattern of its activations over the calibration tokens
    features = activations.detach().double().t()
    features = features - features.mean(dim=1, keepdim=True)
    features = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
    first = torch.randperm(hidden, generator=generator)[:num_experts]
    centroids = features[first]
    labels = _balanced_assign(features @ centroids.t(), size)
    for _ in range(iterations):
        centroids = torch.zeros_like(centroids).index_add_(0, labels, features)
        centroids = centroids / centroids.norm(dim=1, keepdim=True).clamp_min(1e-12)
        new_labels = _balanced_assign(features @ centroids.t(), size)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return [sorted(torch.nonzero(labels == e).flatten().tolist()) for e in range(num_experts)]


# --------------------------------------------------------------------------- building experts
def split_ffn(site: FFNSite, groups: Sequence[Sequence[int]], k: int,
              **moe_args: Any) -> MoE:
    """An exact split of ``site`` into ``len(groups)`` experts (unit gates); the router is
    left at its random initialisation (see :func:`fit_router`)."""
    hidden = site.hidden
    flat = sorted(u for g in groups for u in g)
    if flat != list(range(hidden)):
        raise LeanError(f"moefy: the groups must partition range({hidden}) exactly (disjoint "
                        "and complete)")
    num_experts = len(groups)
    size = max(len(g) for g in groups)
    moe = moe_for(site, size, num_experts, k, bias="in" if site.b_in is not None else False,
                   output_bias=site.b_out is not None, gates="unit", router_bias=True,
                   moe_args=moe_args)
    experts = moe.experts
    with torch.no_grad():
        experts.w_in.zero_()
        experts.w_out.zero_()
        if experts.b_in is not None:
            experts.b_in.zero_()
        for e, units in enumerate(groups):
            index = torch.tensor(list(units), dtype=torch.long, device=site.w_in.device)
            n = index.numel()
            if site.gated:
                experts.w_in[e, :, :n] = site.w_in[:, index]
                experts.w_in[e, :, size: size + n] = site.w_in[:, hidden + index]
                if site.b_in is not None:
                    experts.b_in[e, :n] = site.b_in[index]
                    experts.b_in[e, size: size + n] = site.b_in[hidden + index]
            else:
                experts.w_in[e, :, :n] = site.w_in[:, index]
                if site.b_in is not None:
                    experts.b_in[e, :n] = site.b_in[index]
            experts.w_out[e, :n] = site.w_out[index]
        if site.b_out is not None:
            moe.output_bias.copy_(site.b_out)
    return moe


# --------------------------------------------------------------------------- calibration
def _collect_inputs(model: nn.Module, paths: Sequence[str], calibration: Sequence[Any],
                    max_tokens: int) -> dict[str, Tensor]:
    """The inputs ``(tokens, dim)`` each module at ``paths`` saw on the calibration data
    (the first ``max_tokens`` tokens)."""
    seen: dict[str, list[Tensor]] = {p: [] for p in paths}
    counts = dict.fromkeys(paths, 0)

    def keep(path: str):
        def fn(x: Tensor) -> None:
            if counts[path] < max_tokens:
                x = x.reshape(-1, x.shape[-1])[: max_tokens - counts[path]]
                seen[path].append(x)
                counts[path] += x.shape[0]
        return fn

    run_calibration(model, calibration, {p: keep(p) for p in paths})
    return {p: torch.cat(v) for p, v in seen.items() if v}


def _expert_contributions(site: FFNSite, x: Tensor, groups: Sequence[Sequence[int]]) -> Tensor:
    """``||h_e(x) W_out,e||`` for every token and expert: ``(tokens, E)``."""
    hidden = site.hidden_units(x)
    columns = []
    for units in groups:
        index = torch.tensor(list(units), dtype=torch.long, device=x.device)
        columns.append((hidden[:, index] @ site.w_out[index]).norm(dim=-1))
    return torch.stack(columns, dim=1)


def fit_router(x: Tensor, targets: Tensor, ridge: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Ridge least squares ``targets ~ x W^T + b``: ``x (tokens, dim)``, ``targets (tokens,
    E)`` -> ``W (E, dim)``, ``b (E,)``. The ridge is relative to the mean diagonal of
    ``x^T x``."""
    xd, td = x.double(), targets.double()
    mean_x, mean_t = xd.mean(0), td.mean(0)
    xc, tc = xd - mean_x, td - mean_t
    gram = xc.t() @ xc
    gram = gram + ridge * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(
        gram.shape[0], dtype=gram.dtype, device=gram.device)
    weight = torch.linalg.solve(gram, xc.t() @ tc).t()
    bias = mean_t - weight @ mean_x
    return weight, bias


def _topk_recall(scores: Tensor, contributions: Tensor, k: int) -> float:
    """Share of the oracle top-k contribution mass that the router's top-k captures."""
    chosen = torch.topk(scores, k, dim=-1).indices
    oracle = torch.topk(contributions, k, dim=-1).values.sum()
    return float(contributions.gather(1, chosen).sum() / oracle.clamp_min(1e-30))


# --------------------------------------------------------------------------- transforms
@register_transform("moefy.split")
def split(
    model: nn.Module,
    *,
    num_experts: int = 8,
    k: int = 2,
    partition: str = "cluster",
    router: str = "calibrated",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    calibration: Sequence[Any] | None = None,
    example_inputs: Any = None,
    inplace: bool = False,
    seed: int = 0,
    max_tokens: int = 4096,
    ridge: float = 1e-3,
    **moe_args: Any,
) -> tuple[nn.Module, Change]:
    """Split every selected dense FFN exactly into ``num_experts`` experts of which ``k`` run
    per token (see the module docstring). ``moe_args`` go to :class:`~leantorch.nn.moe.MoE`
    (e.g. ``capacity_factor``). The FFNs are found by tracing the model on ``example_inputs``
    (default: the first calibration batch; see :func:`~leantorch.compress.moefy.find_ffns`);
    ``change.skipped`` lists the FFN-shaped layers left alone, with the reason.

    Args:
        num_experts: experts per FFN: the hidden units are cut into this many groups of
            ``ceil(hidden / num_experts)`` (at most ``hidden``).
        k: experts each token runs (``k == num_experts`` reproduces the dense FFN).
        partition: ``"cluster"``, ``"random"`` or ``"contiguous"``.
        router: ``"calibrated"`` (fitted on ``calibration``) or ``"random"``.
        include: ``fnmatch`` globs over module paths (``"encoder.layer.*"``); only
            FFNs matching one are changed (None: all of them).
        exclude: globs of module paths left as they are, even when ``include`` matches.
        seed: seeds the random partition, the k-means start and the random router.
        max_tokens: calibration tokens per FFN used to cluster the neurons and fit the router
            (the first ones seen).
        ridge: the router fit's ridge penalty, relative to the mean diagonal of the inputs'
            Gram matrix.

    ``change.details[path]``: the expert size, the partition sizes and, with calibration, the
    router's recall (share of the best-k contribution mass its choice keeps) and the relative
    output error of the split layer on the calibration tokens.

    Example::

        >>> moe_model, change = split(model, num_experts=8, k=2,
        ...                                 calibration=batches)  # doctest: +SKIP
    """
    check_k("moefy.split", num_experts, k)
    one_of("moefy.split", "partition", partition, PARTITIONS)
    one_of("moefy.split", "router", router, ROUTER_INITS)
    needs_data = partition == "cluster" or router == "calibrated"
    if needs_data and not calibration:
        raise LeanError(f"moefy.split: partition={partition!r} / router={router!r} look at "
                        "activations: pass calibration=[model inputs...], or use "
                        "partition='random', router='random'")

    def edit(target: nn.Module, change: Change) -> None:
        sites = transform_sites(target, "moefy.split", example_inputs, calibration, include,
                                exclude, change.skipped)
        inputs = _collect_inputs(target, [s.path for s in sites], calibration, max_tokens) \
            if needs_data else {}
        for site in sites:
            if site.hidden < num_experts:
                change.skipped[site.path] = (f"{site.hidden} hidden units cannot make "
                                             f"{num_experts} experts")
                continue
            if needs_data and site.path not in inputs:
                change.skipped[site.path] = "never ran on the calibration data"
                continue
            x = inputs.get(site.path)
            activations = site.hidden_units(x) if x is not None else None
            groups = partition_neurons(site.hidden, num_experts, partition, activations,
                                       seed=seed)
            moe = split_ffn(site, groups, k, **moe_args)
            details: dict[str, Any] = {"kind": site.kind, "expert_hidden": moe.hidden,
                                       "group_sizes": [len(g) for g in groups],
                                       "active_params": moe.active_params()}
            if router == "calibrated":
                contributions = _expert_contributions(site, x, groups)
                weight, bias = fit_router(x, contributions, ridge)
                moe.router.weight.copy_(weight)
                moe.router.bias.copy_(bias)
                scores = x.double() @ weight.t() + bias
                details["router_recall"] = _topk_recall(scores, contributions.double(), k)
                training = moe.training
                moe.eval()
                dense = site.forward(x)
                error = (moe(x) - dense).norm() / dense.norm().clamp_min(1e-30)
                moe.train(training)
                details["relative_error"] = float(error)
            else:
                generator = torch.Generator().manual_seed(seed)
                moe.router.weight.copy_(torch.randn(moe.router.weight.shape,
                                                    generator=generator) * 0.02)
                moe.router.bias.zero_()
            moe.train(target.get_submodule(site.path).training)
            replace_site(target, site, moe)
            change.replaced.append(site.path)
            if site.identity_path is not None:
                change.replaced.append(site.identity_path)
            change.details[site.path] = details

    return apply_transform(
        "moefy.split", model, edit, example_inputs=example_inputs, inplace=inplace,
        params={"num_experts": num_experts, "k": k, "partition": partition, "router": router,
                "include": include, "exclude": exclude, "seed": seed, **moe_args})


# the name before registry names matched function names (kept as an alias)
moefy_split = split
