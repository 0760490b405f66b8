"""Rules for attention and mixture-of-experts: ``scaled_dot_product_attention``, grouped matmuls
of expert weights, the tagging of head axes (heads / KV heads under grouped KV), and the one
model-level rule, :func:`couple_experts`, for what shapes cannot show (routing from router rows
to expert tensors goes through data).

The attention ops found here and in the activation x activation matmuls of :mod:`.layers` are
recorded in ``p.attention`` (module, query-head axis, key-head axis): pruning reads them to fix
head counts, and the sublayer search to call a branch ``"attention"``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from leantorch.compress.graph.fx import bind, module_of, shape_of
from leantorch.compress.graph.rules.registry import Unsupported, rule, terms_of
from leantorch.compress.graph.terms import ONE, Atom, Term

__all__ = ["couple_experts", "tag_heads"]

if TYPE_CHECKING:
    from leantorch.compress.graph.propagation import Propagator


def tag_heads(p: Propagator, term: Term) -> None:
    """Tag the atoms of a head axis: under grouped KV heads, the key's head axis is
    ``kv_heads x repeats`` (the repeats born of an expand): repeats are query heads within a
    group, the rest are KV heads."""
    roots = p.dims.atoms(term)
    repeats = [r for r in roots if "broadcast" in p.dims.tags.get(r, set())]
    for r in roots:
        p.dims.tag(Atom(r), "heads" if (r in repeats or not repeats) else "kv_heads")


@rule("aten.scaled_dot_product_attention")
def _sdpa(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    """q ``(..., heads, n, d)``, k / v ``(..., kv_heads, m, d / dv)``: heads are coupled
    across q, k and v (under grouped KV, the query heads split as ``kv_heads x per_group``);
    the per-head sizes are never cut (whole heads are)."""
    args = bind(node)
    q, k, v = (terms_of(p, args[n]) for n in ("query", "key", "value"))
    p.dims.block(q[-1], f"{where}: per-head size (prune whole heads)")
    p.dims.block(v[-1], f"{where}: per-head size (prune whole heads)")
    p.dims.tag(q[-1], "head_dim")
    p.dims.tag(v[-1], "head_dim")
    p.unify(q[-1], k[-1], where)
    p.unify(k[-2], v[-2], where)
    module, _ = module_of(node)
    heads_q, heads_k = (q[-3], k[-3]) if len(q) >= 3 else (ONE, ONE)
    if len(q) >= 3:
        p.unify(heads_k, v[-3], where)
        size_q, size_k = p.dims.size(heads_q), p.dims.size(heads_k)
        if size_q != size_k and size_k > 1 and size_q % size_k == 0:
            kv, per_group = p.dims.split_outer(heads_q, size_k, where)
            p.unify(kv, heads_k, where)
            p.dims.tag(kv, "kv_heads")
            p.dims.tag(per_group, "heads")
        else:
            p.unify(heads_q, heads_k, where)
            tag_heads(p, heads_k)
        batch = p.broadcast_terms([q[:-3], k[:-3], v[:-3]], shape_of(val)[:-3], where)
    else:
        batch = []
    if args.get("attn_mask") is not None:
        mask = terms_of(p, args["attn_mask"])
        scores_shape = [*list(shape_of(val)[:-1]), p.dims.size(k[-2])]
        p.broadcast_terms([[*q[:-1], k[-2]], mask], scores_shape, where)
    p.attention.append({"module": module, "heads": heads_q, "kv_heads": heads_k})
    return batch + ([heads_q] if len(q) >= 3 else []) + [q[-2], v[-1]]


@rule("transformers.grouped_mm_fallback", "aten._grouped_mm")
def _grouped_mm(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    """x ``(tokens, in)`` @ w ``(experts, in, out)`` with ``offs (experts,)``: the experts of w
    and of the offsets are one axis."""
    x, w = terms_of(p, node.args[0]), terms_of(p, node.args[1])
    if len(x) != 2 or len(w) != 3:
        raise Unsupported("grouped matmul of this rank")
    p.unify(x[-1], w[1], where)
    if len(node.args) > 2 and isinstance(node.args[2], torch.fx.Node):
        offs = terms_of(p, node.args[2])
        p.unify(offs[0], w[0], where)
    p.dims.tag(w[0], "experts")
    p.dims.tag(w[1], "expert_features")
    p.dims.tag(w[2], "expert_features")
    return [x[0], w[2]]


def couple_experts(model: nn.Module, p: Propagator) -> None:
    """The documented mixture-of-experts rule (run once, after tracing): a module with an
    integer ``num_experts`` (or ``num_local_experts``) attribute stacks its experts on the
    leading dimension of its parameters, and its siblings with the same count (the router:
    one row per expert) share that axis. All those leading axes become one ``"experts"``
    index space."""
    by_parent: dict[tuple[str, int], list[str]] = {}
    for path, module in model.named_modules():
        count = getattr(module, "num_experts", None)
        if count is None:
            count = getattr(module, "num_local_experts", None)
        if isinstance(count, int) and not isinstance(count, bool) and count > 1 and path:
            parent = path.rpartition(".")[0]
            by_parent.setdefault((parent, count), []).append(path)
    for (_parent, count), paths in by_parent.items():
        axes: list[Term] = []
        for path in paths:
            for name, tensor in model.get_submodule(path).named_parameters(recurse=False):
                full = f"{path}.{name}"
                if full in p.param_terms and tensor.dim() >= 2 and tensor.shape[0] == count:
                    axes.append(p.param_terms[full][0])
        if len(axes) < 2:
            continue
        for term in axes[1:]:
            p.unify(axes[0], term, f"experts of {', '.join(paths)}")
        p.dims.tag(axes[0], "experts")
