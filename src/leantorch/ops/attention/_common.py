"""Argument checks and small helpers shared by every attention op in this package, including
the fast paths' own softmax (:func:`masked_softmax`, :func:`dense_attention`).

The fast paths (sliding, top-k, block-sparse) are tested against the reference
:func:`~leantorch.ops.attention.naive.naive_attention`, so they must not compute through it (a
bug there would then hide in both): they share the softmax written here instead, which is a
different spelling of the same math (``torch.softmax`` with empty rows zeroed, grouped heads as
an extra axis) from the reference's explicit exp / sum.

Shapes follow the package convention: q (batch, q_heads, q_len, head_dim), k (batch, kv_heads,
k_len, head_dim), v (batch, kv_heads, k_len, value_dim), with q_heads % kv_heads == 0.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from leantorch.errors import LeanError, LeanTypeError, describe
from leantorch.validate import positive_int


class AttentionShapes(NamedTuple):
    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    k_len: int
    head_dim: int
    value_dim: int

    @property
    def groups(self) -> int:
        """Query heads served by each KV head (1 for multi-head attention)."""
        return self.q_heads // self.kv_heads


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_qkv(op: str, q: object, k: object, v: object) -> AttentionShapes:
    """Validate q, k, v and return their sizes; raise LeanError/LeanTypeError naming the culprit."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise LeanTypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__} "
                                f"{describe(t)}")
        if t.dim() != 4:
            raise LeanError(f"{op}: {name} must be 4-D (batch, heads, seq, dim), got shape "
                            f"{_shape(t)}")
        if not t.is_floating_point():
            raise LeanTypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    assert isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)
    if not (q.dtype == k.dtype == v.dtype):
        raise LeanTypeError(f"{op}: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, "
                            f"{v.dtype}")
    if not (q.device == k.device == v.device):
        raise LeanError(f"{op}: q, k and v must be on one device, got {q.device}, {k.device}, "
                        f"{v.device}")
    batch, q_heads, q_len, head_dim = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise LeanError(f"{op}: q, k and v must share the batch size, got q {_shape(q)}, "
                        f"k {_shape(k)}, v {_shape(v)}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise LeanError(f"{op}: k and v must share (batch, kv_heads, k_len), got k {_shape(k)}, "
                        f"v {_shape(v)}")
    if k.shape[3] != head_dim:
        raise LeanError(f"{op}: k's head_dim must equal q's ({head_dim}), got k {_shape(k)}")
    kv_heads = k.shape[1]
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise LeanError(f"{op}: q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads}); "
                        f"each KV head serves q_heads // kv_heads consecutive query heads")
    return AttentionShapes(batch, q_heads, kv_heads, q_len, k.shape[2], head_dim, v.shape[3])


def resolve_scale(op: str, scale: float | None, head_dim: int) -> float:
    """``scale`` or the default ``head_dim ** -0.5``."""
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise LeanTypeError(f"{op}: scale must be a float or None, got {describe(scale)}")
    return float(scale)


def check_mask(op: str, mask: object, shapes: AttentionShapes) -> None:
    """``mask``: boolean (True = may attend) or additive float, broadcastable to
    (batch, q_heads, q_len, k_len)."""
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise LeanTypeError(f"{op}: mask must be a boolean or floating tensor or None, got "
                            f"{type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise LeanTypeError(f"{op}: mask must be boolean (True = may attend) or additive float, "
                            f"got dtype {mask.dtype}")
    full = (shapes.batch, shapes.q_heads, shapes.q_len, shapes.k_len)
    ok = mask.dim() <= 4
    if ok:
        padded = (1,) * (4 - mask.dim()) + tuple(mask.shape)
        ok = all(m in (1, f) for m, f in zip(padded, full, strict=True))
    if not ok:
        raise LeanError(f"{op}: mask of shape {_shape(mask)} does not broadcast to "
                        f"(batch, q_heads, q_len, k_len) = {full}")


def check_key_padding_mask(op: str, key_padding_mask: object, shapes: AttentionShapes) -> None:
    """``key_padding_mask``: boolean (batch, k_len), True = real token."""
    if key_padding_mask is None:
        return
    if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
        raise LeanTypeError(f"{op}: key_padding_mask must be a boolean tensor (batch, k_len), "
                            f"True = real token; got {describe(key_padding_mask)}")
    if tuple(key_padding_mask.shape) != (shapes.batch, shapes.k_len):
        raise LeanError(f"{op}: key_padding_mask must have shape (batch, k_len) = "
                        f"({shapes.batch}, {shapes.k_len}), got {_shape(key_padding_mask)}")


def check_positive_int(op: str, name: str, value: object, minimum: int = 1) -> int:
    """``value`` if it is an int >= ``minimum`` (see :func:`leantorch.validate.positive_int`)."""
    return positive_int(op, name, value, minimum=minimum)


def causal_allowed(q_len: int, k_len: int, device: torch.device | str | None = None,
                   q_start: int = 0, k_start: int = 0, q_count: int | None = None,
                   k_count: int | None = None) -> Tensor:
    """Boolean (q_count, k_count) block of the bottom-right aligned causal mask.

    Query i sits at absolute position k_len - q_len + i and sees keys 0..k_len - q_len + i.
    The block covers queries q_start.. and keys k_start.. (the whole mask by default).
    """
    q_count = q_len - q_start if q_count is None else q_count
    k_count = k_len - k_start if k_count is None else k_count
    query_position = torch.arange(q_start, q_start + q_count, device=device) + (k_len - q_len)
    key_position = torch.arange(k_start, k_start + k_count, device=device)
    return key_position[None, :] <= query_position[:, None]


def masked_softmax(scores: Tensor) -> Tensor:
    """Softmax over the last dim of ``scores`` whose masked entries are ``-inf``; a row with no
    allowed entry gives 0 (not NaN) and zero gradient."""
    empty = (scores == -math.inf).all(dim=-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1)
    return weights.masked_fill(empty, 0.0)


def dense_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float) -> Tensor:
    """Every score of one block of queries against one range of keys, then a masked softmax.

    Args:
        q: (batch, q_heads, n, head_dim).
        k: (batch, kv_heads, m, head_dim); q_heads % kv_heads == 0.
        v: (batch, kv_heads, m, value_dim).
        allowed: boolean, broadcastable to (n, m) (True = may attend).
        scale: multiplies Q K^T.

    Returns:
        (batch, q_heads, n, value_dim); a query with no allowed key gives 0.
    """
    batch, q_heads, n, head_dim = q.shape
    kv_heads = k.shape[1]
    # GQA as an explicit group axis: (batch, kv_heads, group, n, head_dim) against each KV head
    grouped = q.reshape(batch, kv_heads, q_heads // kv_heads, n, head_dim)
    scores = (grouped @ k.unsqueeze(2).transpose(-1, -2)) * scale
    weights = masked_softmax(scores.masked_fill(~allowed, -math.inf))
    return (weights @ v.unsqueeze(2)).reshape(batch, q_heads, n, v.shape[-1])
