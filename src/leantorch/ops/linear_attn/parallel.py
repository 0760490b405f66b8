"""Parallel mode: the whole q_len x k_len causal score matrix, materialised.

Cost O(q_len * k_len * (f + e)) time and O(q_len * k_len) memory: the quadratic form, fastest
for short sequences and the easiest to check.
"""

from __future__ import annotations

import torch

from leantorch.ops.linear_attn.chunk import (
    choose_sub_chunk,
    decayed_chunk_scores,
    sub_chunk_candidates,
)

__all__ = ["gla_parallel", "linear_parallel"]


def linear_parallel(
    fq: torch.Tensor, fk: torch.Tensor, values: torch.Tensor, state: torch.Tensor, *, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``out = mask(phi(Q) phi(K)^T) V + phi(Q) S0``; the new state is ``S0 + phi(K)^T V``.

    fq: (batch, heads, q_len, f); fk: (batch, heads, k_len, f); values: (batch, heads, k_len, e);
    state: (batch, heads, f, e). Causal is bottom-right aligned.
    """
    scores = fq @ fk.transpose(-1, -2)  # (batch, heads, q_len, k_len)
    if causal:
        scores = scores.tril_(diagonal=fk.shape[2] - fq.shape[2])
    out = scores @ values + fq @ state
    return out, state + fk.transpose(-1, -2) @ values


def gla_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    state: torch.Tensor,
    *,
    sub_chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GLA with the n x n decayed score matrix: one chunk spanning the sequence, computed with the
    stable reference-point factorisation of :mod:`leantorch.ops.linear_attn.chunk` (with strong
    decays the sub-blocks shrink and memory grows to O(n^2 key_dim / sub_block)).

    q (already scaled), k, log_decay: (batch, heads, n, key_dim); v: (batch, heads, n,
    value_dim); state: (batch, heads, key_dim, value_dim).
    """
    n = k.shape[2]
    if n == 0:
        return q.new_zeros(*q.shape[:3], v.shape[-1]), state
    within = log_decay.cumsum(dim=2)  # log decay from the sequence start (inclusive)
    sub_chunk = choose_sub_chunk(within, sub_chunk_candidates(n, sub_chunk_size))
    terms = decayed_chunk_scores(q, k, within, sub_chunk)
    out = terms.scores @ v + terms.q_read @ state
    decay = within[:, :, -1, :, None].exp()
    written = terms.k_write.transpose(-1, -2) @ v
    new_state = (state + written) * decay if terms.decay_after else state * decay + written
    return out, new_state
