"""quant.bf16 / quant.fp16 / quant.autocast: the islands a cast keeps in float32 (the dtype of
every tensor checked), each layer's error against its float32 self within the rounding bound
derived below, torch's CPU sdpa kernel keeping attention scores in float32, selection, errors,
bit-equal save/load, and the shipped recipes from Python and the CLI.

The bounds. ``u`` is the unit roundoff of the compute dtype (bf16: 8 significant bits, u =
2**-8; fp16: 11 bits, u = 2**-11); float32 adds ``g = 2**-24`` per rounding.

* A Linear whose input ``x`` already arrives in the compute dtype (exactly representable) and
  whose weight and bias were rounded (relative error <= u each), accumulated in float32 (the
  n + 1 terms of a dot product plus bias: <= (n + 1) g (1 + u) of ``A = |W| |x| + |b|``) and
  rounded once at the output (<= u of the computed value, itself <= (1 + u + (n + 1) g) A):
  ``|y' - y| <= (2u + u**2 + 3 (n + 1) g) A`` elementwise, ``y`` the exact float32 layer.
  ``A / |y|`` is the layer's condition number: the relative error is bounded by a small
  multiple of u times it.
* An embedding lookup returns rounded weights: ``|y' - y| <= u |y| + e``.
* ``e``: half the subnormal spacing (fp16: 2**-25; bf16: 2**-134), the absolute error of
  rounding a value below the smallest normal number (BERT's weights, drawn with std 0.02, have
  some): each rounded weight, bias or output may carry it, so a Linear's bound gains
  ``e (sum |x| + 2)``.
* torch's CPU flash-attention kernel (FlashAttentionKernel.cpp): scores, mask, max, exp and
  row sums in float32; the unnormalised probabilities rounded once (u) before ``P V``
  (float32 accumulation), the output rounded once (u): ``|o' - o| <= 2u (P |V|) + O(g)``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import leantorch
from leantorch.compress.quant import (
    DEFAULT_ISLANDS,
    Float32Island,
    autocast,
    bf16,
    fp16,
    int8_dynamic,
    precision,
)
from leantorch.compress.registry import get_transform
from leantorch.errors import LeanError, LeanTypeError

T = pytest.importorskip("transformers")
T.utils.logging.set_verbosity_error()

UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
CASTS = [(bf16, torch.bfloat16), (fp16, torch.float16)]
G = 2.0 ** -24


def underflow(dtype: torch.dtype) -> float:
    """Half the spacing of subnormal numbers: rounding's absolute error below the normals."""
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps / 2


def tiny_bert(attn: str = "sdpa") -> nn.Module:
    from leantorch.models.sentence import SentenceEncoder

    torch.manual_seed(0)
    config = T.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=128, vocab_size=200, max_position_embeddings=64,
                          attn_implementation=attn)
    return SentenceEncoder(T.BertModel(config)).eval()


