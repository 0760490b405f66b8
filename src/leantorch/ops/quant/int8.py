"""int8 x int8 matmuls and the layers built on them: int8 dynamic (per-channel weights,
per-token activations) and LLM.int8() outlier decomposition. The references are in
:mod:`leantorch.ops.quant.naive`; the quantization formulas are the same, only the execution
differs (fewer temporaries, an integer matmul, no float64).

Two integer matmuls:

* :func:`int8_scaled_matmul` (the layers' path): ``(q @ W.T) * weight_scale`` in float32. On a
  CPU with oneDNN it is one fused call, ``torch.ops.onednn.qlinear_pointwise`` (the int8 GEMM
  torch's own x86 quantization backend runs) on a weight prepacked once per layer and cached
  beside it (same bytes as the int8 codes; :func:`clear_packed_weights` frees the cache). It is
  wrapped in the custom op ``leantorch::int8_scaled_mm`` so that ``leantorch.measure`` counts it
  (formula below) without seeing oneDNN's opaque packed tensor. Elsewhere, or when oneDNN is
  missing, it is :func:`int8_matmul` followed by the conversion and the scale.
* :func:`int8_matmul`: exact int32 result, ``torch._int_mm`` where torch has it:

  - CPU: any shape (``k = 1`` is done as an outer product, see below).
  - CUDA: needs ``m > 16`` and ``k``, ``n`` multiples of 8. Other shapes are zero-padded up to
    the next allowed size, which leaves the integer result exact; the padding is logged once.
  - Any other device, or when ``_int_mm`` raises, falls back to float32 matmuls over slices of
    at most 1024 input features (each partial sum is below 2**24, so exact in float32) summed
    in int32.

Every fallback is logged once, with its reason, on ``logging.getLogger("leantorch.quant")``.
"""

from __future__ import annotations

import logging
import weakref

import torch
from torch import Tensor

from leantorch.measure import Cost, register_formula

__all__ = [
    "clear_packed_weights",
    "int8_dynamic_linear",
    "int8_matmul",
    "int8_scaled_matmul",
    "llm_int8_linear",
    "onednn_available",
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
    (tokens, 1); float64 for float64 x)."""
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    # max |x| as max(max x, -min x): two reads and no |x| temporary (bit-identical)
    scale = torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg_())
    scale.div_(127)
    scale.masked_fill_(scale == 0, 1.0)
    # No clamp: |x| <= amax, so |x / scale| <= 127 * (1 + 2u) < 127.5 and the rounded code is
    # already in [-127, 127] (the reference's clamp is a no-op; the tests check bit equality).
    q = torch.div(x, scale).round_().to(torch.int8)
    return q, scale


# --------------------------------------------------------------------------- oneDNN (CPU)
_ONEDNN: dict[str, bool] = {}
_PACKED: dict[int, tuple[weakref.ref, int, int, Tensor]] = {}
_ONE = torch.tensor(1.0)
_ZERO = torch.tensor(0)


def onednn_available() -> bool:
    """Whether this torch build can run oneDNN's int8 GEMM on this CPU (checked once)."""
    if "ok" not in _ONEDNN:
        try:
            ops = torch.ops.onednn
            ok = torch.backends.mkldnn.is_available() and hasattr(ops, "qlinear_pointwise")
            if ok:  # a tiny call: the op exists in builds where it cannot run
                w = torch.ones(2, 2, dtype=torch.int8)
                out = _onednn_scaled_mm(torch.ones(1, 2, dtype=torch.int8),
                                        ops.qlinear_prepack(w, None), torch.ones(2))
                ok = bool(out[0, 0] == 2)
            reason = "" if ok else "torch.backends.mkldnn or onednn.qlinear_pointwise missing"
        except Exception as error:
            ok, reason = False, " ".join(str(error).split())[:200]
        if not ok:
            _log_once("onednn", f"oneDNN int8 GEMM unavailable ({reason}); int8 layers use "
                      "torch._int_mm and separate dequantization passes")
        _ONEDNN["ok"] = ok
    return _ONEDNN["ok"]


def _onednn_scaled_mm(q: Tensor, packed: Tensor, weight_scale: Tensor) -> Tensor:
    zeros = torch.zeros(weight_scale.shape[0], dtype=torch.long)
    return torch.ops.onednn.qlinear_pointwise.tensor(
        q, _ONE, _ZERO, packed, weight_scale, zeros, None, 1.0, 0, torch.float32, "none", [],
        "")


