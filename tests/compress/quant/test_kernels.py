"""Quantization kernels: the grids' error bounds, packing, and every fast path against the
readable reference in ``leantorch.ops.quant.naive``."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leantorch.ops.quant import int8 as int8_ops
from leantorch.ops.quant import naive
from leantorch.ops.quant.int8 import (
    int8_dynamic_linear,
    int8_matmul,
    int8_scaled_matmul,
    llm_int8_linear,
    onednn_available,
    padded_int_mm,
    quantize_per_token_fast,
)
from leantorch.ops.quant.weight_only import (
    dequantize_int4,
    dequantize_int8,
    dequantize_ternary_packed,
    ternary_codes,
)

U32 = 2.0**-24  # unit roundoff of float32
FAST = settings(max_examples=40, deadline=None)
BACKENDS = ["int_mm"] + (["onednn"] if onednn_available() else [])


def heavy_tailed(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normal values with a few large ones, the shape real weights and activations have."""
    x = torch.randn(*shape, dtype=dtype)
    return x * (1 + 9 * (torch.rand(*shape, dtype=dtype) < 0.02))


def shapes(max_rows: int = 9, max_groups: int = 4, max_group: int = 12):
    return st.tuples(st.integers(1, max_rows), st.integers(1, max_groups),
                     st.integers(1, max_group), st.integers(0, 2**31 - 1))


# --------------------------------------------------------------------------- error bounds
@FAST
@given(shapes(), st.sampled_from([8, 4]), st.booleans())
def test_groupwise_error_is_within_half_a_step(shape, bits, symmetric) -> None:
    out_features, groups, group_size, seed = shape
    torch.manual_seed(seed)
    w = heavy_tailed(out_features, groups * group_size, dtype=torch.float64)
    q, scale, offset = naive.quantize_groupwise(w, bits, group_size, symmetric)
    w_hat = naive.dequantize_groupwise(q, scale, offset)
    step = scale.repeat_interleave(group_size, dim=1)
    assert ((w - w_hat).abs() <= step / 2 * (1 + 1e-12)).all()
    if symmetric:
        assert q.abs().max() <= 2 ** (bits - 1) - 1
    else:
        assert q.min() >= 0 and q.max() <= 2**bits - 1


@FAST
@given(shapes(), st.sampled_from([8, 4]), st.booleans())
def test_float32_error_is_half_a_step_plus_rounding(shape, bits, symmetric) -> None:
    """In float32 (what the modules run) the bound gains the rounding of ``w / scale`` and of
    ``q * scale (+ offset)``: a few units of roundoff of the values involved."""
    out_features, groups, group_size, seed = shape
    torch.manual_seed(seed)
    w = heavy_tailed(out_features, groups * group_size)
    q, scale, offset = naive.quantize_groupwise(w, bits, group_size, symmetric)
    w_hat = naive.dequantize_groupwise(q, scale, offset)
    step = scale.repeat_interleave(group_size, dim=1).double()
    rounding = 4 * U32 * (w.double().abs() + w_hat.double().abs() + step * 2**bits)
    assert ((w.double() - w_hat.double()).abs() <= step / 2 + rounding).all()


