"""Parameters the eval-mode forward never reads (issue 11.1) and sizes hard-coded in module code
(issue 11.4): training-only modules are traced and cut with the layer feeding them, tensors no
traced forward reads are left whole and reported, and a pruned model that no longer runs names
the module and the groups to leave alone."""

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
from leantorch.errors import LeanError


def masked(model: nn.Module, inputs: Any, removed: dict[str, list[int]]) -> nn.Module:
    """The reference: the original model with the cut slices zeroed."""
    graph = build_graph(model, inputs)
    return mask_units(copy.deepcopy(model), graph,
                      {graph.group(name).id: units for name, units in removed.items()})


def outputs(model: nn.Module, x: torch.Tensor, training: bool) -> tuple[torch.Tensor, ...]:
    model.train(training)
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        model.eval()
    return out if isinstance(out, tuple) else (out,)


class TrainingHead(nn.Module):
    """An MLP whose training forward also returns an auxiliary head on the hidden layer
    (``Linear(32, 1)``) and a projection of the output (``Linear(8, 8)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
        self.head = nn.Linear(32, 1)  # training only, fed by fc1
        self.fc3, self.fc4 = nn.Linear(8, 8), nn.Linear(8, 8)
        self.aux = nn.Linear(8, 8)  # training only, fed by fc3

    def forward(self, x: torch.Tensor) -> Any:
        h = torch.relu(self.fc1(x))
        g = torch.relu(self.fc3(self.fc2(h)))
        out = self.fc4(g)
        if self.training:
            return out, self.head(h), self.aux(g)
        return out


def test_training_only_modules_are_cut_with_the_layer_feeding_them(tmp_path: Path) -> None:
    model, x = TrainingHead().eval(), torch.randn(4, 8)
    graph = build_graph(model, x)
    assert graph.modes == ["eval", "train"] and graph.unseen == {}
    hidden = graph.groups_of("head.weight")
    assert [g.name for g in hidden] == ["neurons fc1"]
    assert {(t.tensor, t.dim) for t in hidden[0].tensors} >= {("fc1.weight", 0),
                                                               ("head.weight", 1)}
    # aux's output is a training-mode model output: fixed; its input is fc3's output
    assert not graph.groups_of("aux.bias")[0].prunable
    assert graph.groups_of("aux.bias")[0].reasons == ["reaches a model output (training mode)"]

    pruned, change = prune_structured(model, ratio=0.5, units="neurons", example_inputs=x)
    removed = change.details["removed"]
    assert set(removed) == {"neurons fc1", "neurons fc2", "neurons fc3"}
    kept = [i for i in range(32) if i not in removed["neurons fc1"]]
    # the head's columns are exactly the hidden units fc1 kept
    assert torch.equal(pruned.head.weight, model.head.weight[:, kept])
    assert torch.equal(pruned.head.bias, model.head.bias)
    # the square projection is cut consistently: columns only, its bias untouched
    assert tuple(pruned.aux.weight.shape) == (8, 4) and tuple(pruned.aux.bias.shape) == (8,)
    assert (pruned.aux.in_features, pruned.aux.out_features) == (4, 8)
    reference = masked(model, x, removed)
    for training in (False, True):
        for a, b in zip(outputs(pruned, x, training), outputs(reference, x, training),
                        strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    head = outputs(pruned, x, True)[1]
    assert head.abs().max() > 0.05  # a real signal, not a zeroed head
    loaded = leantorch.load(leantorch.save(pruned, tmp_path / "p.safetensors"),
                            model=TrainingHead())
    for a, b in zip(outputs(loaded, x, True), outputs(pruned, x, True), strict=True):
        assert torch.equal(a, b)


class DeadParts(nn.Module):
    """``dead`` is never called; ``part`` has its weight read through F.linear without its
    bias (a module only partly seen)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)
        self.dead = nn.Linear(8, 8)
        self.part = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(torch.relu(self.fc1(x)))
        return self.out(torch.nn.functional.linear(y, self.part.weight))


def test_a_parameter_no_forward_reads_is_left_whole_and_reported() -> None:
    model, x = DeadParts().eval(), torch.randn(5, 6)
    graph = build_graph(model, x)
    assert set(graph.unseen) == {"dead.weight", "dead.bias", "part.bias"}
    assert "dead.weight" not in graph.tensor_names()
    # part.weight is read but its bias is not: part is kept whole, and so is what it couples
    part = graph.groups_of("part.weight")
    assert part and not any(g.prunable for g in part)
    assert any("part.bias" in r and "kept whole" in r for g in part for r in g.reasons)
    pruned, change = prune_structured(model, ratio=0.5, units="neurons", example_inputs=x)
    assert change.details["removed"] == {"neurons fc1": change.details["removed"]["neurons fc1"]}
    assert "weight, bias left whole" in change.skipped["dead"]
    assert "neither the eval- nor the training-mode forward reads it" in change.skipped["dead"]
    assert change.skipped["part"].startswith("bias left whole")
    for name in ("dead.weight", "dead.bias", "part.weight", "part.bias", "fc2.weight"):
        path, _, attr = name.rpartition(".")
        if name != "fc2.weight":
            assert torch.equal(getattr(pruned.get_submodule(path), attr),
                               getattr(model.get_submodule(path), attr))
    assert pruned.fc2.weight.shape == (3, 4)
    reference = masked(model, x, change.details["removed"])
    torch.testing.assert_close(outputs(pruned, x, False)[0], outputs(reference, x, False)[0])


