"""Structured pruning: the physically smaller model equals the masked one, counts match the
analytic formulas, every pruned model round-trips leantorch.save/load."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import leantorch
from leantorch.compress.graph import build_graph
from leantorch.compress.prune import mask_units, prune_structured, prune_sublayers
from leantorch.compress.registry import get_transform
from leantorch.errors import LeanError
from tests.compress.test_graph import (
    FF,
    Concat,
    ConvChain,
    Depthwise,
    Flatten,
    GatedMLP,
    Residual,
    image,
    text_inputs,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_mixtral,
    tiny_resnet,
    tiny_vit,
)
from tests.conftest import count


def run(model: nn.Module, inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(inputs, dict):
            extra = {"use_cache": False} if "use_cache" in model.forward.__code__.co_varnames \
                else {}
            out = model(**inputs, **extra)
        else:
            out = model(inputs)
    for attr in ("logits", "last_hidden_state"):
        if hasattr(out, attr):
            return getattr(out, attr)
    return out


def masked_reference(model: nn.Module, inputs: Any, removed: dict[str, list[int]]
                     ) -> nn.Module:
    """The original model with the same slices zeroed (the readable reference)."""
    graph = build_graph(model, inputs)
    plan = {graph.group(name).id: units for name, units in removed.items()}
    return mask_units(copy.deepcopy(model), graph, plan)


def roundtrip(model: nn.Module, tmp_path: Path, skeleton: nn.Module | None = None) -> nn.Module:
    path = leantorch.save(model, tmp_path / "pruned.safetensors")
    return leantorch.load(path, model=skeleton)


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], Any], list[str]]] = {
    "conv_chain": (ConvChain, lambda: torch.randn(2, 3, 8, 8), ["channels"]),
    "residual": (Residual, lambda: torch.randn(2, 3, 6, 6), ["channels"]),
    "concat": (Concat, lambda: torch.randn(2, 3, 4, 4), ["channels"]),
    "depthwise": (Depthwise, lambda: torch.randn(2, 3, 5, 5), ["channels"]),
    "gated_mlp": (GatedMLP, lambda: torch.randn(3, 8), ["neurons"]),
    "flatten": (Flatten, lambda: torch.randn(2, 3, 3, 3), ["channels"]),
    "resnet": (tiny_resnet, lambda: image(32), ["channels"]),
    "bert": (tiny_bert, text_inputs, ["heads", "neurons"]),
    "gpt2": (tiny_gpt2, text_inputs, ["heads", "neurons"]),
    "llama": (tiny_llama, text_inputs, ["kv_heads", "heads", "neurons"]),
    "vit": (tiny_vit, image, ["heads", "neurons"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_pruned_model_equals_the_masked_model_and_round_trips(name: str, tmp_path: Path
                                                               ) -> None:
    build, inputs_fn, units = CASES[name]
    model, inputs = build().eval(), inputs_fn()
    for p in model.parameters():  # BatchNorm statistics away from identity
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, change = prune_structured(model, ratio=0.5, units=units, example_inputs=inputs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    removed = change.details["removed"]
    assert removed and all(g["exact"] for g in change.details["groups"].values())
    assert change.after.params < change.before.params
    reference = masked_reference(model, inputs, removed)
    torch.testing.assert_close(run(pruned, inputs), run(reference, inputs), atol=1e-5, rtol=1e-5)
    skeleton = None if name in ("resnet", "bert", "gpt2", "llama", "vit") else build()
    loaded = roundtrip(pruned, tmp_path, skeleton)
    assert torch.equal(run(loaded, inputs), run(pruned, inputs))
    assert {k: v.shape for k, v in loaded.state_dict().items()} == \
        {k: v.shape for k, v in pruned.state_dict().items()}


def test_ratio_zero_is_the_identity() -> None:
    for model, inputs in ((ConvChain().eval(), torch.randn(2, 3, 8, 8)),
                          (tiny_bert(), text_inputs())):
        same, change = prune_structured(model, ratio=0, units="all", example_inputs=inputs)
        assert change.after == change.before and change.replaced == []
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                     same.state_dict().values(), strict=True))
        assert torch.equal(run(same, inputs), run(model, inputs))


def test_counts_after_pruning_match_measure_and_the_analytic_formula() -> None:
    model, inputs = tiny_llama(layers=1), text_inputs()
    pruned, change = prune_structured(model, ratio=0.5, units=["heads", "neurons"],
                                      example_inputs=inputs)
    d, n, b, head_dim, kv_heads = 32, 10, 2, 8, 2
    q_heads, ff = 2, FF // 2  # one of the two query heads per KV group; half the neurons
    q_dim, kv_dim = q_heads * head_dim, kv_heads * head_dim
    pairs = n * (n + 1) // 2
    per_layer = (2 * n * d * q_dim + 2 * n * d * kv_dim + 3 * n * d * ff + 2 * pairs * q_dim)
    macs = b * (per_layer + n * d * 100)
    report = count(pruned, inputs)
    assert report.macs == macs == change.after.macs
    assert report.flops == change.after.flops
    params = (100 * d + d * q_dim * 2 + d * kv_dim * 2 + 3 * d * ff + 2 * d + d + 100 * d)
    assert sum(p.numel() for p in pruned.parameters()) == params == change.after.params
    # every layer lost the same: the config says so, verified by rebuilding from it
    assert pruned.config.num_attention_heads == 2 and pruned.config.intermediate_size == ff
    assert pruned.model.layers[0].self_attn.num_key_value_groups == 1


def test_cnn_counts_match_the_conv_formula() -> None:
    model, inputs = ConvChain().eval(), torch.randn(1, 3, 8, 8)
    pruned, change = prune_structured(model, ratio=0.5, example_inputs=inputs)
    c1, c2 = 4, 8  # half of 8 and 16 channels
    convs = 8 * 8 * (3 * 9 * c1 + c1 * 9 * c2)
    assert count(pruned, inputs).ops["aten.convolution"]["macs"] == convs
    assert change.after.params == (3 * 9 * c1 + c1) + 2 * c1 + (c1 * 9 * c2 + c2) + 2 * c2 + \
        (c2 * 10 + 10)


def test_width_pruning_shrinks_the_residual_stream_and_round_trips(tmp_path: Path) -> None:
    for model in (tiny_llama(), tiny_gpt2()):
        inputs = text_inputs()
        pruned, change = prune_structured(model, ratio=0.25, units="width", example_inputs=inputs)
        (group,) = change.details["groups"].values()
        assert (group["before"], group["after"], group["exact"]) == (32, 24, False)
        emb, head = pruned.get_input_embeddings().weight, pruned.get_output_embeddings().weight
        assert tuple(emb.shape) == tuple(head.shape) == (100, 24)
        assert (emb is head) == bool(model.config.tie_word_embeddings)
        loaded = roundtrip(pruned, tmp_path)
        assert torch.equal(run(loaded, inputs), run(pruned, inputs))


def test_bert_heads_keep_the_config_and_record_the_sizes(tmp_path: Path) -> None:
    model, inputs = tiny_bert(), text_inputs()
    pruned, change = prune_structured(model, ratio=0.25, units=["heads", "neurons"],
                                      example_inputs=inputs)
    # BertConfig cannot express "3 heads of 8 in a 32-wide model": only the MLP size moves
    assert change.details["config"] == {"": {"intermediate_size": [FF, 36]}}
    assert pruned.config.num_attention_heads == 4
    attention = pruned.encoder.layer[0].attention.self
    assert attention.query.out_features == 24 and attention.num_attention_heads == 3
    loaded = roundtrip(pruned, tmp_path)
    assert loaded.encoder.layer[1].attention.self.query.weight.shape == (24, 32)
    assert torch.equal(run(loaded, inputs), run(pruned, inputs))


def test_experts_are_removed_with_their_router_rows(tmp_path: Path) -> None:
    model, inputs = tiny_mixtral(), text_inputs()
    pruned, _ = prune_structured(model, ratio=0.5, units="experts", example_inputs=inputs)
    moe = pruned.model.layers[0].mlp
    assert moe.gate.weight.shape == (2, 32) and moe.experts.gate_up_proj.shape[0] == 2
    assert moe.gate.num_experts == moe.experts.num_experts == 2
    loaded = roundtrip(pruned, tmp_path)
    assert torch.equal(run(loaded, inputs), run(pruned, inputs))


# --------------------------------------------------------------------------- importance
class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def removed_units(change: Any) -> list[int]:
    (units,) = change.details["removed"].values()
    return units


def test_magnitude_cuts_the_smallest_neuron_first() -> None:
    model = Chain().eval()
    with torch.no_grad():
        model.fc1.weight[5] *= 1e-3
        model.fc2.weight[:, 5] *= 1e-3
    for importance in ("l1", "l2"):
        _, change = prune_structured(model, ratio=0.125, units="neurons", importance=importance,
                                     example_inputs=torch.randn(4, 6))
        assert removed_units(change) == [5]


def test_bn_importance_reads_the_norm_scale() -> None:
    model = ConvChain().eval()
    with torch.no_grad():
        model.bn1.weight.fill_(1.0)
        model.bn1.weight[3] = 1e-4
    _, change = prune_structured(model, ratio=0.125, importance="bn", units="channels",
                                 per_layer={"*conv2*": 0}, example_inputs=torch.randn(1, 3, 8, 8))
    assert change.details["removed"] == {"channels conv1": [3]}


def test_taylor_scores_a_neuron_nobody_reads_as_zero() -> None:
    model = Chain().eval()
    with torch.no_grad():
        model.fc2.weight[:, 2] = 0  # neuron 2 never reaches the output
    calibration = [(torch.randn(5, 6),) for _ in range(2)]
    _, change = prune_structured(model, ratio=0.125, units="neurons", importance="taylor",
                                 calibration=calibration)
    assert removed_units(change) == [2]


def test_random_importance_is_seeded() -> None:
    model, x = Chain().eval(), torch.randn(4, 6)
    picks = [removed_units(prune_structured(model, ratio=0.5, units="neurons",
                                            importance="random", seed=s, example_inputs=x)[1])
             for s in (0, 0, 1)]
    assert picks[0] == picks[1] != picks[2]


# --------------------------------------------------------------------------- strategy
def test_round_to_keeps_multiples_and_max_ratio_caps() -> None:
    model, inputs = tiny_llama(layers=1), text_inputs()
    _, change = prune_structured(model, ratio=0.3, units="neurons", round_to=8,
                                 example_inputs=inputs)
    assert [g["after"] for g in change.details["groups"].values()] == [40]  # 48 * 0.7 -> 40
    _, change = prune_structured(model, ratio=0.95, units="neurons", max_ratio=0.5,
                                 example_inputs=inputs)
    assert [g["after"] for g in change.details["groups"].values()] == [24]


def test_global_ranking_spends_one_budget_across_layers() -> None:
    model, inputs = tiny_bert(), text_inputs()
    with torch.no_grad():  # layer 1's neurons are much smaller: global ranking takes them
        model.encoder.layer[1].intermediate.dense.weight.mul_(0.01)
        model.encoder.layer[1].output.dense.weight.mul_(0.01)
    _, change = prune_structured(model, ratio=0.25, units="neurons", global_ranking=True,
                                 example_inputs=inputs)
    after = {name: g["after"] for name, g in change.details["groups"].items()}
    assert sum(FF - a for a in after.values()) == int(0.25 * 2 * FF)
    assert after.get("neurons encoder.layer.1.intermediate.dense", FF) < \
        after.get("neurons encoder.layer.0.intermediate.dense", FF)


def test_per_layer_overrides_and_exclude() -> None:
    model, inputs = tiny_bert(), text_inputs()
    _, change = prune_structured(model, ratio=0.5, units=["heads", "neurons"],
                                 per_layer={"*layer.0*": 0}, exclude=["*layer.1.intermediate*"],
                                 example_inputs=inputs)
    assert list(change.details["groups"]) == ["heads encoder.layer.1.attention.self"]
    assert "would resize excluded module encoder.layer.1.intermediate.dense" in \
        change.skipped["neurons encoder.layer.1.intermediate.dense"]
    assert change.params["exclude"] == ["*layer.1.intermediate*"]
    # the old name still works for a release, warns with the new one, and gives the same cut
    with pytest.warns(DeprecationWarning, match=r"ignore= is now called exclude="):
        _, old = prune_structured(model, ratio=0.5, units=["heads", "neurons"],
                                  per_layer={"*layer.0*": 0}, ignore="*layer.1.intermediate*",
                                  example_inputs=inputs)
    assert old.to_dict() == change.to_dict()
    with pytest.raises(LeanError, match=r"both exclude=.* and its old name ignore="):
        prune_structured(model, exclude=["a"], ignore=["b"], example_inputs=inputs)


def test_bad_arguments_are_explained() -> None:
    model, x = Chain().eval(), torch.randn(2, 6)
    with pytest.raises(LeanError, match=r"prune.structured: ratio=1.0; expected a number in \[0, 1\)"):
        prune_structured(model, ratio=1.0, example_inputs=x)
    with pytest.raises(LeanError, match="units must be among"):
        prune_structured(model, units="filters", example_inputs=x)
    with pytest.raises(LeanError, match=r"taylor.*calibration"):
        prune_structured(model, importance="taylor", example_inputs=x)
    with pytest.raises(LeanError, match="needs example_inputs"):
        prune_structured(model)
    with pytest.raises(LeanError, match="round_to"):
        prune_structured(model, round_to=0, example_inputs=x)


def test_transforms_are_registered() -> None:
    assert get_transform("prune.structured") is prune_structured
    assert get_transform("prune.sublayers") is prune_sublayers


# --------------------------------------------------------------------------- sublayers
def test_a_sublayer_that_outputs_zero_scores_zero_and_goes_first(tmp_path: Path) -> None:
    model = tiny_llama(layers=3)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.zero_()
    calibration = [text_inputs()]
    pruned, change = prune_sublayers(model, count=2, calibration=calibration)
    first, second = change.details["order"]
    assert first["path"] == "model.layers.1.mlp" and first["distance"] < 1e-12
    assert second["distance"] > 0
    layer = pruned.model.layers[1]
    assert type(layer.mlp).__name__ == "ZeroBranch"
    assert isinstance(layer.post_attention_layernorm, nn.Identity)
    # removing a zero branch changes nothing
    once, _ = prune_sublayers(model, count=1, calibration=calibration)
    torch.testing.assert_close(run(once, calibration[0]), run(model, calibration[0]),
                               atol=1e-6, rtol=0)
    assert change.after.flops is None or change.after.flops < change.before.flops
    loaded = roundtrip(pruned, tmp_path)
    assert torch.equal(run(loaded, calibration[0]), run(pruned, calibration[0]))
    with pytest.raises(LeanError, match="only 6 removable sublayers"):
        prune_sublayers(model, count=7, calibration=calibration)
    with pytest.raises(LeanError, match="calibration"):
        prune_sublayers(model, count=1)
    # include / exclude are globs over the sublayer paths, as in every transform: with the
    # zeroed MLP excluded, another sublayer goes first
    _, picked = prune_sublayers(model, count=1, calibration=calibration,
                                include="model.layers.*.mlp", exclude=["model.layers.1.*"])
    assert picked.details["candidates"] == ["model.layers.0.mlp", "model.layers.2.mlp"]
    assert picked.replaced[0] in picked.details["candidates"]


# --------------------------------------------------------------------------- recipes
def test_the_iterative_recipe_prunes_distils_and_prunes_again(tmp_path: Path) -> None:
    from leantorch.compress.recipe import Recipe, load_recipe, run_recipe

    spec = load_recipe("prune-50").to_dict()
    for step in spec["steps"]:
        if step.get("finetune"):
            step["finetune"]["steps"] = 2
    spec["finetune"]["steps"], spec["gates"] = 2, []
    model, batches = tiny_llama(layers=1), [text_inputs()]
    result = run_recipe(Recipe.from_dict(spec), model, calibration=batches, evaluation=batches,
                        example_inputs=batches[0], latency_runs=0)
    # 48 neurons: 30% cut keeps 33, rounded up to 40; then 28, rounded up to 32
    assert result.model.model.layers[0].mlp.gate_proj.out_features == 32
    assert [c.transform for c in result.changes] == ["prune.structured"] * 2
    assert model.model.layers[0].mlp.gate_proj.out_features == FF  # the caller's model
    loaded = roundtrip(result.model, tmp_path)  # two recorded cuts replay in order
    assert torch.equal(run(loaded, batches[0]), run(result.model, batches[0]))


def test_removing_a_head_equals_zeroing_its_output_projection_columns() -> None:
    model, inputs = tiny_bert(), text_inputs()
    pruned, change = prune_structured(model, ratio=0.25, units="heads", example_inputs=inputs)
    graph = build_graph(model, inputs)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, units in change.details["removed"].items():
            for t in graph.group(name).tensors:
                if t.role == "in":  # only the output projection's columns
                    weight = reference.get_parameter(t.tensor)
                    weight.index_fill_(t.dim, t.indices(units), 0)
    torch.testing.assert_close(run(pruned, inputs), run(reference, inputs), atol=1e-5, rtol=1e-5)
