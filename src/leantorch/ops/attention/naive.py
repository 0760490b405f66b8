"""The reference: softmax(Q K^T * scale + mask) V, written to be read, materialising every score.

Every faster op in ``leantorch.ops.attention`` is tested against :func:`naive_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from leantorch.errors import LeanError, describe
from leantorch.ops.attention._common import (
    causal_allowed,
    check_key_padding_mask,
    check_mask,
    check_qkv,
    resolve_scale,
)

__all__ = ["naive_attention", "softmax_or_zero"]


def softmax_or_zero(scores: Tensor) -> Tensor:
    """Softmax over the last dim where a row with no allowed key (all -inf) gives 0, not NaN,
    and gets zero gradient.

    The row max only stabilises the exponent (softmax does not depend on it), so it is detached.
    """
    row_max = scores.amax(-1, keepdim=True).detach()
    row_max = row_max.masked_fill(row_max == float("-inf"), 0.0)  # empty row: exp(-inf) = 0
    exp = torch.exp(scores - row_max)
    total = exp.sum(-1, keepdim=True)
    return exp / total.masked_fill(total == 0, 1.0)


def naive_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    dropout: float = 0.0,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Plain softmax attention, the oracle of this package.

    Args:
        q: (batch, q_heads, q_len, head_dim).
        k: (batch, kv_heads, k_len, head_dim); q_heads % kv_heads == 0 (grouped-query attention:
            each KV head serves q_heads // kv_heads consecutive query heads).
        v: (batch, kv_heads, k_len, value_dim).
        causal: bottom-right aligned: query i sits at absolute position k_len - q_len + i and sees
            keys 0..k_len - q_len + i (the usual lower triangle when q_len == k_len).
        mask: boolean (True = may attend) or additive float, broadcastable to
            (batch, q_heads, q_len, k_len).
        key_padding_mask: boolean (batch, k_len), True = real token.
        scale: multiplies Q K^T; default head_dim ** -0.5.
        dropout: probability of zeroing an attention weight (applied whenever > 0; the survivors
            are scaled by 1 / (1 - dropout)). Pass 0 at evaluation time.
        return_weights: also return the weights multiplied into V.

    Returns:
        out: (batch, q_heads, q_len, value_dim); a query with no allowed key gives 0.
        weights (with ``return_weights``): (batch, q_heads, q_len, k_len), the weights actually
        multiplied into V (after dropout, so their rows sum to 1 only without dropout).
    """
    op = "naive_attention"
    shapes = check_qkv(op, q, k, v)
    check_mask(op, mask, shapes)
    check_key_padding_mask(op, key_padding_mask, shapes)
    scale = resolve_scale(op, scale, shapes.head_dim)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise LeanError(f"{op}: dropout must be a probability in [0, 1), got {describe(dropout)}")
    batch, q_heads, kv_heads, q_len, k_len, head_dim, value_dim = shapes

    # Grouped-query attention without repeating K/V: the `groups` query heads of one KV head are
    # stacked along the sequence axis, (batch, kv_heads, groups * q_len, head_dim), a pure view.
    q_grouped = q.reshape(batch, kv_heads, shapes.groups * q_len, head_dim)
    scores = (q_grouped @ k.transpose(-1, -2)) * scale
    scores = scores.reshape(batch, q_heads, q_len, k_len)

    allowed = None
    if causal:
        allowed = causal_allowed(q_len, k_len, q.device)
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = mask if allowed is None else allowed & mask
        else:
            scores = scores + mask.to(scores.dtype)
    if key_padding_mask is not None:
        padding = key_padding_mask[:, None, None, :]
        allowed = padding if allowed is None else allowed & padding
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))

    weights = softmax_or_zero(scores)
    if dropout > 0:
        weights = F.dropout(weights, dropout, training=True)
    out = weights.reshape(batch, kv_heads, shapes.groups * q_len, k_len) @ v
    out = out.reshape(batch, q_heads, q_len, value_dim)
    return (out, weights) if return_weights else out