def _prepacked(weight: Tensor) -> Tensor:
    """oneDNN's packed copy of ``weight`` (out, in) int8, cached until the weight dies or is
    changed in place."""
    key = id(weight)
    entry = _PACKED.get(key)
    if entry is not None and entry[0]() is weight and entry[1] == weight._version and \
            entry[2] == weight.data_ptr():
        return entry[3]
    packed = torch.ops.onednn.qlinear_prepack(weight.detach(), None)
    ref = weakref.ref(weight, lambda _, key=key: _PACKED.pop(key, None))
    _PACKED[key] = (ref, weight._version, weight.data_ptr(), packed)
    return packed


def clear_packed_weights() -> None:
    """Drop every cached oneDNN packed weight (they are rebuilt on the next call)."""
    _PACKED.clear()


@torch.library.custom_op("leantorch::int8_scaled_mm", mutates_args=())
def _int8_scaled_mm_onednn(q: Tensor, weight: Tensor, weight_scale: Tensor) -> Tensor:
    """(q (m, k) int8 @ weight (n, k) int8 .T) * weight_scale (n,) -> (m, n) float32, in one
    oneDNN call on the cached packed weight."""
    return _onednn_scaled_mm(q.contiguous(), _prepacked(weight),
                             weight_scale.float().contiguous())


@_int8_scaled_mm_onednn.register_fake
def _(q: Tensor, weight: Tensor, weight_scale: Tensor) -> Tensor:
    return q.new_empty(q.shape[0], weight.shape[0], dtype=torch.float32)


@register_formula(torch.ops.leantorch.int8_scaled_mm)
def _int8_scaled_mm_cost(call) -> Cost:
    """m x k x n integer MACs, plus one multiply per output for the per-channel scale."""
    q, weight = call.arg("q"), call.arg("weight")
    m, k, n = q.shape[0], q.shape[1], weight.shape[0]
    return Cost(flops=2 * m * k * n + m * n, macs=m * k * n)


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


def int8_scaled_matmul(q: Tensor, weight: Tensor, weight_scale: Tensor,
                       out_dtype: torch.dtype = torch.float32, backend: str = "auto") -> Tensor:
    """``(q @ weight.T) * weight_scale``: q (m, k) int8, weight (n, k) int8, weight_scale (n,)
    -> (m, n) ``out_dtype``. ``backend``: ``auto`` (oneDNN's fused GEMM on a CPU that has it,
    for float32 output), ``onednn`` or ``int_mm`` (exact int32 sum, then convert and scale)."""
    use_onednn = backend == "onednn" or (
        backend == "auto" and q.device.type == "cpu" and out_dtype == torch.float32 and
        onednn_available())
    if use_onednn:
        return torch.ops.leantorch.int8_scaled_mm(q, weight, weight_scale)
    out = int8_matmul(q, weight.t()).to(out_dtype)
    return out.mul_(weight_scale)


def _row_scale_and_bias(out: Tensor, x_scale: Tensor, bias: Tensor | None) -> Tensor:
    """out (m, n) * x_scale (m, 1) + bias (n,), in place (one pass)."""
    if bias is None:
        return out.mul_(x_scale)
    return torch.addcmul(bias.to(out.dtype), out, x_scale, out=out)


def int8_dynamic_linear(
    x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """int8 dynamic Linear: ``((q_x @ q_w.T) * s_w) * s_x + b``.

    x: (..., in) float; weight: (out, in) int8 codes (per-channel symmetric);
    weight_scale: (out,) float32; bias: (out,) or None -> (..., out) in x's dtype.
    """
    shape = x.shape
    q, x_scale = quantize_per_token_fast(x.reshape(-1, shape[-1]))
    out = int8_scaled_matmul(q, weight, weight_scale, x_scale.dtype, backend)
    out = _row_scale_and_bias(out, x_scale, bias)
    return out.to(x.dtype).reshape(*shape[:-1], weight.shape[0])


def llm_int8_linear(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    threshold: float,
    backend: str = "auto",
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
    outliers = torch.maximum(x2.amax(dim=0), x2.amin(dim=0).neg_()) > threshold
    picked = outliers.nonzero().squeeze(1)
    count = int(picked.numel())
    regular = x2.masked_fill(outliers, 0.0) if count else x2
    q, x_scale = quantize_per_token_fast(regular)
    out = int8_scaled_matmul(q, weight, weight_scale, x_scale.dtype, backend)
    out = _row_scale_and_bias(out, x_scale, bias)
    if count:
        w_outliers = weight[:, picked].to(x2.dtype) * weight_scale.unsqueeze(1)  # (out, picked)
        out.addmm_(x2[:, picked], w_outliers.t())
    return out.to(x.dtype).reshape(*shape[:-1], weight.shape[0]), count
