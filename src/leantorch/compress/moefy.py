"""Dense FFN -> mixture of experts: an exact split of the hidden neurons, or upcycling.

**Exact split** (MoEfication, FactorLLM, Dense2MoE): the hidden units of ``y = act(x W_in +
b_in) W_out + b_out`` (gated: ``act(x W_gate) * (x W_up)``) are partitioned into ``E`` disjoint
groups; expert ``e`` takes its columns of ``W_in`` (and ``W_gate``), its entries of ``b_in`` and
its rows of ``W_out``, and ``b_out`` becomes one shared output bias. The activation acts unit by
unit, so the sum of all experts is the dense FFN (``k = E`` reproduces it to rounding); with
``k < E`` a token skips the experts whose contribution is smallest. Groups are equal-sized
(``ceil(hidden / E)`` units; when ``E`` does not divide ``hidden`` the last experts get zero
units, which contribute exactly 0). The partition comes from

* ``"cluster"``: balanced k-means over the neurons' activation patterns on calibration data
  (neurons that fire together share an expert, as MoEfication does);
* ``"random"``: a seeded balanced random permutation; ``"contiguous"``: units in order.

The router is fitted to the activation statistics (``router="calibrated"``): on calibration
tokens, the size of each expert's contribution ``||h_e(x) W_out,e||`` is regressed on ``x``
(ridge least squares), and the router picks the ``k`` experts with the largest predicted
contribution. Gates are ``"unit"`` (every chosen expert's output is added as is, the gradient
still reaches the router), so the split layer is the dense FFN minus the skipped experts.

**Upcycling** (sparse upcycling, BAM): ``E`` copies of the FFN and a new router; with gates that
sum to one (``"renorm"``) the layer equals the dense FFN at initialisation for any router.
``noise > 0`` perturbs each copy (multiplicatively, seeded) to break the symmetry, after which
the equality no longer holds.

**Where:** :func:`find_ffns` lists the FFNs a model has, by module path: leantorch's
:class:`~leantorch.nn.moe.FeedForward`, ``nn.Sequential(Linear, activation, Linear)``,
transformers BERT-style layers (``<layer>.intermediate`` with ``<layer>.output.dense``; the
latter becomes ``Identity``), GPT-2's ``mlp`` (``Conv1D`` weights) and Llama-style gated
``mlp`` (``gate_proj``, ``up_proj``, ``down_proj``). ``include`` / ``exclude`` globs choose
among those paths. Both transforms return ``(new_model, Change)`` and are registered as
``"moefy.split"`` and ``"moefy.upcycle"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from leantorch.compress.change import (
    Change,
    _patterns,
    apply_transform,
    replace_module,
    run_calibration,
)
from leantorch.compress.registry import register_transform
from leantorch.errors import LeanError, describe
from leantorch.nn.moe import FeedForward, MoE
from leantorch.ops.moe.dispatch import ACTIVATIONS, activation_fn

__all__ = [
    "PARTITIONS",
    "FFNSite",
    "find_ffns",
    "fit_router",
    "moefy_split",
    "moefy_upcycle",
    "partition_neurons",
    "split_ffn",
    "upcycle_ffn",
]

PARTITIONS = ("cluster", "random", "contiguous")
ROUTER_INITS = ("calibrated", "random")


# --------------------------------------------------------------------------- finding FFNs
@dataclass
class FFNSite:
    """One dense FFN of a model, in leantorch's weight layout.

    ``path``: the module replaced by the MoE layer; ``kind``: ``"leantorch"``,
    ``"sequential"``, ``"bert"``, ``"gpt2"`` or ``"gated"``; ``identity_path``: a module that
    becomes ``Identity`` (BERT's ``output.dense``, whose work moves into the MoE);
    ``w_in (dim, hidden)`` or ``(dim, 2*hidden)`` gate columns first; ``w_out (hidden, dim)``;
    ``dropout``: output dropout the MoE layer takes over (GPT-2).
    """

    path: str
    kind: str
    activation: str
    gated: bool
    w_in: Tensor = field(repr=False)
    w_out: Tensor = field(repr=False)
    b_in: Tensor | None = field(default=None, repr=False)
    b_out: Tensor | None = field(default=None, repr=False)
    identity_path: str | None = None
    dropout: float = 0.0

    @property
    def dim(self) -> int:
        return self.w_in.shape[0]

    @property
    def hidden(self) -> int:
        return self.w_out.shape[0]

    def hidden_units(self, x: Tensor) -> Tensor:
        """The hidden activations ``(tokens, hidden)`` of inputs ``x (tokens, dim)``."""
        act = activation_fn(self.activation)
        h = x @ self.w_in if self.b_in is None else torch.addmm(self.b_in, x, self.w_in)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return act(gate) * up
        return act(h)

    def forward(self, x: Tensor) -> Tensor:
        """The dense FFN (without dropout). ``x (tokens, dim)`` -> ``(tokens, dim)``."""
        y = self.hidden_units(x) @ self.w_out
        return y if self.b_out is None else y + self.b_out


_PROBE = torch.linspace(-4, 4, 97, dtype=torch.float64)


def _identify_activation(module: nn.Module) -> str | None:
    """Which of leantorch's activations ``module`` computes (checked on a probe vector)."""
    try:
        with torch.no_grad():
            out = module(_PROBE)
    except Exception:
        return None
    for name, fn in ACTIVATIONS.items():
        if torch.allclose(out.double(), fn(_PROBE), rtol=1e-6, atol=1e-7):
            return name
    return None


def _linear_t(linear: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(in, out) weight and bias of an ``nn.Linear`` or a transformers ``Conv1D``."""
    if isinstance(linear, nn.Linear):
        return linear.weight.detach().t(), None if linear.bias is None else linear.bias.detach()
    # transformers' Conv1D stores the weight as (in, out) already
    return linear.weight.detach(), None if linear.bias is None else linear.bias.detach()


def _is_linear(module: Any) -> bool:
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and
                                             hasattr(module, "nf"))


def _site_of(path: str, module: nn.Module, model: nn.Module) -> FFNSite | None:
    if isinstance(module, FeedForward):
        return FFNSite(path, "leantorch", module.activation, module.gated,
                       module.w_in.detach(), module.w_out.detach(),
                       None if module.b_in is None else module.b_in.detach(),
                       None if module.b_out is None else module.b_out.detach())
    if isinstance(module, nn.Sequential) and len(module) == 3 and \
            isinstance(module[0], nn.Linear) and isinstance(module[2], nn.Linear):
        activation = _identify_activation(module[1])
        if activation is None:
            return None
        (w_in, b_in), (w_out, b_out) = _linear_t(module[0]), _linear_t(module[2])
        return FFNSite(path, "sequential", activation, False, w_in, w_out, b_in, b_out)
    names = dict(module.named_children())
    if {"gate_proj", "up_proj", "down_proj"} <= names.keys() and all(
            isinstance(names[n], nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
        act_module = names.get("act_fn", getattr(module, "act_fn", None))
        activation = _identify_activation(act_module) if act_module is not None else None
        if activation is None:
            return None
        (w_gate, b_gate), (w_up, b_up) = _linear_t(names["gate_proj"]), _linear_t(names["up_proj"])
        w_out, b_out = _linear_t(names["down_proj"])
        if (b_gate is None) != (b_up is None):
            return None
        b_in = None if b_gate is None else torch.cat([b_gate, b_up])
        return FFNSite(path, "gated", activation, True, torch.cat([w_gate, w_up], dim=1),
                       w_out, b_in, b_out)
    if {"c_fc", "c_proj"} <= names.keys() and _is_linear(names["c_fc"]) and \
            _is_linear(names["c_proj"]) and "act" in names:
        activation = _identify_activation(names["act"])
        if activation is None:
            return None
        (w_in, b_in), (w_out, b_out) = _linear_t(names["c_fc"]), _linear_t(names["c_proj"])
        drop = names.get("dropout")
        return FFNSite(path, "gpt2", activation, False, w_in, w_out, b_in, b_out,
                       dropout=float(drop.p) if isinstance(drop, nn.Dropout) else 0.0)
    # BERT: <layer>.intermediate (dense + act) feeds <layer>.output (dense, dropout, norm)
    if type(module).__name__.endswith("Intermediate") and isinstance(
            names.get("dense"), nn.Linear) and path:
        parent_path = path.rpartition(".")[0]
        parent = model.get_submodule(parent_path) if parent_path else model
        output = getattr(parent, "output", None)
        dense_out = getattr(output, "dense", None)
        act_module = getattr(module, "intermediate_act_fn", None)
        if not isinstance(dense_out, nn.Linear) or act_module is None:
            return None
        activation = _identify_activation(act_module)
        if activation is None:
            return None
        (w_in, b_in), (w_out, b_out) = _linear_t(names["dense"]), _linear_t(dense_out)
        out_path = f"{parent_path}.output.dense" if parent_path else "output.dense"
        return FFNSite(path, "bert", activation, False, w_in, w_out, b_in, b_out,
                       identity_path=out_path)
    return None


def find_ffns(model: nn.Module, include: str | Sequence[str] | None = None,
              exclude: str | Sequence[str] | None = None) -> list[FFNSite]:
    """The dense FFNs of ``model`` that moefy can convert, selected by ``include`` /
    ``exclude`` globs over their paths (see the module docstring for the kinds)."""
    includes = _patterns("include", include)
    excludes = _patterns("exclude", exclude) or []
    import fnmatch

    sites = []
    for path, module in model.named_modules():
        # the model itself is never a site: a transform edits the model, it cannot swap it
        if not path or isinstance(module, MoE) or any(
                path.startswith(s.path + ".") for s in sites):
            continue
        site = _site_of(path, module, model)
        if site is None:
            continue
        if includes is not None and not any(fnmatch.fnmatchcase(path, p) for p in includes):
            continue
        if any(fnmatch.fnmatchcase(path, p) for p in excludes):
            continue
        sites.append(site)
    return sites


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
    if method not in PARTITIONS:
        raise LeanError(f"moefy: partition must be one of {', '.join(PARTITIONS)}, got "
                        f"{method!r}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or \
            not 1 <= num_experts <= hidden:
        raise LeanError(f"moefy: num_experts must be an integer in [1, {hidden}] (the hidden "
                        f"units), got {describe(num_experts)}")
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
def _moe_for(site: FFNSite, hidden: int, num_experts: int, k: int, *, bias: bool | str,
             output_bias: bool, gates: str, router_bias: bool, moe_args: dict[str, Any]) -> MoE:
    args = {"activation": site.activation, "gated": site.gated, "bias": bias,
            "output_bias": output_bias, "gates": gates, "router_bias": router_bias,
            "dropout": site.dropout}
    clash = sorted(set(args) & set(moe_args))
    if clash:
        raise LeanError(f"moefy: {', '.join(clash)} are set by the FFN being converted; "
                        "leave them out of the MoE options")
    moe = MoE(site.dim, hidden, num_experts, k, **args, **moe_args)
    return moe.to(device=site.w_in.device, dtype=site.w_in.dtype)


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
    moe = _moe_for(site, size, num_experts, k, bias="in" if site.b_in is not None else False,
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


def upcycle_ffn(site: FFNSite, num_experts: int, k: int, *, noise: float = 0.0,
                router_std: float = 0.02, seed: int = 0, **moe_args: Any) -> MoE:
    """``num_experts`` copies of ``site`` with a new router (normal, ``router_std``) and gates
    that sum to one; ``noise``: relative std of a multiplicative perturbation of each copy."""
    if not noise >= 0:
        raise LeanError(f"moefy: noise must be >= 0, got {noise!r}")
    has_bias = site.b_in is not None or site.b_out is not None
    moe = _moe_for(site, site.hidden, num_experts, k, bias=has_bias, output_bias=False,
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
def _replace_site(target: nn.Module, site: FFNSite, moe: MoE) -> None:
    replace_module(target, site.path, moe)
    if site.identity_path is not None:
        replace_module(target, site.identity_path, nn.Identity())


def _check_k(num_experts: int, k: int) -> None:
    for name, value in (("num_experts", num_experts), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LeanError(f"moefy: {name} must be a positive integer, got {describe(value)}")
    if k > num_experts:
        raise LeanError(f"moefy: k={k} is more than num_experts={num_experts}")


@register_transform("moefy.split")
def moefy_split(
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
    per token (see the module docstring). ``partition``: ``"cluster"``, ``"random"`` or
    ``"contiguous"``; ``router``: ``"calibrated"`` (fitted on ``calibration``) or ``"random"``.
    ``moe_args`` go to :class:`~leantorch.nn.moe.MoE` (e.g. ``capacity_factor``).

    ``change.details[path]``: the expert size, the partition sizes and, with calibration, the
    router's recall (share of the best-k contribution mass its choice keeps) and the relative
    output error of the split layer on the calibration tokens.

    Example::

        >>> moe_model, change = moefy_split(model, num_experts=8, k=2,
        ...                                 calibration=batches)  # doctest: +SKIP
    """
    _check_k(num_experts, k)
    if partition not in PARTITIONS:
        raise LeanError(f"moefy: partition must be one of {', '.join(PARTITIONS)}, got "
                        f"{partition!r}")
    if router not in ROUTER_INITS:
        raise LeanError(f"moefy: router must be one of {', '.join(ROUTER_INITS)}, got "
                        f"{router!r}")
    needs_data = partition == "cluster" or router == "calibrated"
    if needs_data and not calibration:
        raise LeanError(f"moefy.split: partition={partition!r} / router={router!r} look at "
                        "activations: pass calibration=[model inputs...], or use "
                        "partition='random', router='random'")

    def edit(target: nn.Module, change: Change) -> None:
        sites = find_ffns(target, include, exclude)
        if not sites:
            raise LeanError(f"moefy.split: no dense FFN matched include={include!r} "
                            f"exclude={exclude!r} in {type(target).__name__} (a model that is "
                            "itself one FFN: wrap it, or call split_ffn on find_ffns's site)")
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
            _replace_site(target, site, moe)
            change.replaced.append(site.path)
            if site.identity_path is not None:
                change.replaced.append(site.identity_path)
            change.details[site.path] = details

    return apply_transform(
        "moefy.split", model, edit, example_inputs=example_inputs, inplace=inplace,
        params={"num_experts": num_experts, "k": k, "partition": partition, "router": router,
                "include": include, "exclude": exclude, "seed": seed, **moe_args})


@register_transform("moefy.upcycle")
def moefy_upcycle(
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
    :class:`~leantorch.nn.moe.MoE`. ``calibration`` is accepted (recipes pass it to every
    transform) and not used: upcycling looks at weights only."""
    _check_k(num_experts, k)
    del calibration

    def edit(target: nn.Module, change: Change) -> None:
        sites = find_ffns(target, include, exclude)
        if not sites:
            raise LeanError(f"moefy.upcycle: no dense FFN matched include={include!r} "
                            f"exclude={exclude!r} in {type(target).__name__} (a model that is "
                            "itself one FFN: wrap it, or call upcycle_ffn on find_ffns's site)")
        for index, site in enumerate(sites):
            moe = upcycle_ffn(site, num_experts, k, noise=noise, router_std=router_std,
                              seed=seed + index, **dict(moe_args))
            moe.train(target.get_submodule(site.path).training)
            _replace_site(target, site, moe)
            change.replaced.append(site.path)
            if site.identity_path is not None:
                change.replaced.append(site.identity_path)
            change.details[site.path] = {"kind": site.kind, "expert_hidden": site.hidden,
                                         "active_params": moe.active_params()}

    return apply_transform(
        "moefy.upcycle", model, edit, example_inputs=example_inputs, inplace=inplace,
        params={"num_experts": num_experts, "k": k, "noise": noise, "router_std": router_std,
                "include": include, "exclude": exclude, "seed": seed, **moe_args})
