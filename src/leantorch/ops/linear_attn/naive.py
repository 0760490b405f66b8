"""Readable references for linear attention and gated linear attention (GLA).

These are the oracles every fast mode is tested against: they materialise everything (the
q_len x k_len score matrix, and for GLA the q_len x k_len x key_dim decay tensor), so they cost
O(n^2) time and memory. Use :func:`linear_attention` / :func:`gated_linear_attention` for real work.

Causal convention (all leantorch attention ops): bottom-right aligned. Query ``i`` sits at the
absolute position ``k_len - q_len + i`` and sees keys ``0 .. k_len - q_len + i``.
"""

from __future__ import annotations

import torch

from leantorch.ops.linear_attn._checks import check_eps, check_log_decay, check_qkv, check_scale
from leantorch.ops.linear_attn.feature_maps import FeatureMap
from leantorch.ops.linear_attn.feature_maps import feature_map as resolve_feature_map

__all__ = ["naive_gla", "naive_linear_attention"]


def _causal_keep(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """(q_len, k_len) boolean: True where query i may see key j (j <= k_len - q_len + i)."""
    ones = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    return ones.tril(diagonal=k_len - q_len)


def naive_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str | FeatureMap = "elu",
    causal: bool = True,
    normalize: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Linear attention, written as plainly as possible.

    ``out_i = sum_j phi(q_i).phi(k_j) v_j / (sum_j phi(q_i).phi(k_j) + eps)`` over the keys ``j``
    query ``i`` may see (all of them, or the causal ones); without ``normalize`` the division is
    left out.

    Args:
        q: (batch, heads, q_len, head_dim).
        k: (batch, heads, k_len, head_dim).
        v: (batch, heads, k_len, value_dim).
        feature_map: a name in ``FEATURE_MAPS`` ("elu", "relu", "taylor", "identity") or a
            callable ``(..., head_dim) -> (..., feat_dim)``.

    Returns:
        (batch, heads, q_len, value_dim).
    """
    check_qkv("naive_linear_attention", q, k, v, causal=causal)
    eps = check_eps("naive_linear_attention", eps)
    phi = resolve_feature_map(feature_map)
    scores = phi(q) @ phi(k).transpose(-1, -2)  # (batch, heads, q_len, k_len)
    if causal:
        scores = scores * _causal_keep(q.shape[2], k.shape[2], q.device)
    out = scores @ v
    if normalize:
        out = out / (scores.sum(dim=-1, keepdim=True) + eps)
    return out


def naive_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Gated linear attention (GLA), materialising the per-channel decay between every query and
    key.

    The recurrence ``S_t = diag(exp(log_decay_t)) S_{t-1} + k_t^T v_t``, ``o_t = (scale q_t) S_t``
    unrolls to

        o_t = sum_{s <= t} sum_i scale q_ti k_si exp(sum_{r=s+1..t} log_decay_ri) v_s,

    computed here literally: the exponent is a difference of cumulative sums (always <= 0, so the
    exponential cannot overflow). Causal by nature; no normaliser.

    Args:
        q: (batch, heads, q_len, key_dim).
        k: (batch, heads, k_len, key_dim).
        v: (batch, heads, k_len, value_dim).
        log_decay: (batch, heads, k_len, key_dim), values <= 0: the log of the decay applied to
            the state at each step (``F.logsigmoid(x) / 16`` in the GLA paper).
        scale: multiplies q; defaults to ``key_dim ** -0.5``.

    Returns:
        (batch, heads, q_len, value_dim).
    """
    check_qkv("naive_gla", q, k, v, causal=True)
    check_log_decay("naive_gla", log_decay, k)
    scale = check_scale("naive_gla", scale, q.shape[-1])
    q_len, k_len = q.shape[2], k.shape[2]
    total = log_decay.cumsum(dim=2)  # total[t] = sum_{r <= t} log_decay[r]
    total_at_query = total[:, :, k_len - q_len :]  # queries sit at the last q_len positions
    # exponent[b, h, i, s, c] = sum over r in (s, pos(i)] of log_decay[r, c]
    exponent = total_at_query.unsqueeze(3) - total.unsqueeze(2)
    keep = _causal_keep(q_len, k_len, q.device)
    decay = exponent.masked_fill(~keep[:, :, None], float("-inf")).exp()
    scores = (scale * q.unsqueeze(3) * k.unsqueeze(2) * decay).sum(dim=-1)  # (b, h, q, k)
    return scores @ v
