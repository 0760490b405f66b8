"""The int8 fast path: bfloat16 activations into the int8 layers (codes bit-identical to the
reference, outputs within the bound of their bfloat16 roundings), one quantize pass shared by
layers reading the same tensor, and ``quant.int8_dynamic(compute_dtype=...)`` on whole models."""

from __future__ import annotations

import gc

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import leantorch
from leantorch.compress.quant import Int8DynamicLinear, int8_dynamic
from leantorch.compress.quant import transforms as quant_transforms
from leantorch.errors import LeanError, LeanTypeError
from leantorch.ops.quant import int8 as int8_ops
from leantorch.ops.quant import naive
from leantorch.ops.quant.int8 import (
    clear_shared_quantization,
    int8_dynamic_linear,
    int8_scaled_matmul,
    onednn_available,
    quantize_per_token_fast,
    quantize_per_token_shared,
)
from tests.compress.quant.test_kernels import heavy_tailed

FAST = settings(max_examples=30, deadline=None)
U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
BACKENDS = ["auto", "int_mm"]


# --------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@FAST
@given(st.integers(1, 30), st.integers(1, 70), st.integers(0, 2**31 - 1))
def test_low_precision_input_quantizes_to_the_reference_codes(dtype, tokens, features,
                                                              seed) -> None:
    torch.manual_seed(seed)
    x = heavy_tailed(tokens, features).to(dtype)
    x[0] = 0  # an all-zero token: scale 1, codes 0
    q, scale = quantize_per_token_fast(x)
    q_ref, scale_ref = naive.quantize_per_token(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)


