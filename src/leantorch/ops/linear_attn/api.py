"""``linear_attention`` and ``gated_linear_attention``: one entry point per op, three modes.

=========== ======================================== ===================== ===================
mode        computes                                 time                  memory
=========== ======================================== ===================== ===================
parallel    the masked n x n score matrix            O(n^2 (f + e))        O(n^2)
recurrent   a loop over positions carrying the state O(n f e)              O(f e) (+ autograd)
chunk       parallel inside chunks, state between    O(n C (f + e) + n f e) O(n (f+e) + n/C f e)
=========== ======================================== ===================== ===================

(n positions, C = chunk_size, f the feature/key size, e the value size.) All three compute the
same function; the chunk mode is the one to use for long sequences and training.
"""

from __future__ import annotations

from typing import Literal, overload

import torch

from leantorch.errors import LeanError, LeanTypeError, describe
from leantorch.ops.linear_attn._checks import (
    check_eps,
    check_log_decay,
    check_mode,
    check_positive_int,
    check_qkv,
    check_scale,
    check_state_tensor,
)
from leantorch.ops.linear_attn._common import finish, with_ones
from leantorch.ops.linear_attn.chunk import gla_chunk, linear_chunk
from leantorch.ops.linear_attn.feature_maps import FeatureMap
from leantorch.ops.linear_attn.feature_maps import feature_map as resolve_feature_map
from leantorch.ops.linear_attn.parallel import gla_parallel, linear_parallel
from leantorch.ops.linear_attn.recurrent import gla_recurrent, linear_recurrent
from leantorch.ops.linear_attn.state import LinearAttentionState

__all__ = ["gated_linear_attention", "linear_attention"]

Mode = Literal["parallel", "recurrent", "chunk"]


@overload
def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, feature_map: str | FeatureMap = ...,
    causal: bool = ..., normalize: bool = ..., mode: Mode = ..., chunk_size: int = ...,
    eps: float = ..., initial_state: LinearAttentionState | None = ...,
    return_state: Literal[False] = ...,
) -> torch.Tensor: ...


@overload
def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, feature_map: str | FeatureMap = ...,
    causal: bool = ..., normalize: bool = ..., mode: Mode = ..., chunk_size: int = ...,
    eps: float = ..., initial_state: LinearAttentionState | None = ...,
    return_state: Literal[True],
) -> tuple[torch.Tensor, LinearAttentionState]: ...


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str | FeatureMap = "elu",
    causal: bool = True,
    normalize: bool = True,
    mode: Mode = "chunk",
    chunk_size: int = 64,
    eps: float = 1e-6,
    initial_state: LinearAttentionState | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, LinearAttentionState]:
    """Linear attention: softmax(q.k) replaced by a kernel phi(q).phi(k).

    ``out_i = phi(q_i) S_i / (phi(q_i) . z_i + eps)`` where ``S_i = sum_j phi(k_j)^T v_j`` and
    ``z_i = sum_j phi(k_j)`` run over the keys query ``i`` sees (with ``initial_state`` added);
    ``normalize=False`` drops the division. Equals :func:`naive_linear_attention`.

    Args:
        q: (batch, heads, q_len, head_dim).
        k: (batch, heads, k_len, head_dim) (heads equal to q's: repeat grouped K/V heads first).
        v: (batch, heads, k_len, value_dim).
        feature_map: "elu" (elu+1), "relu", "taylor" (Based's 1 + s + s^2/2), "identity", or a
            callable ``(..., head_dim) -> (..., feat_dim)``.
        causal: bottom-right aligned (query i sees keys 0 .. k_len - q_len + i); False: every
            query sees every key.
        normalize: divide by ``phi(q_i) . z_i + eps``.
        mode: "parallel" | "recurrent" | "chunk" (see the module docstring for their costs).
        chunk_size: positions per chunk in "chunk" mode (a ragged last chunk is fine).
        initial_state: the state earlier tokens left, as returned with ``return_state=True``;
            its keys count as earlier than every key here.
        return_state: also return the state after the last key (to continue with more tokens or
            :func:`linear_attention_step`).

    Returns:
        out (batch, heads, q_len, value_dim), or ``(out, LinearAttentionState)``.
    """
    op = "linear_attention"
    check_qkv(op, q, k, v, causal=causal)
    check_mode(op, mode)
    chunk_size = check_positive_int(op, "chunk_size", chunk_size)
    eps = check_eps(op, eps)
    phi = resolve_feature_map(feature_map)
    batch, heads, k_len, _ = k.shape
    value_dim = v.shape[-1]
    feat = phi(k[:, :, :0]).shape[-1]
    # With the normaliser (or a state to return) the key sum rides along as an extra value
    # column of ones (see _common.with_ones).
    with_sum = normalize or return_state
    state = _linear_initial_state(op, initial_state, batch, heads, feat, v, with_sum)
    prefix = k_len - q.shape[2]
    if causal and prefix > 0 and mode != "parallel":
        # Keys before the first query's position are seen by every query: fold them into the
        # state, leaving q_len == k_len.
        head = with_ones(v[:, :, :prefix]) if with_sum else v[:, :, :prefix]
        state = state + phi(k[:, :, :prefix]).transpose(-1, -2) @ head
        k, v = k[:, :, prefix:], v[:, :, prefix:]
    if mode == "chunk":
        out, state = linear_chunk(q, k, v, state, phi=phi, causal=causal, chunk_size=chunk_size,
                                  normalize=normalize, eps=eps)
    else:
        values = with_ones(v) if with_sum else v
        run = linear_parallel if mode == "parallel" else linear_recurrent
        out, state = run(phi(q), phi(k), values, state, causal=causal)
        out = finish(out, value_dim, normalize, eps)
    if not return_state:
        return out
    return out, LinearAttentionState(state[..., :value_dim], state[..., value_dim])