@FAST
@given(st.integers(1, 9), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_per_token_error_is_within_half_a_step(tokens, features, seed) -> None:
    torch.manual_seed(seed)
    x = heavy_tailed(tokens, features, dtype=torch.float64)
    x[0] = 0.0  # an all-zero token quantizes exactly
    q, scale = naive.quantize_per_token(x)
    assert scale.shape == (tokens, 1) and q.dtype == torch.int8
    assert ((x - q.double() * scale).abs() <= scale / 2 * (1 + 1e-12)).all()
    assert (q[0] == 0).all() and q.abs().max() <= 127


def test_ternary_error_is_half_a_step_inside_the_range_and_clips_outside() -> None:
    w = heavy_tailed(16, 40, dtype=torch.float64)
    t, gamma = naive.quantize_ternary(w)
    assert set(t.unique().tolist()) <= {-1, 0, 1}
    assert torch.allclose(gamma, w.abs().mean().reshape(1))
    w_hat = naive.dequantize_ternary(t, gamma)
    inside = w.abs() <= 1.5 * gamma
    assert ((w - w_hat).abs()[inside] <= gamma / 2 * (1 + 1e-12)).all()
    assert torch.equal(w_hat[~inside], torch.sign(w[~inside]) * gamma)  # clipped to +-gamma


def test_groupwise_beats_per_tensor_on_outlier_channels() -> None:
    """A few input channels 50x larger than the rest: one scale for the tensor spends its
    grid on them; group-wise scales confine them to their own groups."""
    torch.manual_seed(0)
    w = torch.randn(64, 256, dtype=torch.float64)
    w[:, [3, 70]] *= 50.0  # outlier input channels, in groups 0 and 2 of size 32
    q, scale = naive.quantize_per_tensor(w, 4)
    per_tensor = (w - q.double() * scale).pow(2).mean()
    for symmetric in (True, False):
        q, scale, offset = naive.quantize_groupwise(w, 4, 32, symmetric)
        grouped = (w - naive.dequantize_groupwise(q, scale, offset)).pow(2).mean()
        assert grouped < per_tensor / 4
    q, scale = naive.quantize_per_tensor(w, 8)
    q8, scale8, _ = naive.quantize_groupwise(w, 8, 32)
    assert (w - naive.dequantize_groupwise(q8, scale8)).pow(2).mean() < \
        (w - q.double() * scale).pow(2).mean() / 4


def test_constant_groups_dequantize_exactly() -> None:
    w = torch.zeros(3, 8)
    w[1] = 2.5
    for symmetric in (True, False):
        q, scale, offset = naive.quantize_groupwise(w, 4, 4, symmetric)
        assert torch.equal(naive.dequantize_groupwise(q, scale, offset), w)
        assert torch.isfinite(scale).all()


# --------------------------------------------------------------------------- packing
@FAST
@given(st.integers(1, 6), st.integers(1, 20), st.booleans(), st.integers(0, 2**31 - 1))
def test_int4_packing_round_trips(rows, half_cols, symmetric, seed) -> None:
    generator = torch.Generator().manual_seed(seed)
    low, high = (-7, 8) if symmetric else (0, 16)
    codes = torch.randint(low, high, (rows, 2 * half_cols), generator=generator,
                          dtype=torch.int8)
    packed = naive.pack_int4(codes, symmetric)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, half_cols)
    assert torch.equal(naive.unpack_int4(packed, symmetric), codes)
    # the documented layout: column 2j in the low nibble
    assert int(packed[0, 0]) == int(codes[0, 0]) + (8 if symmetric else 0) + \
        16 * (int(codes[0, 1]) + (8 if symmetric else 0))


