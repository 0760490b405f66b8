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

import functools
import logging
import weakref
from typing import Any

import torch
from torch import Tensor

from leantorch.measure import Cost, register_formula

__all__ = [
    "clear_packed_weights",
    "clear_shared_quantization",
    "int8_dynamic_linear",
    "int8_matmul",
    "int8_scaled_matmul",
    "llm_int8_linear",
    "onednn_available",
    "padded_int_mm",
    "quantize_per_token_compiled",
    "quantize_per_token_fast",
    "quantize_per_token_shared",
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


LOW_PRECISION = (torch.bfloat16, torch.float16)


def quantize_per_token_fast(x: Tensor) -> tuple[Tensor, Tensor]:
    """Same codes and scales as :func:`naive.quantize_per_token` (8 bits), with fewer
    temporaries. x: (tokens, features) -> (q int8 (tokens, features), scale float32
    (tokens, 1); float64 for float64 x).

    A bfloat16 / float16 x is read as it is for max and min (exact in any float format); the
    division runs in float32, as in the reference."""
    if x.dtype not in (torch.float32, torch.float64, *LOW_PRECISION):
        x = x.float()
    # max |x| as max(max x, -min x): two reads and no |x| temporary (bit-identical)
    scale = torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg_())
    scale = scale.float() if x.dtype in LOW_PRECISION else scale
    scale.div_(127)
    scale.masked_fill_(scale == 0, 1.0)
    # low precision: one explicit float32 copy, divided in place (a mixed-dtype torch.div
    # would make the same copy and then allocate the quotient besides)
    quotient = x.float().div_(scale) if x.dtype in LOW_PRECISION else torch.div(x, scale)
    # No clamp: |x| <= amax, so |x / scale| <= 127 * (1 + 2u) < 127.5 and the rounded code is
    # already in [-127, 127] (the reference's clamp is a no-op; the tests check bit equality).
    q = quotient.round_().to(torch.int8)
    return q, scale


# --------------------------------------------------------------------------- shared quantize
# q, k and v projections of an attention block read the same tensor: one quantize pass can
# serve the three. The last quantized input is remembered (by identity and version counter,
# through a weak reference, so the cache never keeps it alive) with its codes and scales.
_LAST_INPUT: list[tuple[weakref.ref, int, Tensor, Tensor] | None] = [None]


_COMPILED: dict[str, Any] = {}


