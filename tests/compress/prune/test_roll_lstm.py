"""Graph coverage for ``aten.roll`` (Swin's shifted windows) and ``nn.LSTM`` (issue 11.5): what
each couples, and the pruned model equals the masked one."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import leantorch
from leantorch.compress.graph import build_graph
from leantorch.compress.prune import mask_units, prune_structured


def masked(model: nn.Module, inputs: Any, removed: dict[str, list[int]]) -> nn.Module:
    graph = build_graph(model, inputs)
    return mask_units(copy.deepcopy(model), graph,
                      {graph.group(name).id: units for name, units in removed.items()})


def run(model: nn.Module, inputs: Any, training: bool = False) -> torch.Tensor:
    model.train(training)
    try:
        with torch.no_grad():
            out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    finally:
        model.eval()
    return getattr(out, "last_hidden_state", out)


# --------------------------------------------------------------------------- roll
class Rolled(nn.Module):
    """Convs with a cyclic shift in between: along the spatial axes (``dims=(2, 3)``) or along
    the channels (``dims=1``)."""

    def __init__(self, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.dims = dims
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        shifts = tuple(1 for _ in self.dims)
        return self.conv2(torch.roll(h, shifts=shifts, dims=self.dims))


def test_roll_along_spatial_axes_leaves_channels_prunable_and_exact() -> None:
    model, x = Rolled((2, 3)).eval(), torch.randn(2, 3, 6, 6)
    graph = build_graph(model, x)
    channels = graph.groups_of("conv1.bias")[0]
    assert channels.prunable and channels.exact
    assert {(t.tensor, t.dim) for t in channels.tensors} == {
        ("conv1.weight", 0), ("conv1.bias", 0), ("conv2.weight", 1)}
    pruned, change = prune_structured(model, ratio=0.5, units="channels", example_inputs=x)
    assert pruned.conv1.out_channels == 4
    torch.testing.assert_close(run(pruned, x), run(masked(model, x, change.details["removed"]),
                                                   x))


def test_roll_along_the_channels_fixes_them_with_the_reason() -> None:
    graph = build_graph(Rolled((1,)).eval(), torch.randn(2, 3, 6, 6))
    channels = graph.groups_of("conv1.bias")[0]
    assert not channels.prunable
    assert channels.reasons == ["aten.roll in (model): rolled along this dimension (the shift "
                                "depends on its length)"]


@pytest.mark.slow
def test_swin_with_shifted_windows_prunes_heads_and_neurons_and_equals_masked() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2],
                                     num_heads=[1, 2], window_size=2)
    model, x = transformers.SwinModel(config).eval(), torch.randn(2, 3, 32, 32)
    graph = build_graph(model, x)
    # the second block of each stage is shifted: its attention rolls the spatial axes
    assert any(str(n.target) == "aten.roll.default" for n in graph.program.graph.nodes)
    assert "not understood" not in graph.describe()
    pruned, change = prune_structured(model, ratio=0.5, units=["heads", "neurons"],
                                      example_inputs=x)
    groups = change.details["groups"]
    assert groups["heads encoder.layers.1.blocks.1.attention"]["after"] == 1
    assert groups["neurons encoder.layers.0.blocks.1.mlp.fc1"] == {
        "kind": "neurons", "before": 64, "after": 32, "exact": True}
    assert change.after.params < change.before.params
    reference = masked(model, x, change.details["removed"])
    torch.testing.assert_close(run(pruned, x), run(reference, x), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- LSTM
class Recurrent(nn.Module):
    """Linear -> LSTM -> Linear, reading the sequence output and the last hidden state."""

    def __init__(self, bidirectional: bool = True, layers: int = 2, bias: bool = True) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.lstm = nn.LSTM(6, 5, num_layers=layers, batch_first=True, bias=bias,
                            bidirectional=bidirectional)
        self.out = nn.Linear(10 if bidirectional else 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, (h, _c) = self.lstm(torch.relu(self.inp(x)))
        return self.out(y) + h.sum(0).sum(-1)[:, None, None]


def test_lstm_hidden_size_couples_gates_layers_directions_and_the_consumer() -> None:
    graph = build_graph(Recurrent().eval(), torch.randn(2, 7, 4))
    hidden = graph.groups_of("lstm.weight_hh_l0")
    gates = [g for g in hidden if g.kind == "gates"]
    (units,) = [g for g in hidden if g.kind == "neurons"]
    assert len(gates) == 1 and not gates[0].prunable and gates[0].size == 4
    assert units.prunable and units.exact and units.size == 5 and units.name == "neurons lstm"
    cut = {(t.tensor, t.dim): t.indices([2]).tolist() for t in units.tensors}
    for name in ("weight_ih_l0", "weight_hh_l1_reverse", "bias_ih_l1", "bias_hh_l0_reverse"):
        assert cut[(f"lstm.{name}", 0)] == [2, 7, 12, 17]  # unit 2 in each of the four gates
    assert cut[("lstm.weight_hh_l0", 1)] == [2]
    assert cut[("lstm.weight_ih_l1", 1)] == [2, 7]  # both directions of the layer below
    assert cut[("out.weight", 1)] == [2, 7]
    assert ("lstm.weight_ih_l0", 1) not in cut
    # the input features: the producer's rows with the first layer's columns
    (inputs,) = graph.groups_of("inp.bias")
    assert {(t.tensor, t.dim) for t in inputs.tensors} == {
        ("inp.weight", 0), ("inp.bias", 0), ("lstm.weight_ih_l0", 1),
        ("lstm.weight_ih_l0_reverse", 1)}


@pytest.mark.parametrize("bidirectional, layers, bias", [(True, 2, True), (False, 1, False)])
def test_pruned_lstm_equals_masked_in_both_modes_and_round_trips(
        bidirectional: bool, layers: int, bias: bool, tmp_path: Path) -> None:
    model, x = Recurrent(bidirectional, layers, bias).eval(), torch.randn(2, 7, 4)
    pruned, change = prune_structured(model, ratio=0.4, units="neurons", example_inputs=x)
    assert set(change.details["removed"]) == {"neurons inp", "neurons lstm"}
    assert (pruned.lstm.input_size, pruned.lstm.hidden_size) == (3, 3)
    assert pruned.lstm.weight_ih_l0.shape == (12, 3)
    reference = masked(model, x, change.details["removed"])
    for training in (False, True):
        torch.testing.assert_close(run(pruned, x, training), run(reference, x, training),
                                   atol=1e-6, rtol=1e-6)
    loaded = leantorch.load(leantorch.save(pruned, tmp_path / "lstm.safetensors"),
                            model=Recurrent(bidirectional, layers, bias))
    assert torch.equal(run(loaded, x), run(pruned, x))


class GivenState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.lstm, self.out = nn.Linear(4, 6), nn.LSTM(6, 5), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
        return self.out(self.lstm(self.inp(x), (h0, c0))[0])


def test_lstm_fed_its_initial_state_keeps_its_hidden_size_while_its_input_prunes() -> None:
    model = GivenState().eval()
    inputs = (torch.randn(7, 2, 4), torch.randn(1, 2, 5), torch.randn(1, 2, 5))
    graph = build_graph(model, inputs)
    (hidden,) = [g for g in graph.groups_of("lstm.weight_hh_l0") if g.kind == "neurons"]
    assert not hidden.prunable and any("model input h0" in r for r in hidden.reasons)
    pruned, change = prune_structured(model, ratio=0.5, units="neurons", example_inputs=inputs)
    assert set(change.details["removed"]) == {"neurons inp"}
    assert (pruned.lstm.input_size, pruned.lstm.hidden_size) == (3, 5)
    reference = masked(model, inputs, change.details["removed"])
    with torch.no_grad():
        torch.testing.assert_close(pruned(*inputs), reference(*inputs))