def batch(seed: int = 1, rows: int = 3, seq: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 200, (rows, seq), generator=g)
    mask = torch.ones(rows, seq, dtype=torch.long)
    mask[0, seq // 2:] = 0  # one padded row: the masked path runs too
    return {"input_ids": ids, "attention_mask": mask}


def norm_paths(model: nn.Module) -> set[str]:
    return {p for p, m in model.named_modules() if isinstance(m, nn.LayerNorm)}


# --------------------------------------------------------------------------- islands
@pytest.mark.parametrize("cast,dtype", CASTS)
def test_islands_stay_float32_and_every_other_tensor_is_cast(cast, dtype) -> None:
    model = tiny_bert()
    norms = norm_paths(model)
    new, change = cast(model, example_inputs=batch())
    assert set(change.details["float32"]) == norms and len(norms) == 5  # 1 + 2 per layer
    assert all(why == "island pattern '*Norm'" for why in change.details["float32"].values())
    for name, param in new.named_parameters():
        in_island = any(name.startswith(f"{p}.module.") for p in norms)
        assert param.dtype == (torch.float32 if in_island else dtype), name
    for name, buffer in new.named_buffers():  # position / token type ids stay integer
        assert not buffer.is_floating_point(), name
    for path in norms:
        island = new.get_submodule(path)
        assert isinstance(island, Float32Island) and island.compute_dtype == str(dtype)[6:]
        assert island.eps == model.get_submodule(path).eps  # attributes read through
    assert precision(new) == {"transform": change.transform, "dtype": str(dtype)[6:]}
    # the caller's model is untouched: same classes, float32 everywhere
    assert precision(model) is None and not any(
        isinstance(m, Float32Island) for m in model.modules())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        out = new(**batch())
    assert out.dtype == torch.float32 and out.shape == (3, 64)
    assert change.after.param_bytes < change.before.param_bytes


@pytest.mark.parametrize("cast,dtype", CASTS)
def test_an_island_returns_exactly_the_float32_module_output(cast, dtype) -> None:
    model = tiny_bert()
    new, _ = cast(model)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [new.get_submodule(p).register_forward_hook(
        lambda m, args, out, p=p: seen.__setitem__(p, (args[0], out)))
        for p in norm_paths(model)]
    with torch.no_grad():
        new(**batch())
        for h in hooks:
            h.remove()
        assert len(seen) == 5
        for path, (x, out) in seen.items():
            assert x.dtype == dtype and out.dtype == dtype
            expected = model.get_submodule(path)(x.float()).to(dtype)
            assert torch.equal(out, expected), path


# --------------------------------------------------------------------------- per-layer error
def capture_inputs(model: nn.Module, kinds: tuple[type, ...]) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda m, args, p=p: seen.__setitem__(p, args[0]))
             for p, m in model.named_modules() if type(m) in kinds]
    with torch.no_grad():
        model(**batch())
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("cast,dtype", CASTS)
def test_every_linear_stays_within_the_rounding_bound_of_its_float32_self(cast, dtype) -> None:
    u = UNIT_ROUNDOFF[dtype]
    model = tiny_bert()
    new, _ = cast(model)
    inputs = capture_inputs(new, (nn.Linear,))
    assert len(inputs) == 2 * 6 + 1  # q, k, v, attention output, intermediate, output; pooler
    worst = 0.0
    with torch.no_grad():
        for path, x in inputs.items():
            assert x.dtype == dtype, path
            cast_layer, layer = new.get_submodule(path), model.get_submodule(path)
            got = cast_layer(x).double()
            w, b, x64 = layer.weight.double(), layer.bias.double(), x.double()
            exact = x64 @ w.T + b
            scale = x64.abs() @ w.abs().T + b.abs()  # |W| |x| + |b|
            n = layer.in_features
            bound = (2 * u + u * u + 3 * (n + 1) * G) * scale + \
                underflow(dtype) * (x64.abs().sum(-1, keepdim=True) + 2)
            assert (got - exact).abs().le(bound).all(), path
            worst = max(worst, ((got - exact).abs() / scale).max().item() / u)
    assert worst > 0.1  # the layers really ran in the low dtype (not a float32 copy)


@pytest.mark.parametrize("cast,dtype", CASTS)
def test_embedding_lookups_are_the_rounded_weights(cast, dtype) -> None:
    u = UNIT_ROUNDOFF[dtype]
    model = tiny_bert()
    new, _ = cast(model)
    ids = batch()["input_ids"]
    for path, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            got = new.get_submodule(path)(ids.clamp(max=module.num_embeddings - 1))
            exact = module(ids.clamp(max=module.num_embeddings - 1))
            assert got.dtype == dtype
            assert (got.float() - exact).abs().le(u * exact.abs() + underflow(dtype)).all(), path


def attention_inputs(dtype: torch.dtype, scale: float):
    g = torch.Generator().manual_seed(int(scale * 10))
    q, k, v = (torch.randn(2, 4, 96, 32, generator=g) * scale for _ in range(3))
    mask = torch.ones(2, 1, 96, 96, dtype=torch.bool)
    mask[0, ..., 70:] = False
    return q.to(dtype), k.to(dtype), v.to(dtype), mask


