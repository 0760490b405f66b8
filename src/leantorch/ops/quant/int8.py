"""int8 x int8 -> int32 matmul and the layers built on it: int8 dynamic (per-channel weights,
per-token activations) and LLM.int8() outlier decomposition. The references are in
:mod:`leantorch.ops.quant.naive`; the quantization formulas are the same, only the execution
differs (in-place ops, an integer matmul, no float64).

The integer matmul is ``torch._int_mm`` where torch has it for the device:

* CPU: any shape (oneDNN; AMX/VNNI where the CPU has them).
* CUDA: needs ``m > 16`` and ``k``, ``n`` multiples of 8. Other shapes are zero-padded up to the
  next allowed size, which leaves the integer result exact, and the padding is logged once.
* Any other device, or when ``_int_mm`` raises, falls back to float32 matmuls over slices of at
  most 1024 input features (each partial sum is below 2**24, so it is exact in float32) summed
  in int32; the reason is logged once on ``logging.getLogger("leantorch.quant")``.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

__all__ = [
    "int8_dynamic_linear",
    "int8_matmul",
    "llm_int8_linear",
    "padded_int_mm",
    "quantize_per_token_fast",
]

logger = logging.getLogger("leantorch.quant")
_LOGGED: set[str] = set()

# |partial sum| <= 1024 * 127 * 127 < 2**24: float32 adds such integers exactly
_EXACT_FLOAT32_SLICE = 1024
CUDA_MIN_ROWS = 17
CUDA_MULTIPLE = 8


def _log_once(key: str, reason: str) -> None:
    """Log ``reason`` the first time ``key`` (the kind of fallback) happens in this process."""
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.warning("%s", reason)


def quantize_per_token_fast(x: Tensor) -> tuple[Tensor, Tensor]:
    """Same codes and scales as :func:`naive.quantize_per_token` (8 bits), with fewer
    temporaries. x: (tokens, features) -> (q int8 (tokens, features), scale float32
    (tokens, 1))."""
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).div_(127)
    scale.masked_fill_(scale == 0, 1.0)
    # No clamp: |x| <= amax, so |x / scale| <= 127 * (1 + 2u) < 127.5 and the rounded code is
    # already in [-127, 127] (the reference's clamp is a no-op; the tests check bit equality).
    q = torch.div(x, scale).round_().to(torch.int8)
    return q, scale


def _int_mm_exact_fallback(a: Tensor, b: Tensor) -> Tensor:
    """a (m, k) int8 @ b (k, n) int8 -> int32, exactly, with float32 matmuls on k-slices."""
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int32, device=a.device)
    for start in range(0, a.shape[1], _EXACT_FLOAT32_SLICE):
        stop = start + _EXACT_FLOAT32_SLICE
        partial = a[:, start:stop].float() @ b[start:stop].float()
        out += partial.to(torch.int32)
    return out


def _pad_to(t: Tensor, rows: int, cols: int) -> Tensor:
    if t.shape == (rows, cols):
        return t
    padded = t.new_zeros(rows, cols)
    padded[: t.shape[0], : t.shape[1]] = t
    return padded


def padded_int_mm(a: Tensor, b: Tensor) -> Tensor:
    """``torch._int_mm`` on shapes zero-padded to what its CUDA kernel accepts (m > 16; k, n
    multiples of 8). Zero rows and columns add nothing, so the (m, n) result is exact."""
    m, k = a.shape
    n = b.shape[1]
    rows = max(m, CUDA_MIN_ROWS)
    inner = -(-k // CUDA_MULTIPLE) * CUDA_MULTIPLE
    cols = -(-n // CUDA_MULTIPLE) * CUDA_MULTIPLE
    if (rows, inner, cols) != (m, k, n):
        _log_once("cuda-padding",
                  "torch._int_mm on cuda needs m > 16 and k, n multiples of 8; zero-padding "
                  f"(first seen: m={m}, k={k}, n={n}), which keeps the result exact")
        a, b = _pad_to(a, rows, inner), _pad_to(b, inner, cols)
    return torch._int_mm(a, b)[:m, :n]


def int8_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Exact integer matmul. a: (m, k) int8, b: (k, n) int8 (any strides) -> (m, n) int32."""
    device = a.device.type
    if a.shape[1] == 1:
        # k = 1 is an outer product. It is also a case torch 2.13's CPU _int_mm gets wrong:
        # the (1, n) transposed view of an (n, 1) weight has strides (1, 1) and is misread
        # (found by tests/compress/quant/test_kernels.py::test_integer_matmul_is_exact).
        return a.to(torch.int32) * b.to(torch.int32)
    if device not in ("cpu", "cuda"):
        _log_once(f"device-{device}",
                  f"no integer matmul for device {device!r}; using the exact float32 fallback")
        return _int_mm_exact_fallback(a, b)
    try:
        return torch._int_mm(a, b) if device == "cpu" else padded_int_mm(a, b)
    except RuntimeError as error:  # an unexpected build or layout: stay exact, say why
        _log_once(f"failed-{device}",
                  f"torch._int_mm failed on {device} ({' '.join(str(error).split())[:200]}); "
                  "using the exact float32 fallback")
        return _int_mm_exact_fallback(a, b)


