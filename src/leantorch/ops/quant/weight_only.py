"""Weight-only quantized Linear: dequantize the stored codes (no cache: the float weight lives
only for the duration of the call), then an ordinary float matmul.

On this project's reference CPU the fused kernels torch offers were measured slower than
dequantize-then-matmul (``benchmarks/results/quant.json``, ``kernel_probe``), so the fast path
here is a cheaper dequantization: packed int4 and ternary bytes are decoded with one table
lookup per byte (a 256-row table of the 2 or 4 values a byte holds) instead of shifts and
masks, and the group scales are applied in place. The values are bit-identical to
:func:`naive.dequantize_groupwise` / :func:`naive.dequantize_ternary` of the unpacked codes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "dequantize_int4",
    "dequantize_int8",
    "dequantize_ternary_packed",
    "ternary_codes",
    "weight_only_linear",
]

_TABLES: dict[tuple[str, bool, torch.device], Tensor] = {}


def _int4_table(symmetric: bool, device: torch.device) -> Tensor:
    """(256, 2) float32: the (low, high) nibble codes of every byte value."""
    key = ("int4", symmetric, device)
    if key not in _TABLES:
        byte = torch.arange(256)
        table = torch.stack([byte % 16, byte // 16], dim=-1) - (8 if symmetric else 0)
        _TABLES[key] = table.float().to(device)
    return _TABLES[key]


def _ternary_table(device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """(256, 4): the four ternary codes (-1, 0, 1) of every byte value."""
    key = ("ternary", dtype == torch.float32, device)
    if key not in _TABLES:
        byte = torch.arange(256)
        table = torch.stack([(byte // 4**i) % 4 for i in range(4)], dim=-1) - 1
        _TABLES[key] = table.to(device=device, dtype=dtype)
    return _TABLES[key]


def _apply_groups(codes: Tensor, scale: Tensor, offset: Tensor | None) -> Tensor:
    """codes (out, in) float32 (owned: modified in place) -> codes * scale (+ offset) per
    group, scale/offset (out, groups)."""
    out_features = codes.shape[0]
    if codes.dtype != scale.dtype:  # float64 scales (tests) dequantize in float64
        codes = codes.to(scale.dtype)
    grouped = codes.view(out_features, scale.shape[1], -1)
    grouped.mul_(scale.unsqueeze(-1))
    if offset is not None:
        grouped.add_(offset.unsqueeze(-1))
    return codes


def dequantize_int8(codes: Tensor, scale: Tensor, offset: Tensor | None = None) -> Tensor:
    """codes (out, in) int8 (symmetric) or uint8 (asymmetric); scale, offset (out, groups)
    -> (out, in) float32."""
    return _apply_groups(codes.to(scale.dtype), scale, offset)


def dequantize_int4(packed: Tensor, scale: Tensor, offset: Tensor | None = None) -> Tensor:
    """packed (out, in // 2) uint8 (two codes per byte, low nibble first); scale, offset
    (out, groups); symmetric when ``offset`` is None -> (out, in) float32."""
    table = _int4_table(offset is None, packed.device)
    codes = table.index_select(0, packed.reshape(-1).int()).view(packed.shape[0], -1)
    return _apply_groups(codes, scale, offset)


def dequantize_ternary_packed(packed: Tensor, gamma: Tensor, in_features: int) -> Tensor:
    """packed (out, ceil(in / 4)) uint8 (four codes per byte), gamma (1,) -> (out, in)
    float32 ``t * gamma``."""
    table = _ternary_table(packed.device)
    codes = table.index_select(0, packed.reshape(-1).int()).view(packed.shape[0], -1)
    if codes.shape[1] != in_features:
        codes = codes[:, :in_features].contiguous()
    return codes.to(gamma.dtype).mul_(gamma)


def ternary_codes(packed: Tensor, in_features: int) -> Tensor:
    """packed (out, ceil(in / 4)) uint8 -> (out, in) int8 codes in {-1, 0, 1} (for the
    integer matmul of ternary weights with int8 activations)."""
    table = _ternary_table(packed.device, torch.int8)
    codes = table.index_select(0, packed.reshape(-1).int()).view(packed.shape[0], -1)
    return codes[:, :in_features]


def weight_only_linear(x: Tensor, weight_hat: Tensor, bias: Tensor | None) -> Tensor:
    """x: (..., in) @ weight_hat (out, in).T + bias, in x's dtype."""
    if weight_hat.dtype != x.dtype:
        weight_hat = weight_hat.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return F.linear(x, weight_hat, bias)