def attention_bound(q, k, v, mask):
    """The exact attention of the (rounded) inputs in float64, and P |V|."""
    q, k, v = q.double(), k.double(), v.double()
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~mask, -math.inf)
    p = scores.softmax(-1)
    return p @ v, p @ v.abs()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 3.0, 6.0])
def test_cpu_sdpa_keeps_scores_in_float32_for_low_precision_inputs(dtype, scale) -> None:
    u = UNIT_ROUNDOFF[dtype]
    q, k, v, mask = attention_inputs(dtype, scale)
    exact, weight = attention_bound(q, k, v, mask)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert out.dtype == dtype
    # 2u from the rounded probabilities and output; g terms from float32 scores and sums
    assert (out.double() - exact).abs().le((2 * u + 64 * G) * weight).all()


def test_eager_attention_in_bf16_breaks_that_bound_when_scores_are_large() -> None:
    # why the cast switches transformers' eager attention to sdpa: rounding the scores to bf16
    # costs u * |score| in every exponent
    u = UNIT_ROUNDOFF[torch.bfloat16]
    q, k, v, mask = attention_inputs(torch.bfloat16, 6.0)
    exact, weight = attention_bound(q, k, v, mask)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(32)).masked_fill(~mask, -math.inf)
    eager = scores.softmax(-1) @ v
    assert ((eager.double() - exact).abs() / weight).max() > 10 * 2 * u


def test_eager_transformers_attention_is_switched_to_sdpa_unless_kept() -> None:
    model = tiny_bert("eager")
    new, change = bf16(model)
    assert new.encoder.config._attn_implementation == "sdpa"
    assert model.encoder.config._attn_implementation == "eager"  # the caller's copy
    assert change.details["attention"]["encoder"].startswith("eager -> sdpa: ")
    kept, change = bf16(model, attention="keep")
    assert kept.encoder.config._attn_implementation == "eager"
    assert "rounded to the compute dtype" in change.details["attention"]["encoder"]


def test_sentence_pooling_runs_in_float32() -> None:
    model = tiny_bert()
    new, change = bf16(model)
    assert change.details["pooling"] == {"(model)": "mean pooling and L2 norm in float32"}
    hidden = {}
    new.encoder.register_forward_hook(lambda m, a, out: hidden.update(h=out[0]))  # None
    b = batch()
    with torch.no_grad():
        out = new(**b)
    h = hidden["h"]
    assert h.dtype == torch.bfloat16
    mask = b["attention_mask"].unsqueeze(-1).float()
    expected = F.normalize((h.float() * mask).sum(1) / mask.sum(1), dim=-1)
    assert torch.equal(out, expected)


def test_whole_model_agrees_with_float32() -> None:
    model = tiny_bert()
    with torch.no_grad():
        reference = model(**batch())
        for cast, least in ((bf16, 0.999), (fp16, 0.99999), (autocast, 0.999)):
            new, _ = cast(model)
            assert F.cosine_similarity(new(**batch()), reference).min() > least


# --------------------------------------------------------------------------- selection
def test_exclude_keeps_a_layer_float32_as_one_island() -> None:
    model = tiny_bert()
    new, change = bf16(model, exclude="encoder.encoder.layer.1*")
    assert change.details["float32"]["encoder.encoder.layer.1"] == \
        "not selected by include/exclude: kept in float32"
    for name, param in new.named_parameters():
        kept = name.startswith("encoder.encoder.layer.1.") or ".LayerNorm.module." in name
        assert param.dtype == (torch.float32 if kept else torch.bfloat16), name
    assert not any(p.startswith("encoder.encoder.layer.1") for p in change.replaced)
    with torch.no_grad():
        assert new(**batch()).dtype == torch.float32


