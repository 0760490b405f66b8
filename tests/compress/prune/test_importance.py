"""The one first-order Taylor saliency, checked against its definition from autograd in float64:
score = sum over calibration batches of (sum over the unit of w * dL_b/dw)^2, for a neuron of
structured pruning and a tile of block pruning alike; and the one loss_fn(output, batch)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from leantorch.compress.graph import build_graph
from leantorch.compress.prune import prune_block
from leantorch.compress.prune.importance import check_loss_fn, score_groups, taylor_saliency
from leantorch.compress.prune.masks import get_mask
from leantorch.errors import LeanError, LeanTypeError


def loss_fn(output: torch.Tensor, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return (output * batch[1]).sum()  # the batch's second item is a target weighting


def batches(n_in: int, n_out: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(3, n_in, generator=g), torch.randn(3, n_out, generator=g))
            for _ in range(3)]


def products(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """``w * dL/dw`` in float64 for every parameter, from autograd on a float64 copy."""
    double = model.double()
    double.zero_grad()
    loss = loss_fn(double(batch[0].double()), tuple(t.double() for t in batch))
    loss.backward()
    out = {n: (p.detach() * p.grad).clone() for n, p in double.named_parameters()}
    model.float()
    return out


class Pair(nn.Module):
    """Calls the model on the batch's first item only (the second is the loss's target)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner(x)


def test_block_tiles_rank_by_the_definition() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    data = batches(8, 8)
    expected = torch.zeros(2, 2, dtype=torch.float64)
    for batch in data:
        p = products(layer, batch)["weight"]
        expected += p.reshape(2, 4, 2, 4).sum(dim=(1, 3)) ** 2
    model = Pair(layer)
    pruned, _ = prune_block(model, ratio=0.5, block_size=4, importance="taylor",
                            calibration=data, loss_fn=loss_fn)
    alive = get_mask(pruned.inner).reshape(2, 4, 2, 4).any(3).any(1)
    top = expected.flatten().argsort(descending=True)[:2]
    want = torch.zeros(4, dtype=torch.bool)
    want[top] = True
    assert torch.equal(alive.flatten(), want), (expected, alive)


def test_structured_neuron_scores_equal_the_definition() -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    data = batches(6, 4)
    expected = torch.zeros(5, dtype=torch.float64)
    for batch in data:
        p = products(mlp, batch)
        # a neuron occupies a row of fc1's weight, its bias entry and a column of fc2's weight
        expected += (p["0.weight"].sum(1) + p["0.bias"] + p["2.weight"].sum(0)) ** 2
    model = Pair(mlp)
    graph = build_graph(model, data[0])
    groups = graph.groups(prunable=True, kind="neurons")
    assert len(groups) == 1
    scores, _ = score_groups(model, graph, groups, "taylor", calibration=data, loss_fn=loss_fn)
    torch.testing.assert_close(scores[groups[0].id], expected, rtol=1e-4, atol=1e-9)


def test_taylor_saliency_restores_the_model_and_checks_its_inputs() -> None:
    layer = nn.Linear(4, 2)
    layer.bias.requires_grad_(False)
    layer.train()
    data = [(torch.randn(2, 4),)]
    scores = taylor_saliency(layer, {"w": layer.weight}, data,
                             lambda p: {"rows": p["w"].sum(1)})
    assert scores["rows"].shape == (2,) and scores["rows"].dtype == torch.float64
    assert layer.weight.grad is None and layer.training
    assert layer.weight.requires_grad and not layer.bias.requires_grad
    with pytest.raises(LeanError, match="needs calibration data"):
        taylor_saliency(layer, {"w": layer.weight}, [], lambda p: {})
    with pytest.raises(LeanError, match=r"the loss is .*expected a scalar tensor"):
        taylor_saliency(layer, {"w": layer.weight}, data, lambda p: {},
                        loss_fn=lambda out, batch: out)


def test_one_loss_fn_signature() -> None:
    def two(output, batch):
        return output.sum()

    def flexible(*args):
        return args[0].sum()

    def with_default(output, batch, scale=1.0):
        return output.sum() * scale

    for fn in (two, flexible, with_default, None):
        assert check_loss_fn("owner", fn) is fn
    with pytest.raises(LeanError, match=r"owner: loss_fn\(output\) cannot be called as "
                                        r"loss_fn\(output, batch\)"):
        check_loss_fn("owner", lambda output: output.sum())
    with pytest.raises(LeanError, match=r"loss_fn\(a, b, c\) cannot be called"):
        check_loss_fn("owner", lambda a, b, c: a)
    with pytest.raises(LeanTypeError, match="owner: loss_fn='mse'; expected a callable"):
        check_loss_fn("owner", "mse")
