"""The transform contract: copy unless inplace, selection by path, before/after costs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from leantorch.compress import Change, apply_transform, replace_module, select_modules
from leantorch.errors import LeanError, LeanTypeError


def net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(),
                         nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)))


def halve(model: nn.Module, **kwargs):
    def edit(target: nn.Module, change: Change) -> None:
        for path, module in select_modules(target, nn.Linear, kwargs.get("include"),
                                           kwargs.get("exclude")):
            replace_module(target, path, nn.Linear(module.in_features, module.out_features,
                                                   bias=False))
            change.replaced.append(path)

    return apply_transform("halve", model, edit, params={"n": 1},
                           example_inputs=kwargs.get("example_inputs"),
                           inplace=kwargs.get("inplace", False))


def test_the_callers_model_is_untouched_unless_inplace() -> None:
    model = net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    new, change = halve(model)
    assert new is not model
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert change.replaced == ["0", "2.0", "2.1"]
    same, _ = halve(model, inplace=True)
    assert same is model and model[0].bias is None


def test_costs_before_and_after() -> None:
    _, change = halve(net(), example_inputs=torch.randn(3, 8))
    assert change.before.params - change.after.params == 16 + 16 + 4  # the biases
    assert change.before.flops - change.after.flops == 3 * (16 + 16 + 4)
    assert change.before.macs == change.after.macs == 3 * (8 * 16 + 16 * 16 + 16 * 4)
    data = json.loads(json.dumps(change.to_dict()))
    assert data["transform"] == "halve" and data["params"] == {"n": 1}
    assert "params 484 -> 448" in str(change)


def test_without_inputs_only_sizes_are_known() -> None:
    _, change = halve(net())
    assert change.before.flops is None and change.after.params < change.before.params


def test_selection_by_glob() -> None:
    paths = [p for p, _ in select_modules(net(), nn.Linear, include="2.*")]
    assert paths == ["2.0", "2.1"]
    paths = [p for p, _ in select_modules(net(), nn.Linear, exclude=["2.1", "0"])]
    assert paths == ["2.0"]
    with pytest.raises(LeanTypeError, match="include must be a glob pattern"):
        list(select_modules(net(), nn.Linear, include=3))


def test_replace_module_errors() -> None:
    with pytest.raises(LeanError, match="no module at path '9'"):
        replace_module(net(), "9", nn.ReLU())
    with pytest.raises(LeanError, match="is the model itself"):
        replace_module(net(), "", nn.ReLU())
    with pytest.raises(LeanTypeError, match=r"must be a torch\.nn\.Module"):
        apply_transform("x", [1], lambda t, c: None)


def test_transform_registry() -> None:
    from leantorch.compress.registry import get_transform, register_transform

    register_transform("tests.halve", lambda model, *, inplace=False: halve(model,
                                                                            inplace=inplace))
    assert get_transform("tests.halve")(net())[1].transform == "halve"
    with pytest.raises(LeanError, match=r"unknown transform 'nope'; known: .*tests\.halve"):
        get_transform("nope")
    with pytest.raises(LeanError, match="must take inplace="):
        register_transform("tests.bad", lambda model: model)