def test_include_casts_only_what_it_names() -> None:
    model = tiny_bert()
    new, change = bf16(model, include="*.attention.self.*")
    cast = {n for n, p in new.named_parameters() if p.dtype == torch.bfloat16}
    assert cast == {f"encoder.encoder.layer.{i}.attention.self.{lin}.{t}" for i in (0, 1)
                    for lin in ("query", "key", "value") for t in ("weight", "bias")}
    assert sorted(change.replaced) == sorted(
        f"encoder.encoder.layer.{i}.attention.self.{lin}" for i in (0, 1)
        for lin in ("query", "key", "value"))
    # an unselected subtree is one island, not one per layer
    assert change.details["float32"]["encoder.embeddings"] == \
        "not selected by include/exclude: kept in float32"
    with torch.no_grad():
        out = new(**batch())
        assert F.cosine_similarity(out, model(**batch())).min() > 0.999


def test_islands_argument_adds_and_removes() -> None:
    model = tiny_bert()
    none, change = bf16(model, islands=[])
    assert change.details["float32"] == {}
    assert all(p.dtype == torch.bfloat16 for p in none.parameters())
    more, change = bf16(model, islands=["default", "*intermediate.dense"])
    assert set(change.details["float32"]) == norm_paths(model) | {
        f"encoder.encoder.layer.{i}.intermediate.dense" for i in (0, 1)}
    assert more.encoder.encoder.layer[0].intermediate.dense.module.weight.dtype == torch.float32
    fewer, change = bf16(model, islands="encoder.embeddings.LayerNorm")
    assert set(change.details["float32"]) == {"encoder.embeddings.LayerNorm"}
    assert "*Norm" in DEFAULT_ISLANDS
    with torch.no_grad():
        for m in (none, more, fewer):
            assert m(**batch()).dtype == torch.float32


def test_softmax_modules_and_tied_weights() -> None:
    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.mix = nn.Linear(16, 16)
            self.softmax = nn.Softmax(dim=-1)
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.embed.weight  # tied

        def forward(self, ids):
            return self.head(self.softmax(self.mix(self.embed(ids))))

    model = Toy()
    ids = torch.randint(0, 50, (2, 5))
    new, change = bf16(model, exclude="head")
    # the head is excluded, so its weight stays float32, so the embedding that shares it too
    assert change.details["float32"] == {
        "head": "not selected by include/exclude: kept in float32",
        "embed": "shares a tensor (tied weights) with a module kept in float32",
        "softmax": "island pattern 'Softmax'"}
    assert new.head.module.weight is new.embed.module.weight  # still tied
    assert new.mix.weight.dtype == torch.bfloat16 and new.embed.module.weight.dtype == \
        torch.float32
    with torch.no_grad():
        assert new(ids).dtype == torch.float32


def test_quantized_layers_stay_float32_islands() -> None:
    model = tiny_bert()
    quantized, _ = int8_dynamic(model)
    new, change = bf16(quantized)
    reasons = change.details["float32"]
    assert sum("integer parameters" in r for r in reasons.values()) == 13
    with torch.no_grad():
        ref = quantized(**batch())
        assert F.cosine_similarity(new(**batch()), ref).min() > 0.999


def test_float_inputs_are_cast_at_the_entry() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 10)).eval()
    new, change = fp16(model)
    assert set(change.details["float32"]) == {"1"}
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        out = new(x)
        assert out.dtype == torch.float32
        assert F.cosine_similarity(out, model(x)).min() > 0.999


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("call,error,fragment", [
    (lambda m: bf16(m, islands=3), LeanTypeError, "islands must be a glob pattern"),
    (lambda m: bf16(m, islands=[""]), LeanError, "an empty pattern"),
    (lambda m: bf16(m, islands=["NoSuchNorm"]), LeanError,
     "islands pattern 'NoSuchNorm' matches no module"),
    (lambda m: bf16(m, exclude=[1]), LeanTypeError, "exclude must be a glob pattern"),
    (lambda m: bf16(m, attention="flash"), LeanError,
     "quant.bf16: attention='flash'; expected one of 'sdpa', 'keep'"),
    (lambda m: autocast(m, dtype="int8"), LeanError,
     "quant.autocast: dtype='int8'; expected 'bfloat16' or 'float16'"),
    (lambda m: autocast(m, dtype=torch.float32), LeanError, "dtype=torch.float32"),
    (lambda m: autocast(m, device_type="tpu"), LeanError, "device_type='tpu'"),
    (lambda m: bf16(bf16(m)[0]), LeanError, "already changed by quant.bf16"),
    (lambda m: fp16(autocast(m)[0]), LeanError, "already changed by quant.autocast"),
    (lambda m: fp16("model"), LeanTypeError, "model must be a torch.nn.Module"),
])
def test_bad_arguments_say_what_is_accepted(call, error, fragment) -> None:
    with pytest.raises(error, match=fragment.replace("(", r"\(").replace("*", r"\*")):
        call(tiny_bert())


