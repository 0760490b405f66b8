"""Unstructured magnitude pruning with persistent masks: exact counts, masks that survive
optimiser steps, make_permanent, save/load, the transform contract."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

import leantorch
from leantorch.compress.prune.masks import (
    WeightMask,
    get_mask,
    lowest_k,
    make_permanent,
    mask_stats,
    prune_magnitude,
    prune_scores,
    set_mask,
)
from leantorch.compress.registry import get_transform
from leantorch.errors import LeanError, LeanTypeError
from tests.conftest import count


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 16), nn.ReLU(),
                         nn.Linear(16, 5))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 4))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def zeros(weight: torch.Tensor) -> int:
    return int((weight == 0).sum())


# --------------------------------------------------------------------------- exact counts
@settings(max_examples=30, deadline=None)
@given(ratio=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_layerwise_ratio_is_exact_in_every_layer(ratio: float, seed: int) -> None:
    torch.manual_seed(seed)
    model = mlp()
    pruned, _ = prune_magnitude(model, ratio=ratio, scope="layer")
    for path in ("0", "2", "4"):
        weight = pruned.get_submodule(path).weight
        assert zeros(weight) == round(ratio * weight.numel()), path


@settings(max_examples=30, deadline=None)
@given(ratio=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_global_ratio_is_exact_over_all_layers(ratio: float, seed: int) -> None:
    torch.manual_seed(seed)
    model = cnn()
    pruned, _ = prune_magnitude(model, ratio=ratio, scope="global")
    weights = [m.weight for m in pruned.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    total = sum(w.numel() for w in weights)
    assert sum(zeros(w) for w in weights) == round(ratio * total)


def test_global_keeps_the_largest_magnitudes_everywhere() -> None:
    model = mlp()
    pruned, _ = prune_magnitude(model, ratio=0.6, scope="global")
    kept, gone = [], []
    for path in ("0", "2", "4"):
        original, mask = model.get_submodule(path), get_mask(pruned.get_submodule(path))
        kept.append(original.weight[mask].abs())
        gone.append(original.weight[~mask].abs())
    assert torch.cat(gone).max() <= torch.cat(kept).min()


def test_ties_are_broken_by_position_deterministically() -> None:
    scores = torch.tensor([1.0, 0.5, 0.5, 0.5, 2.0, 0.5])
    assert lowest_k(scores, 2).tolist() == [False, True, True, False, False, False]
    assert lowest_k(scores, 0).sum() == 0 and lowest_k(scores, 6).all()
    layers = {"a": torch.ones(3), "b": torch.ones(3)}
    masks = prune_scores(layers, 0.5, "global")  # 3 of 6 equal scores: the first three go
    assert masks["a"].tolist() == [False] * 3 and masks["b"].tolist() == [True] * 3


def test_ratio_zero_is_the_identity() -> None:
    model = cnn()
    before = state(model)
    pruned, change = prune_magnitude(model, ratio=0.0)
    assert not any(parametrize.is_parametrized(m) for m in pruned.modules())
    assert change.replaced == []
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(model(x), pruned(x))
    assert all(torch.equal(before[k], v) for k, v in pruned.state_dict().items())


def test_callers_model_is_untouched() -> None:
    model = mlp()
    before = state(model)
    params = [id(p) for p in model.parameters()]
    pruned, _ = prune_magnitude(model, ratio=0.7, scope="global")
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert [id(p) for p in model.parameters()] == params
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert pruned is not model


def test_inplace_edits_the_model() -> None:
    model = mlp()
    pruned, _ = prune_magnitude(model, ratio=0.5, inplace=True)
    assert pruned is model and get_mask(model[0]) is not None


def test_repeated_pruning_nests_masks() -> None:
    once, _ = prune_magnitude(mlp(), ratio=0.3)
    twice, _ = prune_magnitude(once, ratio=0.6)
    for path in ("0", "2", "4"):
        first = get_mask(once.get_submodule(path))
        second = get_mask(twice.get_submodule(path))
        assert not (second & ~first).any()  # nothing revived
        assert int((~second).sum()) == round(0.6 * second.numel())
    # asking for less than already pruned keeps what is there
    same, _ = prune_magnitude(twice, ratio=0.1)
    assert torch.equal(get_mask(same[0]), get_mask(twice[0]))


# --------------------------------------------------------------------------- persistence
@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    lambda p: torch.optim.Adam(p, lr=0.05),
    lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
], ids=["sgd-momentum-wd", "sgd-nesterov", "adam", "adamw"])
def test_masked_weights_stay_zero_through_optimizer_steps(make_optimizer) -> None:
    model, _ = prune_magnitude(cnn(), ratio=0.6, scope="global")
    masks = {p: get_mask(m).clone() for p, m in model.named_modules() if get_mask(m) is not None}
    optimizer = make_optimizer(model.parameters())
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 4, (8,))
    first = model[0].weight.clone()
    for _ in range(5):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        grad = model[0].parametrizations.weight.original.grad
        assert torch.all(grad[~masks["0"]] == 0)  # no gradient reaches a pruned weight
        optimizer.step()
    assert not torch.equal(model[0].weight, first)  # it did train
    for path, mask in masks.items():
        weight = model.get_submodule(path).weight
        assert torch.all(weight[~mask] == 0), path
        assert torch.equal(get_mask(model.get_submodule(path)), mask)


def test_make_permanent_keeps_outputs_and_removes_the_parametrization() -> None:
    model, _ = prune_magnitude(cnn(), ratio=0.5, scope="global")
    x = torch.randn(3, 3, 6, 6)
    expected = model(x)
    baked, change = make_permanent(model)
    assert not any(parametrize.is_parametrized(m) for m in baked.modules())
    assert sorted(change.replaced) == ["0", "2", "4"]
    assert torch.equal(baked(x), expected)
    for path in ("0", "2", "4"):
        weight = baked.get_submodule(path).weight
        assert isinstance(weight, nn.Parameter)
        assert torch.equal(weight == 0, ~get_mask(model.get_submodule(path)))
    # the caller's masked model still works: the copy's parametrize class is its own
    assert all(parametrize.is_parametrized(model.get_submodule(p)) for p in ("0", "2", "4"))
    assert torch.equal(model(x), expected)
    assert torch.equal(model[0].weight == 0, ~get_mask(model[0]))


def test_masked_model_roundtrips_save_load_bit_exactly(tmp_path) -> None:
    model, _ = prune_magnitude(cnn(), ratio=0.7, scope="global")
    path = leantorch.save(model, tmp_path / "masked.safetensors")
    loaded = leantorch.load(path)
    assert isinstance(loaded[2].parametrizations.weight[0], WeightMask)
    a, b = model.state_dict(), loaded.state_dict()
    assert list(a) == list(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(model(x), loaded(x))


def test_change_reports_sparsity_and_costs() -> None:
    x = torch.randn(2, 12)
    _, change = prune_magnitude(mlp(), ratio=0.5, example_inputs=(x,))
    assert change.replaced == ["0", "2", "4"]
    assert change.details["sparsity"]["total"] == pytest.approx(0.5, abs=0.01)
    # a mask does not change what executes: a dense matmul on a weight with zeros
    assert change.before.macs == change.after.macs
    assert change.before.params == change.after.params


def test_masked_forward_is_counted_as_the_dense_matmul_it_runs() -> None:
    model, _ = prune_magnitude(nn.Linear(12, 20), ratio=0.5)
    report = count(model, torch.randn(4, 12))
    assert report.macs == 4 * 12 * 20


def test_registered_by_name_and_single_layer_models() -> None:
    transform = get_transform("prune.magnitude")
    layer, change = transform(nn.Linear(8, 8), ratio=0.25)
    assert change.replaced == [""]
    assert zeros(layer.weight) == 16
    assert get_transform("prune.make_permanent") is make_permanent


def test_tied_weights_are_skipped_with_a_reason() -> None:
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 10, bias=False))
    model[1].weight = model[0].weight
    with pytest.raises(LeanError, match="no Linear or Conv layer"):
        prune_magnitude(model, ratio=0.5)
    wider = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 6), nn.Linear(6, 10, bias=False))
    wider[2].weight = wider[0].weight
    _, change = prune_magnitude(wider, ratio=0.5)
    assert change.replaced == ["1"]
    assert "tied to 0.weight" in change.skipped["2"]


def test_bad_arguments_raise_errors_that_name_them() -> None:
    with pytest.raises(LeanError, match=r"prune.magnitude: ratio=1.5; expected a number in \[0, 1\]"):
        prune_magnitude(mlp(), ratio=1.5)
    with pytest.raises(LeanTypeError, match=r"prune.magnitude: ratio='half'; expected a number"):
        prune_magnitude(mlp(), ratio="half")
    with pytest.raises(LeanError, match="scope must be one of"):
        prune_magnitude(mlp(), ratio=0.5, scope="model")
    with pytest.raises(LeanError, match="no Linear or Conv layer matches"):
        prune_magnitude(mlp(), ratio=0.5, include="nothing.*")
    with pytest.raises(LeanError, match="mask shape"):
        set_mask(nn.Linear(3, 4), torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(LeanTypeError, match="bool tensor"):
        set_mask(nn.Linear(3, 4), torch.ones(4, 3))


def test_mask_stats_and_deepcopy() -> None:
    model, _ = prune_magnitude(mlp(), ratio=0.5)
    stats = mask_stats(model)
    assert stats["0"]["kept"] == 120 and stats["total"]["total"] == 12 * 20 + 20 * 16 + 16 * 5
    clone = copy.deepcopy(model)
    get_mask(clone[0]).fill_(False)
    assert get_mask(model[0]).sum() == 120  # the copy owns its mask