def test_bfloat16_gemm_output_is_the_scaled_sum_rounded_once() -> None:
    if not onednn_available():
        pytest.skip("no oneDNN int8 GEMM in this build")
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (37, 90), generator=generator, dtype=torch.int8)
    w = torch.randint(-127, 128, (21, 90), generator=generator, dtype=torch.int8)
    scale = torch.rand(21, generator=generator) + 0.01
    out = int8_scaled_matmul(a, w, scale, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    exact = (a.double() @ w.double().t()) * scale.double()
    # one rounding to bfloat16 of a float32 product of an exact (< 2**24) integer sum
    bound = exact.abs() * (U_BF16 + 2 * 2.0**-24) * (1 + U_BF16)
    assert ((out.double() - exact).abs() <= bound).all()


def _bfloat16_bound(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """|fast - reference| for a bfloat16 input. The fast path rounds to bfloat16 four times:
    the GEMM's output (acc * s_w), s_x, the bias, and the final ``b + out * s_x``. So with
    p = acc * s_w * s_x: |err| <= 3u(1+u)^3 |p| + u(1+u)|b| + u |p + b| (1+u), u = 2**-8;
    the reference's own float64 -> bfloat16 cast is half a step more (u |p + b|), and its
    float64 sum of k dequantized products is off by up to (k + 3) 2**-53 of their magnitudes
    (which matters where the sum cancels to 0)."""
    q, s = naive.quantize_per_token(x.reshape(-1, x.shape[-1]))
    scales = s.double() * weight_scale.double()
    p = (q.double() @ weight.double().t()) * scales
    magnitudes = (q.double().abs() @ weight.double().abs().t()) * scales
    b = torch.zeros(p.shape[1], dtype=torch.float64) if bias is None else bias.double()
    u = U_BF16
    bound = (3 * u * (1 + u) ** 3 * p.abs() + u * (1 + u) * b.abs()
             + 2 * u * (1 + u) * (p + b).abs() + (x.shape[-1] + 3) * 2.0**-53 * magnitudes)
    return bound.reshape(*x.shape[:-1], weight.shape[0])


@pytest.mark.parametrize("backend", BACKENDS)
@FAST
@given(st.integers(1, 20), st.integers(1, 48), st.integers(1, 24), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_bfloat16_int8_layer_equals_reference_within_its_roundings(backend, tokens, k, n,
                                                                   with_bias, seed) -> None:
    torch.manual_seed(seed)
    x = heavy_tailed(2, tokens, k).bfloat16()
    q_w, scale, _ = naive.quantize_groupwise(torch.randn(n, k), 8, k)
    scale = scale.squeeze(1)
    bias = torch.randn(n) if with_bias else None
    fast = int8_dynamic_linear(x, q_w, scale, bias, backend=backend)
    reference = naive.int8_dynamic_linear_reference(x, q_w, scale, bias)
    assert fast.dtype == reference.dtype == torch.bfloat16 and fast.shape == (2, tokens, n)
    error = (fast.double() - reference.double()).abs()
    assert (error <= _bfloat16_bound(x, q_w, scale, bias)).all()


# --------------------------------------------------------------------------- shared quantize
def test_shared_quantization_reuses_the_codes_of_the_same_unchanged_tensor() -> None:
    clear_shared_quantization()
    x = torch.randn(3, 5, 16)
    q, scale = quantize_per_token_shared(x)
    q_ref, scale_ref = naive.quantize_per_token(x.reshape(-1, 16))
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    again = quantize_per_token_shared(x)
    assert again[0] is q and again[1] is scale  # a cache hit: no second pass
    x.mul_(2)  # an in-place edit bumps the version: quantized afresh
    edited = quantize_per_token_shared(x)
    assert edited[0] is not q
    assert torch.equal(edited[0], naive.quantize_per_token(x.reshape(-1, 16))[0])
    other = x.clone()  # equal values, another tensor: not taken for x
    assert quantize_per_token_shared(other)[0] is not edited[0]


def test_shared_quantization_does_not_keep_the_input_alive() -> None:
    clear_shared_quantization()
    x = torch.randn(4, 8)
    quantize_per_token_shared(x)
    entry = int8_ops._LAST_INPUT[0]
    assert entry is not None and entry[0]() is x
    del x
    gc.collect()
    assert entry[0]() is None  # only a weak reference was kept


def test_inference_and_grad_tensors_are_not_cached() -> None:
    clear_shared_quantization()
    with torch.inference_mode():
        x = torch.randn(4, 8)
        first = quantize_per_token_shared(x)
        second = quantize_per_token_shared(x)
    assert first[0] is not second[0] and torch.equal(first[0], second[0])
    y = torch.randn(4, 8, requires_grad=True)
    assert quantize_per_token_shared(y)[0] is not quantize_per_token_shared(y)[0]


def test_sharing_layers_give_bit_identical_outputs() -> None:
    torch.manual_seed(0)
    linears = [nn.Linear(24, 24) for _ in range(3)]
    x = heavy_tailed(2, 7, 24)
    shared = [Int8DynamicLinear.from_linear(m, share_quantization=True) for m in linears]
    alone = [Int8DynamicLinear.from_linear(m) for m in linears]
    with torch.no_grad():
        for a, b in zip(shared, alone, strict=True):
            assert torch.equal(a(x), b(x))


# --------------------------------------------------------------------------- the transform
class TinyEncoder(nn.Module):
    """Embedding -> (LayerNorm -> q, k, v -> attention -> out -> GELU FFN) -> LayerNorm:
    the parts of a BERT block the bfloat16 compute path touches."""

    def __init__(self, dim: int = 32, vocab: int = 50) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm1(self.embed(ids))
        attn = nn.functional.scaled_dot_product_attention(self.q(h), self.k(h), self.v(h))
        h = h + self.o(attn)
        return self.norm2(h + self.down(nn.functional.gelu(self.up(h))))


def _ids() -> torch.Tensor:
    return torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(3))


def test_bfloat16_compute_casts_all_but_the_int8_scales_and_the_norms() -> None:
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    new, change = int8_dynamic(model, compute_dtype="bfloat16")
    assert change.details["compute_dtype"] == "bfloat16"
    assert sorted(change.details["float32_modules"]) == ["down", "k", "norm1", "norm2", "o",
                                                         "q", "up", "v"]
    assert new.embed.weight.dtype == torch.bfloat16
    for name in ("norm1", "norm2"):
        assert all(p.dtype == torch.float32 for p in getattr(new, name).parameters())
    for name in ("q", "k", "v", "o", "up", "down"):
        layer = getattr(new, name)
        assert isinstance(layer, Int8DynamicLinear) and layer.share_quantization
        assert layer.weight.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
    assert model.embed.weight.dtype == torch.float32  # the caller's model is untouched
    with torch.no_grad():
        out, ref = new(_ids()), model(_ids())
        int8_float32 = int8_dynamic(model)[0](_ids())
    assert out.dtype == torch.bfloat16
    # int8 in both; the bfloat16 activations move each unit-variance output by a few
    # bfloat16 steps (2**-8 relative) through three layers, far below int8's own error
    assert (out.float() - int8_float32).abs().max() < 0.1
    cosine = nn.functional.cosine_similarity(out.float(), ref, dim=-1)
    assert cosine.min() > 0.99


def test_auto_follows_the_cpu_features(monkeypatch) -> None:
    features = {"avx512_bf16": False, "amx_bf16": False}
    monkeypatch.setattr("leantorch.measure.hardware.cpu_info",
                        lambda: {"features": features})
    assert quant_transforms.resolve_compute_dtype("auto") is None
    features["amx_bf16"] = True
    assert quant_transforms.resolve_compute_dtype("auto") is torch.bfloat16
    assert quant_transforms.resolve_compute_dtype(None) is None
    assert quant_transforms.resolve_compute_dtype("float32") is None
    assert quant_transforms.resolve_compute_dtype(torch.bfloat16) is torch.bfloat16


def test_bad_knobs_name_the_argument_and_the_value() -> None:
    model = TinyEncoder()
    with pytest.raises(LeanError, match=r"compute_dtype='float16'.*'auto', 'bfloat16'"):
        int8_dynamic(model, compute_dtype="float16")
    with pytest.raises(LeanTypeError, match=r"share_quantization=1"):
        int8_dynamic(model, share_quantization=1)


def test_bfloat16_model_round_trips_through_save_and_load(tmp_path) -> None:
    torch.manual_seed(0)
    new, _ = int8_dynamic(TinyEncoder().eval(), compute_dtype="bfloat16")
    loaded = leantorch.load(leantorch.save(new, tmp_path / "model.safetensors"),
                            model=TinyEncoder())
    assert loaded.embed.weight.dtype == torch.bfloat16
    assert loaded.q.share_quantization and loaded.norm1.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(loaded(_ids()), new(_ids()))


def test_a_bert_block_quantizes_its_attention_input_once(monkeypatch) -> None:
    """transformers' BERT feeds one tensor to its q, k and v projections: with sharing, a
    layer makes 4 quantize passes (q/k/v, attention output, FFN up, FFN down), not 6."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=48,
                                     vocab_size=100, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    calls = []
    real = int8_ops.quantize_per_token_fast

    def counted(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(tuple(x.shape))
        return real(x)

    monkeypatch.setattr(int8_ops, "quantize_per_token_fast", counted)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    outputs = {}
    for share in (False, True):
        new, _ = int8_dynamic(model, share_quantization=share)
        calls.clear()
        clear_shared_quantization()
        with torch.no_grad():
            outputs[share] = new(input_ids=ids).last_hidden_state
        assert len(calls) == (6 if not share else 4) * config.num_hidden_layers
    assert torch.equal(outputs[True], outputs[False])


@pytest.mark.slow
def test_compiled_quantization_is_bit_identical() -> None:
    """``compile=True``: inductor's fused per-token quantization gives the reference's codes
    and scales (float32 and bfloat16 inputs, two shapes through one dynamic-shape compile),
    so the compiled model's outputs equal the eager one's."""
    from leantorch.ops.quant.int8 import quantize_per_token_compiled

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for tokens, features in ((33, 40), (70, 96)):
            x = heavy_tailed(tokens, features).to(dtype)
            x[1] = 0
            q, scale = quantize_per_token_compiled(x)
            q_ref, scale_ref = naive.quantize_per_token(x)
            assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    assert int8_ops._COMPILED["quantize"] is not quantize_per_token_fast  # it did compile
    model = TinyEncoder().eval()
    eager, _ = int8_dynamic(model, compute_dtype="bfloat16")
    compiled, change = int8_dynamic(model, compute_dtype="bfloat16", compile=True)
    assert change.params["compile"] is True and compiled.q.compile_quantization
    with torch.no_grad():
        assert torch.equal(compiled(_ids()), eager(_ids()))