def test_a_top_module_with_unselected_tensors_is_refused() -> None:
    class WithToken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.token = nn.Parameter(torch.zeros(4))
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x + self.token)

    with pytest.raises(LeanError, match=r"owns floating tensors \(token\)"):
        bf16(WithToken(), include="proj")
    new, _ = bf16(WithToken())
    assert new.token.dtype == torch.bfloat16 and new(torch.ones(2, 4)).dtype == torch.float32


# --------------------------------------------------------------------------- autocast
def test_autocast_equals_running_under_torch_autocast() -> None:
    model = tiny_bert()
    new, change = autocast(model)
    assert change.details["dtype"] == "bfloat16" and change.details["device_type"] == "cpu"
    assert all(p.dtype == torch.float32 for p in new.parameters())
    with torch.no_grad():
        got = new(**batch())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = model(**batch())
    assert got.dtype == torch.float32 and torch.equal(got, expected.float())
    assert not torch.is_autocast_enabled("cpu")


def test_autocast_context_is_left_when_the_forward_raises() -> None:
    new, _ = autocast(tiny_bert())
    with pytest.raises(Exception):  # noqa: B017 - whatever the model raises on bad ids
        new(input_ids=torch.full((1, 4), 10_000))
    assert not torch.is_autocast_enabled("cpu")


# --------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("transform", ["quant.bf16", "quant.fp16", "quant.autocast"])
def test_save_load_round_trip_is_bit_equal(transform, tmp_path) -> None:
    new, _ = get_transform(transform)(tiny_bert("eager"), inplace=False)
    path = leantorch.save(new, tmp_path / "m.safetensors")
    back = leantorch.load(path)
    state, loaded = new.state_dict(), back.state_dict()
    assert state.keys() == loaded.keys()
    for key, tensor in state.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key
    assert precision(back) == precision(new)
    with torch.no_grad():
        assert torch.equal(back(**batch()), new(**batch()))


def test_a_pruned_then_cast_model_round_trips(tmp_path) -> None:
    from leantorch.compress.prune import prune_structured

    pruned, _ = prune_structured(tiny_bert(), ratio=0.5, units="neurons", importance="l2",
                           example_inputs=batch())
    new, _ = bf16(pruned)
    back = leantorch.load(leantorch.save(new, tmp_path / "m.safetensors"))
    assert back.encoder.encoder.layer[0].intermediate.dense.out_features == 64
    with torch.no_grad():
        assert torch.equal(back(**batch()), new(**batch()))


# --------------------------------------------------------------------------- recipes
def test_shipped_bf16_recipes_run_from_python() -> None:
    from leantorch.compress.recipe import load_recipe, run_recipe

    model = tiny_bert()
    data = [batch(seed) for seed in range(4)]
    result = run_recipe("bf16", model, calibration=data[:2], evaluation=data[2:],
                        example_inputs=data[2], latency_runs=0)
    assert result.passed and result.stages[-1].fidelity["cosine_mean"] > 0.999
    assert precision(result.model)["dtype"] == "bfloat16"
    stacked = load_recipe("prune-bf16")
    assert [s.transform for s in stacked.steps] == ["prune.structured", None, "quant.bf16"]


