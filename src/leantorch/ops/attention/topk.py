"""Top-k attention: each query keeps its ``topk`` largest allowed scores, softmax over those, and
mixes only the ``topk`` values it kept.

What is computed (and what ``leantorch.measure`` counts), per query head and query:
- Q K^T against every key it may see (all k_len keys; with ``causal``, keys past the last query
  of its block are skipped): picking the top k needs every score, so this part is not cheaper
  than dense attention (avoiding it needs a predictor, as in Spark Transformer);
- ``torch.topk`` over those scores and a softmax over the k kept;
- the weighted sum of the k kept value rows, gathered: topk * value_dim MACs instead of
  k_len * value_dim (no multiplication by a mostly-zero matrix).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from leantorch.ops.attention._common import (
    causal_allowed,
    check_key_padding_mask,
    check_mask,
    check_positive_int,
    check_qkv,
    masked_softmax,
    resolve_scale,
)

__all__ = ["topk_attention"]


def topk_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    topk: int,
    causal: bool = False,
    mask: Tensor | None = None,
    scale: float | None = None,
    key_padding_mask: Tensor | None = None,
    block_q: int = 256,
) -> Tensor:
    """Attention where each query keeps its ``topk`` largest allowed scores.

    Masks are applied first (a query with fewer than ``topk`` allowed keys keeps them all);
    ties at the k-th score are broken arbitrarily (by ``torch.topk``). ``topk >= k_len`` is
    dense attention.

    Args:
        q: (batch, q_heads, q_len, head_dim).
        k: (batch, kv_heads, k_len, head_dim).
        v: (batch, kv_heads, k_len, value_dim).
        topk: keys kept per query.
        causal: bottom-right aligned (query i sees keys 0..k_len - q_len + i).
        mask: boolean (True = may attend) or additive float, broadcastable to
            (batch, q_heads, q_len, k_len); an additive mask shifts scores before selection.
        scale: default head_dim ** -0.5.
        key_padding_mask: boolean (batch, k_len), True = real token.
        block_q: queries per block (scores are held for one block at a time:
            block_q x k_len per query head).

    Returns:
        (batch, q_heads, q_len, value_dim); a query with no allowed key gives 0.
    """
    op = "topk_attention"
    shapes = check_qkv(op, q, k, v)
    check_mask(op, mask, shapes)
    check_key_padding_mask(op, key_padding_mask, shapes)
    scale = resolve_scale(op, scale, shapes.head_dim)
    check_positive_int(op, "topk", topk)
    check_positive_int(op, "block_q", block_q)
    b, hq, hk, g, nq, nk, d, dv = (shapes.batch, shapes.q_heads, shapes.kv_heads, shapes.groups,
                                   shapes.q_len, shapes.k_len, shapes.head_dim,
                                   shapes.value_dim)
    grouped = (b, hk, g, nq, nk)
    blocked = additive = None
    if mask is not None:
        expanded = mask.expand(b, hq, nq, nk).view(grouped)
        if mask.dtype == torch.bool:
            blocked = ~expanded
        else:
            additive = expanded.to(q.dtype)
    offset = nk - nq
    batch_index = torch.arange(b, device=q.device)[:, None, None, None]
    head_index = torch.arange(hk, device=q.device)[None, :, None, None]
    out = q.new_zeros(b, hq, nq, dv)
    for q0 in range(0, nq, block_q):
        q1 = min(q0 + block_q, nq)
        rows = q1 - q0
        # with causal, keys after the block's last query are never seen: not computed
        keys_seen = min(nk, max(0, q1 - 1 + offset + 1)) if causal else nk
        if keys_seen == 0:
            continue
        queries = q[:, :, q0:q1].reshape(b, hk, g * rows, d)
        scores = (queries @ k[:, :, :keys_seen].transpose(-1, -2)).mul_(scale)
        view = scores.view(b, hk, g, rows, keys_seen)
        if causal:
            allowed = causal_allowed(nq, nk, q.device, q0, 0, rows, keys_seen)
            view.masked_fill_(~allowed, -math.inf)
        if blocked is not None:
            view.masked_fill_(blocked[..., q0:q1, :keys_seen], -math.inf)
        if additive is not None:
            view.add_(additive[..., q0:q1, :keys_seen])
        if key_padding_mask is not None:
            padding = ~key_padding_mask[:, None, None, None, :keys_seen]
            view.masked_fill_(padding, -math.inf)
        kept_scores, kept = scores.topk(min(topk, keys_seen), dim=-1, sorted=False)
        weights = masked_softmax(kept_scores)  # (b, hk, g * rows, topk)
        kept_values = v[batch_index, head_index, kept]  # (b, hk, g * rows, topk, dv)
        block_out = (weights.unsqueeze(-2) @ kept_values).squeeze(-2)
        out[:, :, q0:q1] = block_out.view(b, hq, rows, dv)
    return out
