"""Lottery tickets: rewinding is bit-exact, masks nest and keep the right fraction, a tiny
run on scikit-learn's digits goes through every step."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from leantorch.compress.prune.lottery import (
    find_ticket,
    prune_round,
    reinitialized_state,
    rewind,
    snapshot,
)
from leantorch.compress.prune.masks import get_mask, prune_magnitude
from leantorch.errors import LeanError

PATHS = ("0", "2", "4")


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(),
                         nn.Linear(24, 4))


def sgd_train(data: tuple[torch.Tensor, torch.Tensor], lr: float = 0.1):
    x, y = data

    def train(model: nn.Module, steps: range) -> None:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        for _ in steps:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

    return train


def toy_data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 16)
    return x, (x[:, :4].argmax(1))


def test_rewinding_restores_the_initial_weights_bit_exactly() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3))
    theta0 = snapshot(model)
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    prune_round(model, 0.5, scope="layer")
    assert not torch.equal(model[0].parametrizations.weight.original, theta0["0.weight"])
    rewind(model, theta0)
    for name, tensor in snapshot(model).items():
        assert tensor.dtype == theta0[name].dtype and torch.equal(tensor, theta0[name]), name
    mask = get_mask(model[4])
    assert torch.equal(model[4].weight, torch.where(mask, theta0["4.weight"], 0.0))
    assert torch.equal(model[1].running_mean, theta0["1.running_mean"])


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_masks_after_r_rounds_keep_the_right_fraction_and_nest(scope: str) -> None:
    model, rate = mlp(), 0.2
    sizes = {p: model.get_submodule(p).weight.numel() for p in PATHS}
    expected = dict(sizes)
    total = sum(sizes.values())
    previous = None
    for r in range(1, 6):
        stats = prune_round(model, rate, scope=scope)
        masks = {p: get_mask(model.get_submodule(p)).clone() for p in PATHS}
        if scope == "layer":
            for p in PATHS:
                expected[p] -= round(rate * expected[p])
                assert stats[p]["kept"] == expected[p]
        else:
            kept_before = total if previous is None else sum(int(m.sum())
                                                             for m in previous.values())
            assert stats["total"]["kept"] == kept_before - round(rate * kept_before)
        assert abs(stats["total"]["kept"] / total - (1 - rate) ** r) < r / 100
        if previous is not None:
            assert all(not (masks[p] & ~previous[p]).any() for p in PATHS)
        previous = masks


def test_layer_rates_override_by_glob() -> None:
    model = mlp()
    stats = prune_round(model, 0.2, scope="layer", layer_rates={"4": 0.1})
    assert stats["4"]["kept"] == 96 - round(0.1 * 96)
    assert stats["0"]["kept"] == 512 - round(0.2 * 512)
    with pytest.raises(LeanError, match="layer_rates apply to scope='layer'"):
        prune_round(model, 0.2, scope="global", layer_rates={"4": 0.1})


def test_reinitialized_state_is_a_fresh_draw_from_the_same_init() -> None:
    model, _ = prune_magnitude(mlp(), ratio=0.5)
    theta0 = snapshot(model)
    a, b = reinitialized_state(model, seed=1), reinitialized_state(model, seed=1)
    c = reinitialized_state(model, seed=2)
    assert set(a) == set(theta0)
    assert all(torch.equal(a[k], b[k]) for k in a)  # deterministic in the seed
    assert not torch.equal(a["0.weight"], c["0.weight"])
    assert not torch.equal(a["0.weight"], theta0["0.weight"])
    bound = 1 / 16**0.5  # nn.Linear's default init: U(-1/sqrt(in), 1/sqrt(in))
    assert a["0.weight"].abs().max() <= bound
    mask = get_mask(model[0]).clone()
    rewind(model, a)
    assert torch.equal(get_mask(model[0]), mask) and torch.all(model[0].weight[~mask] == 0)


def test_rewind_to_step_k_restarts_every_round_from_the_step_k_weights() -> None:
    starts: list[tuple[range, torch.Tensor]] = []

    def train(model: nn.Module, steps: range) -> None:
        starts.append((steps, model[0].parametrizations.weight.original.clone()
                       if hasattr(model[0], "parametrizations") else model[0].weight.clone()))
        with torch.no_grad():
            for _ in steps:  # a deterministic "training" step: +1 on every weight
                for p in model.parameters():
                    p.add_(1.0)

    def after(weight: torch.Tensor, k: int) -> torch.Tensor:  # the same k additions
        for _ in range(k):
            weight = weight + 1.0
        return weight

    model = mlp()
    w0 = model[0].weight.detach().clone()
    result = find_ticket(model, train, steps=5, rounds=2, rate=0.5, rewind_step=2)
    assert [s for s, _ in starts] == [range(0, 2), range(2, 5), range(2, 5), range(2, 5)]
    for _, weight in starts[1:]:
        assert torch.equal(weight, after(w0, 2))  # every round starts from the step-2 weights
    assert torch.equal(result.rewind_state["0.weight"], after(w0, 2))
    final = result.model[0]
    mask = get_mask(final)
    assert torch.equal(final.weight, torch.where(mask, after(w0, 5), 0.0))
    assert [r.round for r in result.history] == [0, 1, 2]
    assert torch.equal(model[0].weight, w0)  # the caller's model is untouched


def test_tiny_digits_run() -> None:
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.data[:400], dtype=torch.float32) / 16
    y = torch.tensor(digits.target[:400])
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def accuracy(m: nn.Module) -> float:
        with torch.no_grad():
            return (m(x[300:]).argmax(1) == y[300:]).float().mean().item()

    result = find_ticket(model, sgd_train((x[:300], y[:300]), lr=0.2), steps=40, rounds=2,
                         rate=0.5, scope="layer", layer_rates={"2": 0.25}, evaluate=accuracy,
                         control_seed=0)
    kept = [r.kept for r in result.history]
    assert kept[0] == 64 * 32 + 32 * 10
    assert kept[1] == 1024 + 240 and kept[2] == 512 + 180
    assert all(r.metrics > 0.5 for r in result.history)  # it learns (chance is 0.1)
    assert result.history[0].control_metrics is None
    assert all(isinstance(r.control_metrics, float) for r in result.history[1:])
    mask = get_mask(result.model[0])
    assert torch.all(result.model[0].weight[~mask] == 0)


def test_bad_arguments() -> None:
    train = sgd_train(toy_data())
    with pytest.raises(LeanError, match="rewind_step must be < steps"):
        find_ticket(mlp(), train, steps=3, rounds=1, rewind_step=3)
    with pytest.raises(LeanError, match="find_ticket: rounds=-1; expected an int >= 0"):
        find_ticket(mlp(), train, steps=3, rounds=-1)
    masked, _ = prune_magnitude(mlp(), ratio=0.5)
    with pytest.raises(LeanError, match="already carries masks"):
        find_ticket(masked, train, steps=3, rounds=1)
    with pytest.raises(LeanError, match="state does not match"):
        rewind(mlp(), {"0.weight": torch.zeros(32, 16)})
