"""Fake quantization for quantization-aware training: the forward pass sees quantized-then-
dequantized values, the backward pass sees the identity (the straight-through estimator, STE:
d x_hat / d x := 1, so the gradient reaching a weight is the gradient of the loss with respect to
its fake-quantized value).

The dequantized values are bit-identical to what the real quantized modules compute from their
stored codes (same formulas, same order of operations), so converting a fake-quant model to the
real one changes nothing for weight-only schemes and only float rounding for schemes that also
quantize activations (the real ones accumulate in int32).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from leantorch.ops.quant.int8 import quantize_per_token_fast
from leantorch.ops.quant.naive import dequantize_ternary, quantize_groupwise, quantize_ternary
from leantorch.ops.quant.weight_only import dequantize_int8

__all__ = [
    "fake_quantize_groupwise",
    "fake_quantize_per_token",
    "fake_quantize_ternary",
    "straight_through",
]


class _StraightThrough(torch.autograd.Function):
    """y = fn(x) forward, dy/dx = identity backward."""

    @staticmethod
    def forward(ctx, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        return fn(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def straight_through(x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``fn(x)`` in the forward pass; the gradient passes to ``x`` unchanged."""
    return _StraightThrough.apply(x, fn)


def _per_token(x: Tensor) -> Tensor:
    shape = x.shape
    q, scale = quantize_per_token_fast(x.detach().reshape(-1, shape[-1]))
    return (q.to(scale.dtype) * scale).to(x.dtype).reshape(shape)


def _groupwise(bits: int, group_size: int, symmetric: bool) -> Callable[[Tensor], Tensor]:
    def fn(w: Tensor) -> Tensor:
        codes, scale, offset = quantize_groupwise(w.detach(), bits, group_size, symmetric)
        return dequantize_int8(codes, scale, offset).to(w.dtype)

    return fn


def _ternary(w: Tensor) -> Tensor:
    codes, gamma = quantize_ternary(w.detach())
    return dequantize_ternary(codes, gamma).to(w.dtype)


def fake_quantize_per_token(x: Tensor) -> Tensor:
    """x: (..., features) -> int8 per-token quantize-dequantize of x, same shape and dtype;
    gradient straight through."""
    return straight_through(x, _per_token)


def fake_quantize_groupwise(
    weight: Tensor, bits: int, group_size: int, symmetric: bool = True
) -> Tensor:
    """weight: (out, in) -> group-wise ``bits``-bit quantize-dequantize (see
    :mod:`leantorch.ops.quant.naive` for the grid); gradient straight through."""
    return straight_through(weight, _groupwise(bits, group_size, symmetric))


def fake_quantize_ternary(weight: Tensor) -> Tensor:
    """weight: (out, in) -> BitNet b1.58 absmean ternary ``round_clip(W / gamma, -1, 1) *
    gamma``; gradient straight through (also for clipped entries, as in BitNet)."""
    return straight_through(weight, _ternary)
