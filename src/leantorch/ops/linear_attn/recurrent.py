"""Recurrent mode: a loop over time carrying the O(1)-size state, and the one-token step
functions used for decoding.

Cost per token: O(feat_dim * value_dim) time and the state's memory, whatever the context length.
The full-sequence loops below are the plainest O(n) form; with autograd they keep one state per
step for backward (O(n * feat_dim * value_dim) memory), so train with the chunk mode instead.
"""

from __future__ import annotations

import torch

from leantorch.errors import LeanError, LeanTypeError, describe
from leantorch.ops.linear_attn._checks import (
    check_eps,
    check_log_decay,
    check_qkv,
    check_scale,
    check_state_tensor,
)
from leantorch.ops.linear_attn.feature_maps import FeatureMap
from leantorch.ops.linear_attn.feature_maps import feature_map as resolve_feature_map
from leantorch.ops.linear_attn.state import LinearAttentionState

__all__ = ["gla_step", "linear_attention_step"]


def linear_recurrent(
    fq: torch.Tensor, fk: torch.Tensor, values: torch.Tensor, state: torch.Tensor, *, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loop over positions: ``S += phi(k_t)^T v_t``, ``out_t = phi(q_t) S``.

    fq: (batch, heads, n, feat_dim) with n == k_len when causal (a longer key prefix has been
    folded into ``state``); fk: (batch, heads, k_len, feat_dim); values: (batch, heads, k_len, e);
    state: (batch, heads, feat_dim, e). Returns out (batch, heads, n, e) and the final state.
    """
    outputs = []
    for t in range(fk.shape[2]):
        state = state + fk[:, :, t, :, None] * values[:, :, t, None, :]
        if causal:
            outputs.append(fq[:, :, t, None, :] @ state)
    if not causal:  # every query sees every key: read the state once all keys are in
        return fq @ state, state
    if not outputs:
        return fq.new_zeros(*fq.shape[:3], values.shape[-1]), state
    return torch.cat(outputs, dim=2), state


def gla_recurrent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loop over positions: ``S = diag(exp(g_t)) S + k_t^T v_t``, ``out_t = q_t S``.

    q (already scaled), k: (batch, heads, n, key_dim); v: (batch, heads, n, value_dim);
    log_decay: like k; state: (batch, heads, key_dim, value_dim).
    """
    decay = log_decay.exp()
    outputs = []
    for t in range(k.shape[2]):
        state = state * decay[:, :, t, :, None] + k[:, :, t, :, None] * v[:, :, t, None, :]
        outputs.append(q[:, :, t, None, :] @ state)
    if not outputs:
        return q.new_zeros(*q.shape[:3], v.shape[-1]), state
    return torch.cat(outputs, dim=2), state


def _check_single_token(op: str, q: torch.Tensor, k: torch.Tensor) -> None:
    if q.shape[2] != 1 or k.shape[2] != 1:
        raise LeanError(
            f"{op}: q_len={q.shape[2]}, k_len={k.shape[2]}; a step takes one token "
            f"(q, k, v of shape (batch, heads, 1, dim)); use the full op for longer inputs"
        )


def linear_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: LinearAttentionState | None = None,
    *,
    feature_map: str | FeatureMap = "elu",
    normalize: bool = True,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, LinearAttentionState]:
    """One decoding step of causal linear attention.

    Args:
        q, k: (batch, heads, 1, head_dim); v: (batch, heads, 1, value_dim).
        state: what earlier tokens left (``LinearAttentionState``: kv (batch, heads, feat_dim,
            value_dim), k_sum (batch, heads, feat_dim)); None means nothing seen yet.

    Returns:
        ``(out, new_state)`` with out (batch, heads, 1, value_dim). Running every token of a
        sequence through this equals ``linear_attention(..., causal=True)`` on the whole.
    """
    op = "linear_attention_step"
    check_qkv(op, q, k, v, causal=True)
    _check_single_token(op, q, k)
    eps = check_eps(op, eps)
    phi = resolve_feature_map(feature_map)
    fq, fk = phi(q), phi(k)  # (batch, heads, 1, feat_dim)
    batch, heads, _, feat = fk.shape
    if state is None:
        state = LinearAttentionState.zeros(
            batch, heads, feat, v.shape[-1], dtype=v.dtype, device=v.device)
    elif not isinstance(state, LinearAttentionState):
        raise LeanTypeError(
            f"{op}: state={describe(state)} must be a LinearAttentionState or None")
    kv = check_state_tensor(op, "state.kv", state.kv, (batch, heads, feat, v.shape[-1]), v)
    k_sum = check_state_tensor(op, "state.k_sum", state.k_sum, (batch, heads, feat), v)
    kv = kv + fk.transpose(-1, -2) @ v
    k_sum = k_sum + fk[:, :, 0]
    out = fq @ kv
    if normalize:
        out = out / ((fq[:, :, 0] * k_sum).sum(-1)[..., None, None] + eps)
    return out, LinearAttentionState(kv, k_sum)


def gla_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    state: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step of gated linear attention.

    ``S = diag(exp(log_decay)) S + k^T v``, ``out = scale * q S``.

    Args:
        q, k, log_decay: (batch, heads, 1, key_dim); v: (batch, heads, 1, value_dim).
        state: (batch, heads, key_dim, value_dim) or None (zeros).

    Returns:
        ``(out, new_state)`` with out (batch, heads, 1, value_dim).
    """
    op = "gla_step"
    check_qkv(op, q, k, v, causal=True)
    _check_single_token(op, q, k)
    check_log_decay(op, log_decay, k)
    scale = check_scale(op, scale, q.shape[-1])
    shape = (q.shape[0], q.shape[1], k.shape[-1], v.shape[-1])
    if state is None:
        state = v.new_zeros(shape)
    state = check_state_tensor(op, "state", state, shape, v)
    state = state * log_decay.exp().transpose(-1, -2) + k.transpose(-1, -2) @ v
    return (q * scale) @ state, state