def _dequantize_output(acc: Tensor, x_scale: Tensor, weight_scale: Tensor,
                       bias: Tensor | None) -> Tensor:
    """acc (m, n) int32 -> acc * x_scale (m, 1) * weight_scale (n,) + bias, in x_scale's
    dtype. Three passes over (m, n), one new tensor: a plain conversion (vectorized; a mixed
    int32 * float multiply is not), the row scale in place, then column scale and bias in one
    ``addcmul`` in place."""
    out = acc.to(x_scale.dtype)
    out.mul_(x_scale)
    if bias is None:
        return out.mul_(weight_scale)
    return torch.addcmul(bias, out, weight_scale, out=out)


def int8_dynamic_linear(
    x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None = None
) -> Tensor:
    """int8 dynamic Linear.

    x: (..., in) float; weight: (out, in) int8 codes (per-channel symmetric);
    weight_scale: (out,) float32; bias: (out,) or None -> (..., out) in x's dtype.
    """
    shape = x.shape
    q, x_scale = quantize_per_token_fast(x.reshape(-1, shape[-1]))
    acc = int8_matmul(q, weight.t())
    out = _dequantize_output(acc, x_scale, weight_scale,
                             None if bias is None else bias.float())
    return out.to(x.dtype).reshape(*shape[:-1], weight.shape[0])


def llm_int8_linear(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    threshold: float,
) -> tuple[Tensor, int]:
    """LLM.int8(): outlier input features (``|x| > threshold`` anywhere in the batch) in
    floating point, the rest int8 x int8.

    Instead of gathering the regular columns, the outlier columns of x are set to 0 before the
    per-token quantization: their codes are then 0 and add nothing to the integer sum, which is
    therefore exactly the reference's sum over the regular columns, without copying the weight.

    x: (..., in); weight: (out, in) int8; weight_scale: (out,) -> (out (..., out), number of
    outlier columns).
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.dtype not in (torch.float32, torch.float64):
        x2 = x2.float()
    outliers = x2.abs().amax(dim=0) > threshold
    picked = outliers.nonzero().squeeze(1)
    count = int(picked.numel())
    regular = x2.masked_fill(outliers, 0.0) if count else x2
    q, x_scale = quantize_per_token_fast(regular)
    acc = int8_matmul(q, weight.t())
    out = _dequantize_output(acc, x_scale, weight_scale,
                             None if bias is None else bias.float())
    if count:
        w_outliers = weight[:, picked].to(x2.dtype) * weight_scale.unsqueeze(1)  # (out, picked)
        out.addmm_(x2[:, picked], w_outliers.t())
    return out.to(x.dtype).reshape(*shape[:-1], weight.shape[0]), count