@FAST
@given(st.integers(1, 6), st.integers(1, 23), st.integers(0, 2**31 - 1))
def test_ternary_packing_round_trips(rows, cols, seed) -> None:
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (rows, cols), generator=generator, dtype=torch.int8)
    packed = naive.pack_ternary(codes)
    assert packed.shape == (rows, -(-cols // 4))
    assert torch.equal(naive.unpack_ternary(packed, cols), codes)
    assert torch.equal(ternary_codes(packed, cols), codes)


# --------------------------------------------------------------------------- fast == reference
@FAST
@given(st.integers(1, 9), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_fast_per_token_quantization_is_bit_identical(tokens, features, seed) -> None:
    torch.manual_seed(seed)
    x = heavy_tailed(tokens, features)
    x[-1] = 0.0
    q_ref, s_ref = naive.quantize_per_token(x)
    q, s = quantize_per_token_fast(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


@FAST
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_integer_matmul_is_exact(m, k, n, seed) -> None:
    generator = torch.Generator().manual_seed(seed)
    a = torch.randint(-127, 128, (m, k), generator=generator, dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8)
    exact = (a.long() @ w.long().t()).int()
    assert torch.equal(int8_matmul(a, w.t()), exact)  # the transposed view the layers pass
    assert torch.equal(padded_int_mm(a, w.t()), exact)  # the CUDA padding, run on CPU
    assert torch.equal(int8_ops._int_mm_exact_fallback(a, w.t()), exact)


@pytest.mark.parametrize("backend", BACKENDS)
@FAST
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_scaled_integer_matmul_accumulates_exactly(backend, m, k, n, seed) -> None:
    """With unit scales the layers' matmul is the exact integer sum (|sum| < 2**24 here, so
    float32 holds it exactly), on both the fused oneDNN path and torch._int_mm."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randint(-127, 128, (m, k), generator=generator, dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8)
    out = int8_scaled_matmul(a, w, torch.ones(n), backend=backend)
    assert out.dtype == torch.float32
    assert torch.equal(out, (a.long() @ w.long().t()).float())


def test_onednn_packed_weight_follows_in_place_edits() -> None:
    if not onednn_available():
        pytest.skip("no oneDNN int8 GEMM in this build")
    from leantorch.ops.quant import int8 as module

    a = torch.randint(-127, 128, (5, 16), dtype=torch.int8)
    w = torch.randint(-127, 128, (3, 16), dtype=torch.int8)
    first = int8_scaled_matmul(a, w, torch.ones(3), backend="onednn")
    assert id(w) in module._PACKED
    w.mul_(-1)  # bumps the version: the cached packing is stale
    assert torch.equal(int8_scaled_matmul(a, w, torch.ones(3), backend="onednn"), -first)
    key = id(w)
    del w
    assert key not in module._PACKED  # the cache does not outlive the weight


def test_exact_fallback_slices_long_reductions() -> None:
    k = 2600  # three slices; every product at the extreme 127 * 127
    a = torch.full((3, k), 127, dtype=torch.int8)
    b = torch.full((k, 2), -127, dtype=torch.int8)
    b[::7] = 127
    expected = (a.long() @ b.long()).int()
    assert expected.abs().max() > 2**24  # a single float32 matmul could not hold it exactly
    assert torch.equal(int8_ops._int_mm_exact_fallback(a, b), expected)


def test_missing_onednn_is_logged_and_int_mm_takes_over(monkeypatch, caplog) -> None:
    from leantorch.ops.quant import int8 as module

    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    monkeypatch.setattr(module, "_ONEDNN", {})
    monkeypatch.setattr(module, "_LOGGED", set())
    x = torch.randn(4, 8)
    q_w, scale, _ = naive.quantize_groupwise(torch.randn(3, 8), 8, 8)
    with caplog.at_level(logging.WARNING, logger="leantorch.quant"):
        out = int8_dynamic_linear(x, q_w, scale.squeeze(1))
    assert not module.onednn_available()
    assert any("oneDNN int8 GEMM unavailable" in r.getMessage() for r in caplog.records)
    assert torch.equal(out, int8_dynamic_linear(x, q_w, scale.squeeze(1), backend="int_mm"))


def test_fallback_is_logged_with_its_reason(monkeypatch, caplog) -> None:
    def broken(a, b):
        raise RuntimeError("no kernel for this build")

    monkeypatch.setattr(torch, "_int_mm", broken)
    monkeypatch.setattr(int8_ops, "_LOGGED", set())
    a = torch.randint(-127, 128, (5, 12), dtype=torch.int8)
    b = torch.randint(-127, 128, (12, 3), dtype=torch.int8)
    with caplog.at_level(logging.WARNING, logger="leantorch.quant"):
        result = int8_matmul(a, b)
        int8_matmul(a[:2, :7], b[:7])  # logged once, not per call or per shape
    assert torch.equal(result, (a.long() @ b.long()).int())
    messages = [r.getMessage() for r in caplog.records if r.name == "leantorch.quant"]
    assert len(messages) == 1 and "no kernel for this build" in messages[0]
    assert "exact float32 fallback" in messages[0]


def _int8_dynamic_bound(x, weight, weight_scale, bias) -> torch.Tensor:
    """|fast - reference| bound. The fast path rounds the exact int32 sum times two float32
    scales plus the bias three times (4 units of float32 roundoff with the cast of the
    reference to float32); the float64 reference itself rounds each of its k products and
    sums (relative 2**-53 of the sum of magnitudes, which matters when the sum cancels)."""
    q, s = naive.quantize_per_token(x)
    scales = s.double() * weight_scale.double()
    exact = (q.double() @ weight.double().t()) * scales
    magnitudes = (q.double().abs() @ weight.double().abs().t()) * scales
    b = 0 if bias is None else bias.double().abs()
    k = x.shape[-1]
    return 4 * U32 * (exact.abs() + b) * (1 + 1e-9) + (k + 3) * 2.0**-53 * (magnitudes + b)


@pytest.mark.parametrize("backend", BACKENDS)
@FAST
@given(st.integers(1, 20), st.integers(1, 48), st.integers(1, 24), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_int8_dynamic_fast_equals_reference(backend, tokens, k, n, with_bias, seed) -> None:
    torch.manual_seed(seed)
    x = heavy_tailed(tokens, k)
    w = torch.randn(n, k)
    bias = torch.randn(n) if with_bias else None
    q_w, scale, _ = naive.quantize_groupwise(w, 8, k)
    scale = scale.squeeze(1)
    fast = int8_dynamic_linear(x, q_w, scale, bias, backend=backend)
    reference = naive.int8_dynamic_linear_reference(x, q_w, scale, bias)
    assert fast.dtype == reference.dtype == torch.float32
    bound = _int8_dynamic_bound(x, q_w, scale, bias)
    assert ((fast.double() - reference.double()).abs() <= bound).all()


def test_int8_dynamic_keeps_leading_dims_and_dtype() -> None:
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    q_w, scale, _ = naive.quantize_groupwise(torch.randn(8, 16), 8, 16)
    out = int8_dynamic_linear(x, q_w, scale.squeeze(1))
    assert out.shape == (2, 3, 8) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", BACKENDS)
@FAST
@given(st.integers(1, 12), st.integers(2, 40), st.integers(1, 16), st.floats(0.5, 4.0),
       st.integers(0, 2**31 - 1))
def test_llm_int8_fast_equals_reference(backend, tokens, k, n, threshold, seed) -> None:
    torch.manual_seed(seed)
    x = heavy_tailed(tokens, k)
    w = torch.randn(n, k)
    bias = torch.randn(n)
    q_w, scale, _ = naive.quantize_groupwise(w, 8, k)
    scale = scale.squeeze(1)
    fast, count = llm_int8_linear(x, q_w, scale, bias, threshold, backend=backend)
    reference, outliers = naive.llm_int8_linear_reference(x, q_w, scale, bias, threshold)
    assert count == int(outliers.sum())
    # the integer part: zeroing outlier columns gives exactly the reference's codes
    q_fast, s_fast = quantize_per_token_fast(x.masked_fill(outliers, 0.0))
    assert (q_fast[:, outliers] == 0).all()
    int_part = torch.zeros(tokens, n, dtype=torch.float64)
    if (~outliers).any():
        q_ref, s_ref = naive.quantize_per_token(x[:, ~outliers])
        assert torch.equal(q_fast[:, ~outliers], q_ref) and torch.equal(s_fast, s_ref)
        int_part = (q_ref.double().abs() @ q_w[:, ~outliers].double().abs().t()) \
            * s_ref.double() * scale.double()
    # the float part adds a float32 matmul over the outlier columns: its rounding on top
    w_hat = q_w.double() * scale.double().unsqueeze(1)
    float_part = x[:, outliers].double().abs() @ w_hat[:, outliers].abs().t()
    bound = (4 + outliers.sum().item()) * U32 * (int_part + float_part + bias.double().abs() +
                                                 reference.double().abs()) + 1e-30
    assert ((fast.double() - reference.double()).abs() <= bound).all()


def test_llm_int8_without_outliers_is_int8_dynamic() -> None:
    x = torch.rand(6, 16)  # |x| < 1: no column crosses the threshold
    q_w, scale, _ = naive.quantize_groupwise(torch.randn(4, 16), 8, 16)
    out, count = llm_int8_linear(x, q_w, scale.squeeze(1), None, 6.0)
    assert count == 0
    assert torch.equal(out, int8_dynamic_linear(x, q_w, scale.squeeze(1)))


def test_llm_int8_with_every_column_an_outlier_is_the_float_product() -> None:
    x = torch.randn(5, 8) * 10 + 20  # every column above the threshold
    q_w, scale, _ = naive.quantize_groupwise(torch.randn(3, 8), 8, 8)
    out, count = llm_int8_linear(x, q_w, scale.squeeze(1), None, 1.0)
    assert count == 8
    w_hat = q_w.float() * scale
    assert torch.allclose(out, x @ w_hat.t(), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [4, 8, 24])
def test_fast_dequantization_is_bit_identical(bits, symmetric, group_size) -> None:
    w = heavy_tailed(10, 24)
    q, scale, offset = naive.quantize_groupwise(w, bits, group_size, symmetric)
    reference = naive.dequantize_groupwise(q, scale, offset)
    if bits == 4:
        fast = dequantize_int4(naive.pack_int4(q, symmetric), scale, offset)
    else:
        fast = dequantize_int8(q, scale, offset)
    assert torch.equal(fast, reference)


def test_fast_ternary_dequantization_is_bit_identical() -> None:
    for cols in (12, 13, 15):
        w = heavy_tailed(6, cols)
        t, gamma = naive.quantize_ternary(w)
        fast = dequantize_ternary_packed(naive.pack_ternary(t), gamma, cols)
        assert torch.equal(fast, naive.dequantize_ternary(t, gamma))
