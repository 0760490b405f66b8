"""Truncated-SVD factorisation: exact at full rank, error = discarded singular values."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import leantorch
from leantorch.compress.lowrank import (
    LowRankLinear,
    break_even_rank,
    choose_rank,
    factorize_linear,
    lowrank,
)
from leantorch.errors import LeanError


def linear64(n_in: int = 12, n_out: int = 10) -> nn.Linear:
    return nn.Linear(n_in, n_out).double()


def test_full_rank_reproduces_the_layer() -> None:
    layer = linear64()
    factored = factorize_linear(layer, rank=10)
    x = torch.randn(7, 12, dtype=torch.float64)
    torch.testing.assert_close(factored(x), layer(x), rtol=1e-12, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(rank=st.integers(1, 9), n_in=st.integers(10, 16), n_out=st.integers(10, 16))
def test_frobenius_error_equals_the_discarded_singular_values(rank, n_in, n_out) -> None:
    layer = nn.Linear(n_in, n_out).double()
    s = torch.linalg.svdvals(layer.weight)
    factored = factorize_linear(layer, rank)
    error = torch.linalg.matrix_norm(layer.weight - factored.weight()) ** 2
    torch.testing.assert_close(error, (s[rank:] ** 2).sum(), rtol=1e-9, atol=1e-12)


def test_rank_choice() -> None:
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert choose_rank(s, 8, 8, energy=16 / 22) == 1
    assert choose_rank(s, 8, 8, energy=0.75) == 2
    assert choose_rank(s, 8, 8, energy=1.0) == 4
    assert choose_rank(s, 8, 8, rank=99) == 8  # capped at full rank
    assert choose_rank(s, 100, 50, param_ratio=0.5) == 16  # 16 * 150 <= 2500 < 17 * 150
    with pytest.raises(LeanError, match="exactly one of rank, energy, param_ratio"):
        choose_rank(s, 8, 8, rank=2, energy=0.5)
    with pytest.raises(LeanError, match=r"lowrank.svd: energy=1.5; expected a number in \(0, 1\]"):
        choose_rank(s, 8, 8, energy=1.5)
    with pytest.raises(LeanError, match=r"lowrank\.svd: rank=0; expected an int >= 1"):
        choose_rank(s, 8, 8, rank=0)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8), nn.Linear(8, 8))


def test_transform_skips_layers_that_would_grow_and_keeps_the_caller_model() -> None:
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new, change = lowrank(model, rank=4, example_inputs=torch.randn(3, 64))
    assert change.replaced == ["0", "2"]
    assert "3" in change.skipped  # 8x8 at rank 4 needs 64 weights: not fewer
    assert isinstance(new[0], LowRankLinear) and new[0].rank == 4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # params and MACs follow r * (in + out)
    assert change.before.params - change.after.params == (64 * 64 - 4 * 128) + (64 * 8 - 4 * 72)
    assert change.before.macs - change.after.macs == 3 * ((64 * 64 - 4 * 128) + (64 * 8 - 4 * 72))
    assert change.details["0"]["rank"] == 4 and 0 < change.details["0"]["energy_kept"] < 1
    assert break_even_rank(8, 8) == 3


def test_activation_aware_beats_plain_svd_on_the_calibration_inputs() -> None:
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(32, 32)).double()
    # inputs that live mostly in a few directions, as real activations do
    basis = torch.randn(4, 32, dtype=torch.float64)
    batches = [(torch.randn(64, 4, dtype=torch.float64) @ basis
                + 0.01 * torch.randn(64, 32, dtype=torch.float64),) for _ in range(4)]
    plain, _ = lowrank(layer, rank=4)
    aware, _ = lowrank(layer, rank=4, activation_aware=True, calibration=batches)
    x = torch.cat([b[0] for b in batches])
    target = layer(x)
    plain_error = (plain(x) - target).norm()
    aware_error = (aware(x) - target).norm()
    assert aware_error < 0.1 * plain_error
    with pytest.raises(LeanError, match="needs calibration data"):
        lowrank(layer, rank=4, activation_aware=True)


def test_factored_models_roundtrip(tmp_path) -> None:
    new, _ = lowrank(mlp(), param_ratio=0.5)
    path = leantorch.save(new, tmp_path / "lr.safetensors")
    loaded = leantorch.load(path)
    x = torch.randn(2, 64)
    assert isinstance(loaded[0], LowRankLinear)
    assert torch.equal(loaded(x), new(x))