def quantize_per_token_compiled(x: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`quantize_per_token_fast` through ``torch.compile`` (inductor, dynamic shapes):
    the max/min reduction and the divide-round-cast fuse into two loops over x instead of
    six passes. Same codes and scales (the same float32 operations, in the same order per
    element). The first call compiles (tens of seconds on a small CPU); if compiling fails,
    the reason is logged once and the eager function runs from then on."""
    if "quantize" not in _COMPILED:
        _COMPILED["quantize"] = torch.compile(quantize_per_token_fast, dynamic=True)
    if _COMPILED["quantize"] is quantize_per_token_fast:
        return quantize_per_token_fast(x)
    try:
        return _COMPILED["quantize"](x)
    except Exception as error:  # no C++ compiler, an unsupported build: stay correct
        _log_once("compile", "torch.compile of the per-token quantization failed "
                  f"({' '.join(str(error).split())[:200]}); using the eager passes")
        _COMPILED["quantize"] = quantize_per_token_fast
        return quantize_per_token_fast(x)


def quantize_per_token_shared(x: Tensor, compiled: bool = False) -> tuple[Tensor, Tensor]:
    """:func:`quantize_per_token_fast` of ``x.reshape(-1, x.shape[-1])``, reusing the result
    of the previous call when ``x`` is the same tensor, unchanged since (same object, same
    version counter). Bit-identical to quantizing again. x: (..., features) -> (q (tokens,
    features) int8, scale (tokens, 1)).

    Not cached: inference-mode tensors (they have no version counter, so an in-place edit
    could not be seen), tensors that require grad, and calls made while ``torch.compile``
    traces."""
    cacheable = not (x.is_inference() or x.requires_grad or torch.compiler.is_compiling())
    if cacheable:
        entry = _LAST_INPUT[0]
        if entry is not None and entry[0]() is x and entry[1] == x._version:
            return entry[2], entry[3]
    quantize = quantize_per_token_compiled if compiled else quantize_per_token_fast
    q, scale = quantize(x.reshape(-1, x.shape[-1]))
    _LAST_INPUT[0] = (weakref.ref(x), x._version, q, scale) if cacheable else None
    return q, scale


def clear_shared_quantization() -> None:
    """Forget the remembered quantized input (its codes and scales are freed)."""
    _LAST_INPUT[0] = None


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


@functools.lru_cache(maxsize=64)
def _zero_points(n: int) -> Tensor:
    """The weight's zero points (all 0, symmetric codes), made once per output size rather
    than at every call: the layers call the GEMM ~40 times per MiniLM forward."""
    return torch.zeros(n, dtype=torch.long)


def _onednn_scaled_mm(q: Tensor, packed: Tensor, weight_scale: Tensor,
                      out_dtype: torch.dtype = torch.float32) -> Tensor:
    zeros = _zero_points(weight_scale.shape[0])
    return torch.ops.onednn.qlinear_pointwise.tensor(
        q, _ONE, _ZERO, packed, weight_scale, zeros, None, 1.0, 0, out_dtype, "none", [], "")


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
def _int8_scaled_mm_onednn(q: Tensor, weight: Tensor, weight_scale: Tensor,
                           out_dtype: torch.dtype = torch.float32) -> Tensor:
    """(q (m, k) int8 @ weight (n, k) int8 .T) * weight_scale (n,) -> (m, n) ``out_dtype``
    (float32 or bfloat16), in one oneDNN call on the cached packed weight (int32 sums, scaled
    in float32, rounded once to ``out_dtype``)."""
    return _onednn_scaled_mm(q.contiguous(), _prepacked(weight),
                             weight_scale.float().contiguous(), out_dtype)


@_int8_scaled_mm_onednn.register_fake
def _(q: Tensor, weight: Tensor, weight_scale: Tensor,
      out_dtype: torch.dtype = torch.float32) -> Tensor:
    return q.new_empty(q.shape[0], weight.shape[0], dtype=out_dtype)


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


def _uses_onednn(q: Tensor, out_dtype: torch.dtype, backend: str) -> bool:
    return backend == "onednn" or (
        backend == "auto" and q.device.type == "cpu" and
        out_dtype in (torch.float32, torch.bfloat16) and onednn_available())


def int8_scaled_matmul(q: Tensor, weight: Tensor, weight_scale: Tensor,
                       out_dtype: torch.dtype = torch.float32, backend: str = "auto") -> Tensor:
    """``(q @ weight.T) * weight_scale``: q (m, k) int8, weight (n, k) int8, weight_scale (n,)
    -> (m, n) ``out_dtype``. ``backend``: ``auto`` (oneDNN's fused GEMM on a CPU that has it,
    for float32 or bfloat16 output), ``onednn`` or ``int_mm`` (exact int32 sum, then convert
    and scale)."""
    if _uses_onednn(q, out_dtype, backend):
        return torch.ops.leantorch.int8_scaled_mm(q, weight, weight_scale, out_dtype)
    out = int8_matmul(q, weight.t()).to(out_dtype)
    return out.mul_(weight_scale)


def _row_scale_and_bias(out: Tensor, x_scale: Tensor, bias: Tensor | None) -> Tensor:
    """out (m, n) * x_scale (m, 1) + bias (n,), in place (one pass)."""
    if bias is None:
        return out.mul_(x_scale)
    return torch.addcmul(bias.to(out.dtype), out, x_scale, out=out)


def int8_dynamic_linear(
    x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None = None,
    backend: str = "auto", share_quantization: bool = False, compiled: bool = False,
) -> Tensor:
    """int8 dynamic Linear: ``((q_x @ q_w.T) * s_w) * s_x + b``.

    x: (..., in) float; weight: (out, in) int8 codes (per-channel symmetric);
    weight_scale: (out,) float32; bias: (out,) or None -> (..., out) in x's dtype.

    A bfloat16 x is quantized as it is (no float32 copy) and, on the oneDNN path, the GEMM
    writes bfloat16 (int32 sums times ``s_w`` in float32, rounded once); ``s_x`` and ``b`` are
    then applied in float32 arithmetic on that bfloat16 result (two more roundings to
    bfloat16: the output is within 3 bfloat16 rounding steps of the float32 result, rounded).
    ``share_quantization``: reuse the quantized input of the previous call when x is the same
    unchanged tensor (:func:`quantize_per_token_shared`; bit-identical). ``compiled``: quantize
    with :func:`quantize_per_token_compiled` (bit-identical).
    """
    shape = x.shape
    if share_quantization:
        q, x_scale = quantize_per_token_shared(x, compiled)
    elif compiled:
        q, x_scale = quantize_per_token_compiled(x.reshape(-1, shape[-1]))
    else:
        q, x_scale = quantize_per_token_fast(x.reshape(-1, shape[-1]))
    if x.dtype == torch.bfloat16 and _uses_onednn(q, torch.bfloat16, backend):
        # oneDNN writes bfloat16 (half the bytes of float32); scale it where it lies
        # (a bfloat16 x_scale and bias: a mixed-dtype op would copy the whole output twice)
        out = int8_scaled_matmul(q, weight, weight_scale, torch.bfloat16, backend)
        out = _row_scale_and_bias(out, x_scale.to(torch.bfloat16), bias)
        return out.reshape(*shape[:-1], weight.shape[0])
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
