"""Argument checks shared by the linear-attention ops: each error names the argument, the value
seen and what is accepted."""

from __future__ import annotations

import math

import torch

from leantorch.errors import LeanError, LeanTypeError, describe
from leantorch.validate import positive_int

MODES = ("parallel", "recurrent", "chunk")


def check_qkv(op: str, q: object, k: object, v: object, *, causal: bool = True) -> None:
    """q: (batch, heads, q_len, head_dim), k: (batch, heads, k_len, head_dim),
    v: (batch, heads, k_len, value_dim); same dtype (floating) and device; causal needs
    q_len <= k_len (bottom-right aligned)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise LeanTypeError(f"{op}: {name}={describe(x)} must be a torch.Tensor")
        if x.dim() != 4:
            raise LeanError(
                f"{op}: {name} has shape {tuple(x.shape)}; expected 4 dims "
                f"(batch, heads, seq, dim)"
            )
        if not x.is_floating_point():
            raise LeanTypeError(f"{op}: {name} has dtype {x.dtype}; expected a floating dtype")
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)
    assert isinstance(v, torch.Tensor)
    if not (q.dtype == k.dtype == v.dtype):
        raise LeanTypeError(
            f"{op}: q, k, v have dtypes {q.dtype}, {k.dtype}, {v.dtype}; expected one dtype"
        )
    if not (q.device == k.device == v.device):
        raise LeanError(
            f"{op}: q, k, v are on {q.device}, {k.device}, {v.device}; expected one device"
        )
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise LeanError(
            f"{op}: batch sizes of q, k, v are {q.shape[0]}, {k.shape[0]}, {v.shape[0]}; "
            f"expected equal"
        )
    if not (q.shape[1] == k.shape[1] == v.shape[1]):
        raise LeanError(
            f"{op}: heads of q, k, v are {q.shape[1]}, {k.shape[1]}, {v.shape[1]}; expected "
            f"equal (for grouped-query attention repeat the K/V heads before calling: "
            f"k.repeat_interleave(q_heads // kv_heads, dim=1))"
        )
    if q.shape[-1] != k.shape[-1]:
        raise LeanError(
            f"{op}: head_dim of q is {q.shape[-1]} and of k is {k.shape[-1]}; expected equal"
        )
    if k.shape[2] != v.shape[2]:
        raise LeanError(
            f"{op}: k has k_len={k.shape[2]} but v has {v.shape[2]} positions; expected equal"
        )
    if causal and q.shape[2] > k.shape[2]:
        raise LeanError(
            f"{op}: q_len={q.shape[2]} > k_len={k.shape[2]} with causal=True; causal attention "
            f"is bottom-right aligned and needs q_len <= k_len"
        )


def check_mode(op: str, mode: object) -> None:
    if mode not in MODES:
        raise LeanError(
            f"{op}: mode={describe(mode)} is not one of {', '.join(repr(m) for m in MODES)}"
        )


def check_positive_int(op: str, name: str, value: object) -> int:
    """``value`` if it is an int >= 1 (see :func:`leantorch.validate.positive_int`)."""
    return positive_int(op, name, value)


def check_eps(op: str, eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps >= 0):
        raise LeanError(f"{op}: eps={describe(eps)} must be a float >= 0")
    return float(eps)


def check_log_decay(op: str, log_decay: object, k: torch.Tensor) -> torch.Tensor:
    """log_decay: the same shape, dtype and device as k; every value finite and <= 0 (the log of
    a decay in (0, 1])."""
    if not isinstance(log_decay, torch.Tensor):
        raise LeanTypeError(f"{op}: log_decay={describe(log_decay)} must be a torch.Tensor")
    if log_decay.shape != k.shape:
        raise LeanError(
            f"{op}: log_decay has shape {tuple(log_decay.shape)}; expected k's shape "
            f"{tuple(k.shape)} (batch, heads, k_len, key_dim)"
        )
    if log_decay.dtype != k.dtype or log_decay.device != k.device:
        raise LeanTypeError(
            f"{op}: log_decay is {log_decay.dtype} on {log_decay.device}; expected k's "
            f"{k.dtype} on {k.device}"
        )
    if not log_decay.numel():
        return log_decay
    low, high = torch.aminmax(log_decay.detach())
    # NaN fails both comparisons, so it is caught too.
    if not (bool(high <= 0) and bool(low > -math.inf)):
        raise LeanError(
            f"{op}: log_decay has values in [{low.item():.4g}, {high.item():.4g}]; expected "
            f"finite values <= 0 (the log of a decay in (0, 1], e.g. F.logsigmoid(x))"
        )
    return log_decay


def check_scale(op: str, scale: object, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise LeanError(f"{op}: scale={describe(scale)} must be a finite float or None")
    return float(scale)


def check_state_tensor(
    op: str, name: str, state: object, shape: tuple[int, ...], like: torch.Tensor
) -> torch.Tensor:
    if not isinstance(state, torch.Tensor):
        raise LeanTypeError(f"{op}: {name}={describe(state)} must be a torch.Tensor")
    if tuple(state.shape) != shape:
        raise LeanError(f"{op}: {name} has shape {tuple(state.shape)}; expected {shape}")
    if state.dtype != like.dtype or state.device != like.device:
        raise LeanTypeError(
            f"{op}: {name} is {state.dtype} on {state.device}; expected {like.dtype} on "
            f"{like.device}"
        )
    return state
