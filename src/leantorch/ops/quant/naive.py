"""Quantization written to be read: every formula spelled out, every layer computed by
dequantizing and then doing an ordinary float matmul. The fast paths in this package
(:mod:`leantorch.ops.quant.int8`, :mod:`leantorch.ops.quant.weight_only`,
:mod:`leantorch.ops.quant.fake`) are tested against these functions.

Conventions shared by the whole package:

* **Symmetric b-bit** (int8 weights and activations, symmetric int4):
  ``qmax = 2**(b-1) - 1`` (127, 7), ``scale = amax / qmax``, ``q = clamp(round(x / scale),
  -qmax, qmax)``, ``x_hat = q * scale``. The most negative code (-128, -8) is never used, so the
  grid is symmetric around 0.
* **Asymmetric b-bit** (weights only): ``levels = 2**b - 1`` (255, 15), ``scale = (max - min) /
  levels``, ``q = clamp(round((x - min) / scale), 0, levels)``, ``x_hat = q * scale + min``. The
  offset ``min`` is kept in floating point (not rounded to an integer zero point), so nothing is
  clipped and the error bound below holds at both ends.
* A group whose values are all 0 (symmetric) or all equal (asymmetric) gets ``scale = 1``: its
  codes are 0 and it dequantizes exactly.
* ``round`` is ``torch.round`` (half to even). With no clipping, ``|x - x_hat| <= scale / 2`` for
  every element, up to the float rounding of the division and of ``q * scale (+ min)``.
* Weights are ``(out_features, in_features)`` like ``nn.Linear``. Group-wise scales run along
  the input dimension: ``group_size`` consecutive input features of one output row share a
  scale, so ``scale`` is ``(out_features, in_features // group_size)``; ``group_size =
  in_features`` is one scale per output row (per channel).
* Activations (int8 dynamic) are quantized per token: one symmetric scale per row of the
  ``(tokens, in_features)`` input, computed from the current batch.
* int4 codes are packed two per byte: column ``2j`` in the low nibble, column ``2j + 1`` in
  the high nibble, as ``u = q + 8`` (symmetric, ``u`` in 1..15) or ``u = q`` (asymmetric,
  0..15).
* Ternary (BitNet b1.58 absmean): ``gamma = mean(|W|)`` over the whole tensor, ``t =
  clamp(round(W / gamma), -1, 1)``, ``W_hat = t * gamma``. Values beyond ``1.5 * gamma`` are
  clipped by design. Ternary codes are packed four per byte as ``u = t + 1`` (0..2) in bit
  pairs: column ``4j + i`` holds bits ``2i, 2i + 1``; ``in_features`` is padded to a multiple
  of 4 with zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "dequantize_groupwise",
    "dequantize_ternary",
    "int8_dynamic_linear_reference",
    "llm_int8_linear_reference",
    "pack_int4",
    "pack_ternary",
    "quantize_groupwise",
    "quantize_per_tensor",
    "quantize_per_token",
    "quantize_ternary",
    "ternary_linear_reference",
    "unpack_int4",
    "unpack_ternary",
    "weight_only_linear_reference",
]


def symmetric_qmax(bits: int) -> int:
    """Largest code of a symmetric ``bits``-bit grid: 127 for 8, 7 for 4."""
    return 2 ** (bits - 1) - 1


def asymmetric_levels(bits: int) -> int:
    """Largest code of an asymmetric ``bits``-bit grid: 255 for 8, 15 for 4."""
    return 2**bits - 1


def working_precision(x: Tensor) -> Tensor:
    """Scales and codes are computed in float64 for float64 inputs (tests), else in float32."""
    return x if x.dtype == torch.float64 else x.float()


# --------------------------------------------------------------------------- activations
def quantize_per_token(x: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Symmetric per-row quantization of activations.

    x: (tokens, features), floating point -> (q: (tokens, features) int8,
    scale: (tokens, 1) float32). ``x_hat = q * scale``.
    """
    x = working_precision(x)
    qmax = symmetric_qmax(bits)
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = amax / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero row
    q = torch.clamp(torch.round(x / scale), -qmax, qmax)
    return q.to(torch.int8), scale