class UntraceableTraining(nn.Module):
    """The training forward reads a value back into Python: torch.export cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> Any:
        h = torch.relu(self.fc1(x))
        out = self.fc2(h)
        if self.training and float(h.detach().sum()) > -1e9:  # data-dependent Python branch
            return out, self.head(h)
        return out


def test_an_untraceable_training_forward_leaves_its_modules_whole_and_the_error_names_them(
) -> None:
    model, x = UntraceableTraining().eval(), torch.randn(3, 8)
    graph = build_graph(model, x)
    assert graph.modes == ["eval"]
    assert set(graph.unseen) == {"head.weight", "head.bias"}
    assert "training-mode forward could not be traced" in graph.unseen["head.weight"]
    with pytest.raises(LeanError) as error:
        prune_structured(model, ratio=0.5, units="neurons", example_inputs=x)
    message = str(error.value)
    assert "no longer runs in training mode" in message and "'head' (Linear)" in message
    # following the advice works: the group the head reads is left whole
    assert "per_layer={'neurons fc1': 0}" in message
    pruned, change = prune_structured(model, ratio=0.5, units="neurons", example_inputs=x,
                                      per_layer={"neurons fc1": 0})
    assert change.details["groups"] == {} and "could not be traced" in change.skipped["head"]
    assert [t.shape for t in outputs(pruned, x, True)] == [(3, 4), (3, 1)]


class HardCodedReshape(nn.Module):
    """Mixes 4 blocks of 8 features with a reshape whose sizes are constants."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.proj = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.q(x).reshape(b, n, 4, 8).softmax(-1).reshape(b, n, 32)
        return self.proj(h)


class WithReshape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mix = nn.Linear(16, 16), HardCodedReshape()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(torch.relu(self.inp(x)))


def test_a_hard_coded_size_error_names_the_module_and_the_groups_to_leave_whole() -> None:
    model, x = WithReshape().eval(), torch.randn(2, 5, 16)
    with pytest.raises(LeanError) as error:
        prune_structured(model, ratio=0.5, units="neurons", example_inputs=x)
    message = str(error.value)
    assert "the module at 'mix' (HardCodedReshape) raised RuntimeError" in message
    assert "shape '[2, 5, 4, 8]' is invalid" in message
    # the groups reaching into the module: its reshaped rows, and the input its q reads
    assert "per_layer={'neurons inp': 0, 'neurons mix.q #1': 0, 'neurons mix.q #2': 0}" \
        in message
    assert "exclude=['inp', 'mix.q']" in message
    # the advice works: the rest still prunes
    pruned, change = prune_structured(model, ratio=0.5, units="neurons", example_inputs=x,
                                      exclude=["mix.q"])
    assert set(change.details["removed"]) == {"neurons inp"}
    assert pruned.inp.weight.shape == (8, 16) and pruned.mix.q.weight.shape == (32, 8)
    reference = masked(model, x, change.details["removed"])
    torch.testing.assert_close(outputs(pruned, x, False)[0], outputs(reference, x, False)[0])


class ConstantSplit(nn.Module):
    """Splits its input at a constant (2) and feeds the first part to ``f``: the failure shows
    in ``f`` but the constant lives in this module."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, rest = torch.split(x, [2, x.shape[1] - 2], dim=1)
        return torch.cat([self.f(first), rest], dim=1)


def test_a_constant_split_feeding_a_module_names_the_groups_reaching_into_it(
) -> None:
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), ConstantSplit(), nn.Linear(7, 2)).eval()
    x = torch.randn(4, 3)
    with pytest.raises(LeanError) as error:
        prune_structured(model, ratio=0.5, units="neurons", example_inputs=x)
    message = str(error.value)
    assert "the module at '2.f' (Linear) raised RuntimeError" in message
    # the first part of the split (the columns of f) and f's own rows
    advice = "per_layer={'neurons 0 #1': 0, 'neurons 2.f': 0}"
    assert f"the groups cut there are 'neurons 0 #1', 'neurons 2.f': leave them whole with " \
        f"{advice} or exclude=['0', '2.f']" in message
    pruned, change = prune_structured(model, ratio=0.5, units="neurons", example_inputs=x,
                                      per_layer={"neurons 0 #1": 0, "neurons 2.f": 0})
    assert set(change.details["removed"]) == {"neurons 0 #2"}
    assert pruned[3].in_features == 5
