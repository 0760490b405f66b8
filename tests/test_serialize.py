"""leantorch.save / leantorch.load round-trip models bit-exactly, or fail clearly."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import leantorch
from leantorch.errors import LeanError
from leantorch.serialize import (
    FORMAT_VERSION,
    architecture,
    build,
    read_header,
    record_step,
    register_module,
    register_step,
)
from tests._optional import needs_transformers, transformers


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def roundtrip(model: nn.Module, tmp_path, **kwargs: Any) -> nn.Module:
    path = leantorch.save(model, tmp_path / "model.safetensors")
    return leantorch.load(path, **kwargs)


@register_module(name="tests.ScaledLinear")
class ScaledLinear(nn.Module):
    """A stand-in for a compressed layer: int8 weights with a per-row scale."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features,
                                                        dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, 1))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> ScaledLinear:
        new = cls(linear.in_features, linear.out_features)
        scale = linear.weight.abs().amax(dim=1, keepdim=True) / 127
        new.weight_int8.copy_((linear.weight / scale).round().to(torch.int8))
        new.scale.copy_(scale)
        return new

    def spec(self) -> dict[str, Any]:
        return {"in_features": self.weight_int8.shape[1],
                "out_features": self.weight_int8.shape[0]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.weight_int8.to(x.dtype) * self.scale).T


@register_module(name="tests.Mask")
class Mask(nn.Module):
    def __init__(self, rows: int, cols: int) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(rows, cols))

    def spec(self) -> dict[str, Any]:
        return {"rows": self.mask.shape[0], "cols": self.mask.shape[1]}

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def test_torch_layers_and_buffers_roundtrip(tmp_path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, groups=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).train()
    model(torch.randn(4, 3, 4, 4))  # move the BatchNorm statistics off their defaults
    loaded = roundtrip(model, tmp_path)
    assert_same_state(model, loaded)
    assert loaded.training
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(model.eval()(x), loaded.eval()(x))


def test_replaced_modules_and_parametrizations_roundtrip(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(6, 4), nn.GELU(), nn.Linear(4, 3))
    model[0] = ScaledLinear.from_linear(model[0])
    parametrize.register_parametrization(model[2], "weight", Mask(3, 4))
    model[2].parametrizations.weight[0].mask[1].zero_()
    loaded = roundtrip(model, tmp_path)
    assert isinstance(loaded[0], ScaledLinear)
    assert parametrize.is_parametrized(loaded[2], "weight")
    assert_same_state(model, loaded)
    x = torch.randn(5, 6)
    assert torch.equal(model(x), loaded(x))
    assert torch.all(loaded[2].weight[1] == 0)


def test_changed_shapes_are_rebuilt(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    model[0], model[2] = nn.Linear(6, 5), nn.Linear(5, 3)  # as a pruning would leave it
    loaded = roundtrip(model, tmp_path)
    assert loaded[0].out_features == 5
    assert_same_state(model, loaded)


def test_dtypes_are_kept(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)).to(torch.bfloat16)
    loaded = roundtrip(model, tmp_path)
    assert_same_state(model, loaded)


class UserNet(nn.Module):
    """A class leantorch cannot construct by itself."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def test_a_user_class_needs_a_skeleton(tmp_path) -> None:
    model = UserNet()
    model.body = ScaledLinear.from_linear(model.body)
    path = leantorch.save(model, tmp_path / "user.safetensors")
    with pytest.raises(LeanError, match="pass load"):
        leantorch.load(path)
    loaded = leantorch.load(path, model=UserNet())
    assert isinstance(loaded.body, ScaledLinear)
    assert_same_state(model, loaded)


@register_step("tests.drop_last")
def _drop_last(model: nn.Module, *, count: int) -> None:
    for _ in range(count):
        del model[len(model) - 1]


def test_recorded_steps_are_replayed(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3))
    record_step(model, "tests.drop_last", count=2)
    _drop_last(model, count=2)
    loaded = roundtrip(model, tmp_path)
    assert len(loaded) == 1
    assert_same_state(model, loaded)
    with pytest.raises(LeanError, match="not a registered step"):
        record_step(model, "tests.nope")


def tiny_gpt2() -> nn.Module:
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50,
                                     n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


@needs_transformers
def test_transformers_model_with_tied_weights(tmp_path) -> None:
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    loaded = roundtrip(model, tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied
    assert_same_state(model, loaded)
    ids = torch.randint(0, 50, (1, 7))
    assert torch.equal(model(ids).logits, loaded(ids).logits)


@needs_transformers
def test_sentence_encoder_with_a_replaced_layer(tmp_path) -> None:
    from leantorch.models import SentenceEncoder

    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, vocab_size=60)
    model = SentenceEncoder(transformers.BertModel(config)).eval()
    dense = model.encoder.encoder.layer[0].intermediate.dense
    model.encoder.encoder.layer[0].intermediate.dense = ScaledLinear.from_linear(dense)
    header_path = leantorch.save(model, tmp_path / "enc.safetensors")
    header = read_header(header_path)
    assert header["base"]["class"] == "leantorch.SentenceEncoder"
    assert list(header["overrides"]) == ["encoder.encoder.layer.0.intermediate.dense"]
    loaded = leantorch.load(header_path)
    ids = torch.randint(0, 60, (2, 5))
    assert torch.equal(model(ids), loaded(ids))


def test_architecture_of_builtins_rebuilds_the_same_structure() -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, (3, 1), stride=(2, 1), padding=(1, 0)),
                          nn.ModuleList([nn.Embedding(5, 3), nn.GroupNorm(2, 4)]))
    rebuilt = build(json.loads(json.dumps(architecture(model))))
    assert str(rebuilt) == str(model)


def test_bad_files_give_clear_errors(tmp_path) -> None:
    with pytest.raises(LeanError, match="no file at"):
        leantorch.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(LeanError, match="not a readable safetensors file"):
        leantorch.load(junk)
    path = leantorch.save(nn.Linear(2, 2), tmp_path / "ok.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(LeanError, match="corrupt or truncated"):
        leantorch.load(truncated)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(LeanError, match=r"not written by leantorch\.save"):
        leantorch.load(plain)


def test_a_newer_format_version_is_refused(tmp_path) -> None:
    from safetensors.torch import save_file

    header = {"format": "leantorch", "format_version": FORMAT_VERSION + 1}
    path = tmp_path / "future.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"leantorch": json.dumps(header)})
    with pytest.raises(LeanError, match=r"format version 2.*upgrade leantorch"):
        leantorch.load(path)


def test_save_is_atomic_and_leaves_the_model_alone(tmp_path) -> None:
    model = nn.Linear(3, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = leantorch.save(model, tmp_path / "a" / "b.safetensors")
    assert path.exists() and not list(path.parent.glob(".*.tmp"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