# --------------------------------------------------------------------------- weights
def quantize_groupwise(
    weight: Tensor, bits: int, group_size: int, symmetric: bool = True
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Quantize a weight with one scale per ``group_size`` consecutive input features.

    weight: (out, in) with ``in % group_size == 0`` -> (q: (out, in) int8 codes,
    scale: (out, in // group_size) float32, offset: same shape as scale, or None when
    symmetric). Symmetric codes lie in ``[-qmax, qmax]``, asymmetric ones in ``[0, levels]``.
    """
    out_features, in_features = weight.shape
    groups = in_features // group_size
    w = working_precision(weight).reshape(out_features, groups, group_size)
    if symmetric:
        qmax = symmetric_qmax(bits)
        scale = w.abs().amax(dim=-1, keepdim=True) / qmax
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.clamp(torch.round(w / scale), -qmax, qmax)
        offset = None
    else:
        levels = asymmetric_levels(bits)
        low = w.amin(dim=-1, keepdim=True)
        high = w.amax(dim=-1, keepdim=True)
        scale = (high - low) / levels
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.clamp(torch.round((w - low) / scale), 0, levels)
        offset = low.squeeze(-1)
    codes = q.to(torch.int8 if symmetric or bits < 8 else torch.uint8)
    return codes.reshape(out_features, in_features), scale.squeeze(-1), offset


def dequantize_groupwise(q: Tensor, scale: Tensor, offset: Tensor | None = None) -> Tensor:
    """Inverse of :func:`quantize_groupwise`: q (out, in), scale/offset (out, groups) ->
    (out, in) float32 with ``x_hat = q * scale (+ offset)`` per group."""
    out_features, in_features = q.shape
    groups = scale.shape[1]
    codes = q.to(scale.dtype).reshape(out_features, groups, in_features // groups)
    w = codes * scale.unsqueeze(-1)
    if offset is not None:
        w = w + offset.unsqueeze(-1)
    return w.reshape(out_features, in_features)


def quantize_per_tensor(weight: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Symmetric quantization with a single scale for the whole tensor (the baseline that
    group-wise scales beat on weights with outlier channels). -> (q int8, scale (1,))."""
    qmax = symmetric_qmax(bits)
    w = working_precision(weight)
    scale = (w.abs().amax() / qmax).reshape(1)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(torch.round(w / scale), -qmax, qmax).to(torch.int8), scale


# --------------------------------------------------------------------------- packing
def pack_int4(codes: Tensor, symmetric: bool) -> Tensor:
    """Two 4-bit codes per byte. codes: (out, in) int8 (``in`` even; symmetric codes in
    [-7, 7], asymmetric in [0, 15]) -> (out, in // 2) uint8."""
    nibbles = codes.to(torch.int16) + (8 if symmetric else 0)  # unsigned 0..15
    low, high = nibbles[:, 0::2], nibbles[:, 1::2]
    return (low + 16 * high).to(torch.uint8)


def unpack_int4(packed: Tensor, symmetric: bool) -> Tensor:
    """Inverse of :func:`pack_int4`: (out, in // 2) uint8 -> (out, in) int8 codes."""
    wide = packed.to(torch.int16)
    low = wide % 16
    high = wide // 16
    nibbles = torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)
    return (nibbles - (8 if symmetric else 0)).to(torch.int8)


def pack_ternary(codes: Tensor) -> Tensor:
    """Four ternary codes per byte. codes: (out, in) int8 in {-1, 0, 1} -> (out, ceil(in/4))
    uint8; column ``4j + i`` is stored in bits ``2i`` and ``2i + 1`` of byte ``j`` as
    ``t + 1``."""
    out_features, in_features = codes.shape
    padded = -(-in_features // 4) * 4
    u = torch.zeros(out_features, padded, dtype=torch.int16, device=codes.device)
    u[:, :in_features] = codes.to(torch.int16) + 1
    u[:, in_features:] = 1  # padding holds the code for 0
    u = u.reshape(out_features, padded // 4, 4)
    return (u[..., 0] + 4 * u[..., 1] + 16 * u[..., 2] + 64 * u[..., 3]).to(torch.uint8)


def unpack_ternary(packed: Tensor, in_features: int) -> Tensor:
    """Inverse of :func:`pack_ternary`: (out, ceil(in/4)) uint8 -> (out, in) int8 in
    {-1, 0, 1}."""
    wide = packed.to(torch.int16)
    pairs = [(wide // 4**i) % 4 for i in range(4)]
    u = torch.stack(pairs, dim=-1).reshape(packed.shape[0], -1)[:, :in_features]
    return (u - 1).to(torch.int8)


def quantize_ternary(weight: Tensor, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """BitNet b1.58 absmean: weight (out, in) -> (t: (out, in) int8 in {-1, 0, 1},
    gamma: (1,) float32) with ``W_hat = t * gamma``. ``eps`` keeps an all-zero tensor finite."""
    w = working_precision(weight)
    gamma = w.abs().mean().clamp_min(eps).reshape(1)
    t = torch.clamp(torch.round(w / gamma), -1, 1)
    return t.to(torch.int8), gamma


def dequantize_ternary(t: Tensor, gamma: Tensor) -> Tensor:
    """(out, in) ternary codes times the tensor scale -> float32 (out, in)."""
    return t.to(gamma.dtype) * gamma


# --------------------------------------------------------------------------- layers
def int8_dynamic_linear_reference(
    x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None = None
) -> Tensor:
    """int8 dynamic Linear by dequantizing both sides and a float64 matmul.

    x: (..., in) float; weight: (out, in) int8 codes; weight_scale: (out,) -> (..., out) in
    x's dtype. Activations are quantized per token with :func:`quantize_per_token`.
    """
    shape = x.shape
    q, scale = quantize_per_token(x.reshape(-1, shape[-1]))
    x_hat = q.double() * scale.double()
    w_hat = weight.double() * weight_scale.double().unsqueeze(1)
    out = x_hat @ w_hat.t()
    if bias is not None:
        out = out + bias.double()
    return out.to(x.dtype).reshape(*shape[:-1], weight.shape[0])


def weight_only_linear_reference(x: Tensor, weight_hat: Tensor, bias: Tensor | None) -> Tensor:
    """A Linear whose weight was dequantized: ``x @ weight_hat.T + bias`` in x's dtype."""
    return F.linear(x, weight_hat.to(x.dtype), None if bias is None else bias.to(x.dtype))


def llm_int8_linear_reference(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    threshold: float,
) -> tuple[Tensor, Tensor]:
    """LLM.int8(): mixed-precision decomposition of ``x @ W.T``.

    An input feature (column of x) is an outlier when any token of the current batch has
    ``|x| > threshold`` there. Outlier columns multiply the matching (dequantized) weight
    columns in floating point; the other columns are quantized per token over the regular
    columns only and multiplied in int8 (here: dequantized, in float64).

    x: (..., in); weight: (out, in) int8; weight_scale: (out,) -> (out: (..., out),
    outliers: (in,) bool).
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    outliers = (x2.abs() > threshold).any(dim=0)
    regular = ~outliers
    w_hat = weight.double() * weight_scale.double().unsqueeze(1)
    out = x2[:, outliers].double() @ w_hat[:, outliers].t()
    if regular.any():
        q, scale = quantize_per_token(x2[:, regular])
        out = out + (q.double() * scale.double()) @ w_hat[:, regular].t()
    if bias is not None:
        out = out + bias.double()
    return out.to(x.dtype).reshape(*shape[:-1], weight.shape[0]), outliers


def ternary_linear_reference(
    x: Tensor,
    codes: Tensor,
    gamma: Tensor,
    bias: Tensor | None,
    activation_bits: int | None,
) -> Tensor:
    """A ternary Linear: ``x_hat @ (t * gamma).T + bias`` in float64, where ``x_hat`` is x
    quantized per token to ``activation_bits`` (BitNet b1.58 uses 8) or x itself (None)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if activation_bits is None:
        x_hat = x2.double()
    else:
        q, scale = quantize_per_token(x2, activation_bits)
        x_hat = q.double() * scale.double()
    out = x_hat @ (codes.double() * gamma.double()).t()
    if bias is not None:
        out = out + bias.double()
    return out.to(x.dtype).reshape(*shape[:-1], codes.shape[0])