@pytest.mark.slow
def test_cli_compresses_minilm_with_the_bf16_recipe_and_loads_it(tmp_path, capsys) -> None:
    from leantorch.cli import main

    out = tmp_path / "out"
    code = main(["compress", "minilm", "--recipe", "bf16", "--out", str(out), "--seq-len", "16",
                 "--latency-runs", "0", "--threads", "1"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["stages"][-1]["fidelity"]["metrics"]["cosine_mean"] > 0.99
    model = leantorch.load(out)
    assert precision(model) == {"transform": "quant.bf16", "dtype": "bfloat16"}
    assert model.encoder.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    assert model.encoder.embeddings.LayerNorm.module.weight.dtype == torch.float32
    ids = torch.randint(0, 1000, (2, 8))
    with torch.no_grad():
        assert model(ids).dtype == torch.float32


@pytest.mark.slow  # ~15 s on 2 busy cores: the bundled corpus is tokenized and measured
def test_cli_compresses_with_the_bf16_recipe_and_the_folder_loads(tmp_path, capsys) -> None:
    from leantorch.cli import main

    folder = tmp_path / "tiny-bert"
    tiny_bert().encoder.save_pretrained(folder)
    out = tmp_path / "out"
    code = main(["compress", str(folder), "--recipe", "bf16", "--out", str(out), "--seq-len",
                 "8", "--latency-runs", "0"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and [s["label"] for s in report["stages"]] == ["original",
                                                                           "quant.bf16"]
    assert report["changes"][0]["details"]["dtype"] == "bfloat16"
    model = leantorch.load(out)
    assert precision(model) == {"transform": "quant.bf16", "dtype": "bfloat16"}
    assert model.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert model(input_ids=torch.randint(0, 200, (2, 8)))[0].dtype == torch.float32


@pytest.mark.slow  # ~15 s: a 200-step fine-tune between the prune and the cast
def test_prune_bf16_recipe_runs_and_its_model_round_trips(tmp_path) -> None:
    from leantorch.compress.recipe import run_recipe

    data = [batch(seed, rows=8) for seed in range(6)]
    result = run_recipe("prune-bf16", tiny_bert(), calibration=data[:4], evaluation=data[4:],
                        example_inputs=data[4], latency_runs=0)
    assert [s.label for s in result.stages] == ["original", "prune.structured",
                                                "+ fine-tune (200 steps)", "quant.bf16"]
    assert result.passed and precision(result.model)["dtype"] == "bfloat16"
    original, pruned, tuned, cast = result.stages
    assert pruned.params < original.params  # the prune removed units
    assert cast.params == tuned.params and cast.param_bytes < 0.6 * tuned.param_bytes
    back = leantorch.load(leantorch.save(result.model, tmp_path / "m.safetensors"))
    with torch.no_grad():
        assert torch.equal(back(**data[4]), result.model(**data[4]))


def test_a_tied_island_takes_its_subtree_along(tmp_path) -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(16, 16)
            self.norm = nn.LayerNorm(16)

        def forward(self, x):
            return self.norm(self.proj(x)) + self.tied[:1]

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.block = Block()
            self.block.tied = self.embed.weight  # the block owns the tied weight itself
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.block(self.embed(ids)))

    model = Toy()
    new, change = bf16(model, exclude="head")
    tied = "shares a tensor (tied weights) with a module kept in float32"
    # no island inside the block's island, no cast layer inside it
    assert change.details["float32"] == {"block": tied, "embed": tied, "head": (
        "not selected by include/exclude: kept in float32")}
    assert change.replaced == [] and all(p.dtype == torch.float32 for p in new.parameters())
    assert isinstance(new.block.module.norm, nn.LayerNorm)
    ids = torch.randint(0, 50, (2, 3))
    with torch.no_grad():
        # float32 inside each island; only the hand-overs between islands are rounded
        assert F.cosine_similarity(new(ids), model(ids), dim=-1).min() > 0.999
    assert set(new.state_dict()) == {"embed.module.weight", "block.module.proj.weight",
                                     "block.module.proj.bias", "block.module.norm.weight",
                                     "block.module.norm.bias", "block.module.tied",
                                     "head.module.weight"}
