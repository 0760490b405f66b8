"""Split-KV attention: partial results over chunks of keys that merge associatively.

A partial over a set of keys is (o, m, l): o = sum_j exp(s_j - m) v_j (unnormalised), m the row
max of the scaled scores s_j and l = sum_j exp(s_j - m). Two partials merge as
m = max(m1, m2), o = e^(m1 - m) o1 + e^(m2 - m) o2, l = e^(m1 - m) l1 + e^(m2 - m) l2, which is
associative and commutative, with (o = 0, m = -inf, l = 0) the identity; ``finalize`` returns
o / l. So keys may be split across workers, a cache may be scanned in pieces, and the pieces
merged in any order or tree (decoding with a long cache, ring / sequence-parallel attention).
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch
from torch import Tensor

from leantorch.errors import LeanError, LeanTypeError, describe
from leantorch.ops.attention._common import (
    causal_allowed,
    check_key_padding_mask,
    check_mask,
    check_positive_int,
    check_qkv,
    resolve_scale,
)

__all__ = [
    "AttentionPartial",
    "finalize",
    "merge_partials",
    "partial_attention",
    "split_kv_attention",
]


class AttentionPartial(NamedTuple):
    """Attention of some queries over a subset of the keys, before normalisation.

    o: (batch, q_heads, q_len, value_dim), sum_j exp(s_j - m) v_j.
    m: (batch, q_heads, q_len), row max of the scaled, masked scores (-inf: no allowed key).
    l: (batch, q_heads, q_len), sum_j exp(s_j - m).
    """

    o: Tensor
    m: Tensor
    l: Tensor  # noqa: E741 (the name of the paper's row sum)

    @classmethod
    def identity(cls, batch: int, q_heads: int, q_len: int, value_dim: int, *,
                 dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> AttentionPartial:
        """The merge identity: attention over no key (o = 0, m = -inf, l = 0)."""
        return cls(torch.zeros(batch, q_heads, q_len, value_dim, dtype=dtype, device=device),
                   torch.full((batch, q_heads, q_len), -math.inf, dtype=dtype, device=device),
                   torch.zeros(batch, q_heads, q_len, dtype=dtype, device=device))


def partial_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    mask: Tensor | None = None,
) -> AttentionPartial:
    """The partial (o, m, l) of q over the keys k, v (one chunk of a longer key sequence).

    Args:
        q: (batch, q_heads, q_len, head_dim).
        k: (batch, kv_heads, chunk_len, head_dim).
        v: (batch, kv_heads, chunk_len, value_dim).
        scale: default head_dim ** -0.5.
        mask: boolean (True = may attend) or additive float, broadcastable to
            (batch, q_heads, q_len, chunk_len): the chunk's slice of the full mask.

    Returns:
        :class:`AttentionPartial`. ``m`` only stabilises the exponentials (the final output does
        not depend on it), so it carries no gradient.
    """
    op = "partial_attention"
    shapes = check_qkv(op, q, k, v)
    check_mask(op, mask, shapes)
    scale = resolve_scale(op, scale, shapes.head_dim)
    batch, q_heads, kv_heads, q_len, k_len, head_dim, value_dim = shapes
    q_grouped = q.reshape(batch, kv_heads, shapes.groups * q_len, head_dim)
    scores = (q_grouped @ k.transpose(-1, -2)).mul_(scale)
    scores = scores.view(batch, q_heads, q_len, k_len)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, -math.inf)
        else:
            scores = scores + mask.to(scores.dtype)
    if k_len == 0:
        row_max = scores.new_full((batch, q_heads, q_len), -math.inf)
    else:
        row_max = scores.detach().amax(-1)
    shift = row_max.masked_fill(row_max == -math.inf, 0.0)
    probs = torch.exp(scores - shift.unsqueeze(-1))
    total = probs.sum(-1)
    out = probs.view(batch, kv_heads, shapes.groups * q_len, k_len) @ v
    return AttentionPartial(out.view(batch, q_heads, q_len, value_dim), row_max, total)


def _check_partial(name: str, p: object) -> AttentionPartial:
    if not isinstance(p, AttentionPartial):
        raise LeanTypeError(f"merge_partials: {name} must be an AttentionPartial, got "
                            f"{type(p).__name__} {describe(p)}")
    return p


def merge_partials(a: AttentionPartial, b: AttentionPartial) -> AttentionPartial:
    """Merge two partials over disjoint key sets into the partial over their union.

    Associative and commutative; ``AttentionPartial.identity(...)`` (m = -inf) is the identity.
    """
    a, b = _check_partial("a", a), _check_partial("b", b)
    if a.o.shape != b.o.shape:
        raise LeanError(f"merge_partials: partials must cover the same queries, got o shapes "
                        f"{tuple(a.o.shape)} and {tuple(b.o.shape)}")
    row_max = torch.maximum(a.m, b.m)
    shift = row_max.masked_fill(row_max == -math.inf, 0.0)
    weight_a = torch.exp(a.m - shift)  # 0 where a saw no key (m = -inf)
    weight_b = torch.exp(b.m - shift)
    out = weight_a.unsqueeze(-1) * a.o + weight_b.unsqueeze(-1) * b.o
    return AttentionPartial(out, row_max, weight_a * a.l + weight_b * b.l)


def finalize(p: AttentionPartial) -> Tensor:
    """o / l: (batch, q_heads, q_len, value_dim); a query with no allowed key gives 0."""
    p = _check_partial("p", p)
    total = p.l.masked_fill(p.l == 0, 1.0)
    return p.o / total.unsqueeze(-1)


def split_kv_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    num_splits: int,
    scale: float | None = None,
    causal: bool = False,
    mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Attention computed as ``num_splits`` partials over contiguous key chunks, merged as a
    balanced tree, then normalised: equal to :func:`naive_attention` with the same arguments.

    Args:
        q: (batch, q_heads, q_len, head_dim).
        k: (batch, kv_heads, k_len, head_dim).
        v: (batch, kv_heads, k_len, value_dim).
        num_splits: number of key chunks (sizes differ by at most one; more splits than keys
            leaves some empty, which merge as the identity).
        scale, causal, mask, key_padding_mask: as in :func:`naive_attention` (causal is
            bottom-right aligned).

    Returns:
        (batch, q_heads, q_len, value_dim).
    """
    op = "split_kv_attention"
    shapes = check_qkv(op, q, k, v)
    check_mask(op, mask, shapes)
    check_key_padding_mask(op, key_padding_mask, shapes)
    check_positive_int(op, "num_splits", num_splits)
    scale = resolve_scale(op, scale, shapes.head_dim)
    full_mask = None
    if mask is not None:
        full_mask = mask.expand(shapes.batch, shapes.q_heads, shapes.q_len, shapes.k_len)
    partials = []
    bounds = torch.linspace(0, shapes.k_len, num_splits + 1).round().long().tolist()
    for k0, k1 in itertools.pairwise(bounds):
        if k1 == k0:
            continue
        chunk_mask = None if full_mask is None else full_mask[..., k0:k1]
        allowed = None
        if causal:
            allowed = causal_allowed(shapes.q_len, shapes.k_len, q.device, 0, k0, None, k1 - k0)
        if key_padding_mask is not None:
            padding = key_padding_mask[:, None, None, k0:k1]
            allowed = padding if allowed is None else allowed & padding
        if allowed is not None:
            if chunk_mask is None:
                chunk_mask = allowed
            elif chunk_mask.dtype == torch.bool:
                chunk_mask = chunk_mask & allowed
            else:
                chunk_mask = chunk_mask.to(q.dtype).masked_fill(~allowed, -math.inf)
        partials.append(partial_attention(q, k[:, :, k0:k1], v[:, :, k0:k1], scale=scale,
                                          mask=chunk_mask))
    if not partials:  # no key at all
        return q.new_zeros(shapes.batch, shapes.q_heads, shapes.q_len, shapes.value_dim)
    while len(partials) > 1:  # balanced tree: log2(num_splits) levels of pairwise merges
        merged = [merge_partials(a, b) for a, b in zip(partials[::2], partials[1::2],
                                                      strict=False)]
        partials = merged + ([partials[-1]] if len(partials) % 2 else [])
    return finalize(partials[0])