def _linear_initial_state(
    op: str,
    initial_state: object,
    batch: int,
    heads: int,
    feat: int,
    v: torch.Tensor,
    with_sum: bool,
) -> torch.Tensor:
    """The state as one tensor (batch, heads, feat, value_dim [+ 1 for the key sum])."""
    value_dim = v.shape[-1]
    if initial_state is None:
        return v.new_zeros(batch, heads, feat, value_dim + with_sum)
    if not isinstance(initial_state, LinearAttentionState):
        raise LeanTypeError(
            f"{op}: initial_state={describe(initial_state)} must be a LinearAttentionState "
            f"or None")
    kv = check_state_tensor(
        op, "initial_state.kv", initial_state.kv, (batch, heads, feat, value_dim), v)
    if not with_sum:
        return kv
    k_sum = check_state_tensor(
        op, "initial_state.k_sum", initial_state.k_sum, (batch, heads, feat), v)
    return torch.cat([kv, k_sum.unsqueeze(-1)], dim=-1)


@overload
def gated_linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, *,
    scale: float | None = ..., mode: Mode = ..., chunk_size: int = ...,
    initial_state: torch.Tensor | None = ..., return_state: Literal[False] = ...,
    sub_chunk_size: int | None = ...,
) -> torch.Tensor: ...


@overload
def gated_linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, *,
    scale: float | None = ..., mode: Mode = ..., chunk_size: int = ...,
    initial_state: torch.Tensor | None = ..., return_state: Literal[True],
    sub_chunk_size: int | None = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


def gated_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    *,
    scale: float | None = None,
    mode: Mode = "chunk",
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    return_state: bool = False,
    sub_chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Gated linear attention (GLA, Yang et al. 2023): a data-dependent diagonal decay.

    ``S_t = diag(exp(log_decay_t)) S_{t-1} + k_t^T v_t``, ``o_t = scale * q_t S_t``; causal
    (bottom-right aligned when q_len < k_len), no normaliser. ``log_decay = 0`` gives plain
    unnormalised causal linear attention with the identity feature map. Equals :func:`naive_gla`.

    Args:
        q: (batch, heads, q_len, key_dim).
        k: (batch, heads, k_len, key_dim).
        v: (batch, heads, k_len, value_dim).
        log_decay: (batch, heads, k_len, key_dim), finite values <= 0 (log of the decay in
            (0, 1]; GLA uses ``F.logsigmoid(x) / 16``).
        scale: multiplies q; defaults to ``key_dim ** -0.5``.
        mode: "parallel" | "recurrent" | "chunk".
        chunk_size: positions per chunk in "chunk" mode (a ragged last chunk is fine).
        initial_state: (batch, heads, key_dim, value_dim), the state earlier tokens left.
        return_state: also return the state after the last key.
        sub_chunk_size: force the intra-chunk sub-block size of the stable factorisation (a
            divisor of chunk_size, or of the length in "parallel" mode); None picks the largest
            safe one. See :mod:`leantorch.ops.linear_attn.chunk`.

    Returns:
        out (batch, heads, q_len, value_dim), or ``(out, final_state)``.
    """
    op = "gated_linear_attention"
    check_qkv(op, q, k, v, causal=True)
    check_log_decay(op, log_decay, k)
    check_mode(op, mode)
    chunk_size = check_positive_int(op, "chunk_size", chunk_size)
    scale = check_scale(op, scale, q.shape[-1])
    batch, heads, k_len, key_dim = k.shape
    if sub_chunk_size is not None:
        sub_chunk_size = check_positive_int(op, "sub_chunk_size", sub_chunk_size)
        span = chunk_size if mode == "chunk" else k_len
        if mode != "recurrent" and span % sub_chunk_size:
            raise LeanError(
                f"{op}: sub_chunk_size={sub_chunk_size} does not divide "
                f"{'chunk_size' if mode == 'chunk' else 'the length'} {span}")
    shape = (batch, heads, key_dim, v.shape[-1])
    if initial_state is None:
        state = v.new_zeros(shape)
    else:
        state = check_state_tensor(op, "initial_state", initial_state, shape, v)
    if scale != 1.0 and mode != "chunk":  # the chunk mode scales its output instead
        q = q * scale
    prefix = k_len - q.shape[2]
    if prefix:
        # Queries sit at the last q_len positions: give the earlier positions zero queries
        # (they still update the state) and drop their outputs.
        q = torch.cat([q.new_zeros(batch, heads, prefix, key_dim), q], dim=2)
    if mode == "parallel":
        out, state = gla_parallel(q, k, v, log_decay, state, sub_chunk_size=sub_chunk_size)
    elif mode == "recurrent":
        out, state = gla_recurrent(q, k, v, log_decay, state)
    else:
        out, state = gla_chunk(q, k, v, log_decay, state, scale=scale, chunk_size=chunk_size,
                               sub_chunk_size=sub_chunk_size)
    if prefix:
        out = out[:, :, prefix:]
    return (out, state) if return_state else out
