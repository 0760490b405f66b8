"""The quantization transforms on whole models: the transform contract (copy, selection,
skips), sizes against the analytic count, cost counting, and save/load round trips."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import leantorch
from leantorch.compress.quant import (
    FakeQuantLinear,
    Int8DynamicLinear,
    LLMInt8Linear,
    TernaryLinear,
    WeightOnlyLinear,
    convert,
    fake_quantize,
    int4_weight,
    int8_dynamic,
    int8_weight,
    llm_int8,
)
from leantorch.compress.registry import get_transform, transform_names
from leantorch.errors import LeanError
from tests._optional import needs_transformers, transformers
from tests.conftest import count

T = transformers

B, N, D, HEADS, FF, LAYERS, VOCAB = 2, 10, 32, 4, 48, 2, 100

TRANSFORMS = [
    ("quant.int8_dynamic", {}),
    ("quant.int8_weight", {}),
    ("quant.int8_weight", {"group_size": 16, "symmetric": False}),
    ("quant.int4_weight", {"group_size": 16}),
    ("quant.int4_weight", {"group_size": None, "symmetric": True}),
    ("quant.llm_int8", {"threshold": 2.0}),
    ("quant.fake_quantize", {"scheme": "int8_dynamic"}),
    ("quant.fake_quantize", {"scheme": "int4_weight", "group_size": 16}),
    ("quant.fake_quantize", {"scheme": "ternary"}),
    ("quant.int8_dynamic", {"compute_dtype": "bfloat16"}),
]
IDS = [f"{name}{sorted(args.items())}" for name, args in TRANSFORMS]


def bert() -> nn.Module:
    torch.manual_seed(0)
    config = T.BertConfig(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                          intermediate_size=FF, vocab_size=VOCAB, attn_implementation="sdpa")
    return T.BertModel(config).eval()


def ids() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (B, N), generator=generator)
    return {"input_ids": x, "attention_mask": torch.ones_like(x)}


def hidden(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**ids()).last_hidden_state


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {p: m for p, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_every_transform_is_registered() -> None:
    names = set(transform_names())
    assert {"quant.int8_dynamic", "quant.int8_weight", "quant.int4_weight", "quant.llm_int8",
            "quant.fake_quantize", "quant.convert"} <= names
    assert get_transform("quant.int8_dynamic") is int8_dynamic


@pytest.mark.parametrize(("name", "args"), TRANSFORMS, ids=IDS)
@needs_transformers
def test_the_callers_model_is_unchanged(name, args) -> None:
    model = bert()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = {k: v.data_ptr() for k, v in model.state_dict().items()}
    types = {p: type(m) for p, m in model.named_modules()}
    new, change = get_transform(name)(model, **args)
    assert new is not model
    assert {p: type(m) for p, m in model.named_modules()} == types
    after = model.state_dict()
    assert all(torch.equal(after[k], v) and after[k].data_ptr() == tensors[k]
               for k, v in state.items())
    assert len(change.replaced) == len(linears(model)) == 2 * 6 + 1  # q,k,v,o,up,down + pooler


@pytest.mark.parametrize(("name", "args"), TRANSFORMS, ids=IDS)
@needs_transformers
def test_save_load_round_trips_bit_exactly(name, args, tmp_path) -> None:
    new, _ = get_transform(name)(bert(), **args)
    path = leantorch.save(new, tmp_path / "model.safetensors")
    loaded = leantorch.load(path)
    assert {p: type(m) for p, m in loaded.named_modules()} == \
        {p: type(m) for p, m in new.named_modules()}
    saved, restored = new.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    for key, tensor in saved.items():
        assert restored[key].dtype == tensor.dtype and torch.equal(restored[key], tensor), key
    for original, rebuilt in zip(new.modules(), loaded.modules(), strict=True):
        if hasattr(original, "spec"):
            assert rebuilt.spec() == original.spec()
    assert torch.equal(hidden(loaded), hidden(new))


@pytest.mark.parametrize(("name", "args"), TRANSFORMS, ids=IDS)
@needs_transformers
def test_profile_counts_every_op_of_the_quantized_model(name, args) -> None:
    new, _ = get_transform(name)(bert(), **args)
    report = count(new, input_kwargs=ids())
    assert report.uncounted == {}


@pytest.mark.parametrize(("name", "args"), TRANSFORMS[:6], ids=IDS[:6])
@needs_transformers
def test_quantized_models_stay_close_to_the_float_model(name, args) -> None:
    model = bert()
    new, _ = get_transform(name)(model, **args)
    cosine = nn.functional.cosine_similarity(hidden(new), hidden(model), dim=-1)
    assert cosine.min() > (0.98 if "int4" in name else 0.999)


def _layer_bytes(linear: nn.Linear, name: str, args: dict) -> int:
    """Analytic bytes of one quantized weight: codes, scales (float32), offsets."""
    out_features, in_features = linear.out_features, linear.in_features
    if name == "quant.int8_dynamic":
        return out_features * in_features + 4 * out_features
    group = args.get("group_size", 128 if "int4" in name else None) or in_features
    groups = out_features * in_features // group
    code_bytes = out_features * in_features // (2 if "int4" in name else 1)
    symmetric = args.get("symmetric", "int8" in name)
    return code_bytes + 4 * groups * (1 if symmetric else 2)


@pytest.mark.parametrize(("name", "args"), TRANSFORMS[:5], ids=IDS[:5])
@needs_transformers
def test_param_bytes_follow_the_dtype(name, args) -> None:
    model = bert()
    _, change = get_transform(name)(model, **args)
    layers = linears(model)
    saved = sum(4 * m.weight.numel() - _layer_bytes(m, name, args) for m in layers.values())
    assert change.before.param_bytes - change.after.param_bytes == saved
    if name == "quant.int8_dynamic":  # int8 codes: a quarter of the float32 weight, + scales
        weights = sum(m.weight.numel() for m in layers.values())
        scales = sum(m.out_features for m in layers.values())
        assert change.details["weight_bytes_after"] == weights + 4 * scales
        assert change.details["weight_bytes_before"] == 4 * weights


@needs_transformers
def test_macs_and_params_are_those_of_the_float_model() -> None:
    model = bert()
    _, change = int8_dynamic(model, example_inputs=ids())
    assert change.after.macs == change.before.macs  # _int_mm counts the same MACs as mm
    assert change.after.params == change.before.params  # int8 codes are still parameters


@needs_transformers
def test_include_and_exclude_select_layers() -> None:
    new, change = int8_dynamic(bert(), include="encoder.layer.0.*", exclude="*.output.dense")
    assert change.replaced == ["encoder.layer.0.attention.self.query",
                               "encoder.layer.0.attention.self.key",
                               "encoder.layer.0.attention.self.value",
                               "encoder.layer.0.intermediate.dense"]
    assert type(new.encoder.layer[1].intermediate.dense) is nn.Linear
    assert type(new.pooler.dense) is nn.Linear


@needs_transformers
def test_layers_the_group_size_does_not_divide_are_skipped_with_the_reason() -> None:
    new, change = int4_weight(bert(), group_size=32)  # the FFN's output layer has 48 inputs
    assert set(change.skipped) == {"encoder.layer.0.output.dense", "encoder.layer.1.output.dense"}
    assert "in_features=48 is not a multiple of group_size=32" in \
        change.skipped["encoder.layer.0.output.dense"]
    assert type(new.encoder.layer[0].output.dense) is nn.Linear
    assert len(change.replaced) == 11


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.embed.weight  # tied, as in GPT-2 and Llama

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = self.attention(x, x, x, need_weights=False)[0]
        return self.head(self.proj(x))


def test_tied_weights_and_linear_subclasses_are_skipped_with_the_reason() -> None:
    model = TiedLM()
    new, change = int8_dynamic(model)
    assert change.replaced == ["proj"]
    assert "tied to embed.weight" in change.skipped["head"]
    assert "NonDynamicallyQuantizableLinear" in change.skipped["attention.out_proj"]
    tokens = torch.randint(0, 20, (2, 5))
    with torch.no_grad():
        assert torch.allclose(new(tokens), model(tokens), atol=0.05)


@needs_transformers
def test_gpt2_conv1d_is_reported_as_skipped() -> None:
    config = T.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    _, change = int8_dynamic(T.GPT2Model(config))
    assert "h.0.attn.c_attn" in change.skipped and "Conv1D" in change.skipped["h.0.attn.c_attn"]


def test_a_pruning_mask_is_baked_into_the_codes() -> None:
    class Mask(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w * (torch.arange(w.shape[1]) % 2 == 0)

    model = nn.Sequential(nn.Linear(8, 4))
    parametrize.register_parametrization(model[0], "weight", Mask())
    new, change = int8_weight(model)
    assert change.replaced == ["0"]
    assert (new[0].weight[:, 1::2] == 0).all()


@needs_transformers
def test_inplace_edits_the_given_model() -> None:
    model = bert()
    same, _ = int8_dynamic(model, inplace=True)
    assert same is model and isinstance(model.pooler.dense, Int8DynamicLinear)


def test_llm_int8_reports_the_fraction_kept_in_8_bits() -> None:
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2))
    x = torch.rand(3, 8)  # in [0, 1): below the threshold...
    x[1, 0], x[2, 5] = 9.0, -7.0  # ...except two input features of the first layer
    new, change = llm_int8(model, calibration=[(x,)])
    assert change.details["int8_fraction_per_layer"]["0"] == 6 / 8
    assert change.details["int8_fraction"] == pytest.approx(1 - 2 / (8 + 4))
    assert isinstance(new[0], LLMInt8Linear) and new[0].int8_fraction is None  # fresh stats
    with torch.no_grad():
        new(x)
        new(torch.rand(3, 8))
    assert new[0].int8_fraction == pytest.approx(1 - 2 / 16) and new[0].calls == 2
    _, change = llm_int8(model)
    assert change.details["int8_fraction"] is None and "int8_fraction_note" in change.details


@needs_transformers
def test_fake_then_convert_gives_the_real_model() -> None:
    model = bert()
    for scheme, expected in (("int8_weight", WeightOnlyLinear), ("int4_weight", WeightOnlyLinear),
                             ("int8_dynamic", Int8DynamicLinear), ("ternary", TernaryLinear)):
        fake, _ = fake_quantize(model, scheme=scheme, group_size=16 if "4" in scheme else None)
        real, change = convert(fake)
        assert change.details["schemes"] == {scheme: 13}
        assert all(type(m) is expected for m in real.modules()
                   if isinstance(m, (FakeQuantLinear, *(expected,))))
        if scheme.endswith("weight"):
            assert torch.equal(hidden(real), hidden(fake))
        else:
            torch.testing.assert_close(hidden(real), hidden(fake), rtol=1e-4, atol=1e-4)


def test_a_real_quantized_layer_passes_straight_through_gradients() -> None:
    """Fine-tuning what stays float (biases, norms) around a quantized layer works: the
    input gradient is grad @ W_hat and the bias gradient the summed output gradient."""
    layer = Int8DynamicLinear.from_linear(nn.Linear(8, 4))
    x = torch.randn(3, 8, requires_grad=True)
    g = torch.randn(3, 4)
    (layer(x) * g).sum().backward()
    torch.testing.assert_close(x.grad, g @ layer.dequantized_weight())
    torch.testing.assert_close(layer.bias.grad, g.sum(0))


def test_weight_only_gradcheck() -> None:
    layer = WeightOnlyLinear.from_linear(nn.Linear(6, 3), bits=4, group_size=2).double()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_modules_equal_their_reference_paths() -> None:
    torch.manual_seed(3)
    base = nn.Linear(24, 5)
    x = torch.randn(2, 3, 24) * 3
    layers = [Int8DynamicLinear.from_linear(base), LLMInt8Linear.from_linear(base, 4.0),
              WeightOnlyLinear.from_linear(base, 4, 8, False),
              WeightOnlyLinear.from_linear(base, 8, 12, True),
              TernaryLinear.from_linear(base, 8), TernaryLinear.from_linear(base, None)]
    for layer in layers:
        with torch.no_grad():
            torch.testing.assert_close(layer(x), layer.forward_reference(x), rtol=1e-5,
                                       atol=1e-5)


def test_bad_arguments_name_the_argument() -> None:
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(LeanError, match="group_size=0"):
        int4_weight(model, group_size=0)
    with pytest.raises(LeanError, match="group_size=True"):
        int8_weight(model, group_size=True)
    with pytest.raises(LeanError, match="symmetric='yes'"):
        int8_weight(model, symmetric="yes")
    with pytest.raises(LeanError, match="threshold=-1"):
        llm_int8(model, threshold=-1)
    with pytest.raises(LeanError, match="scheme='int2'"):
        fake_quantize(model, scheme="int2")
    with pytest.raises(LeanError, match="activation_bits=4"):
        fake_quantize(model, scheme="ternary", activation_bits=4)
    with pytest.raises(LeanError, match="no FakeQuantLinear"):
        convert(model)
    new, _ = int8_dynamic(model)
    with pytest.raises(LeanError, match="expected 8"):
        new(torch.randn(2, 5))


@needs_transformers
def test_the_integer_matmul_is_named_in_the_change(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="leantorch.quant"):
        _, change = int8_dynamic(bert(), example_inputs=ids())
    assert change.details["integer_matmul"].startswith(("oneDNN int8 GEMM", "torch._int_mm"))
    assert not caplog.records  # no fallback on CPU
