"""Recipe steps are type-checked against each transform's annotations before any work runs;
the checker accepts every transform's own defaults and rejects what YAML can mistype."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Sequence

import pytest

from leantorch.compress.recipe import Recipe, _conforms, _hint_text
from leantorch.compress.registry import get_transform, transform_names
from leantorch.errors import LeanError


@pytest.mark.parametrize("name", transform_names())
def test_every_transform_default_passes_its_own_type_check(name: str) -> None:
    fn = get_transform(name)
    hints = typing.get_type_hints(fn)
    for key, parameter in inspect.signature(fn).parameters.items():
        if parameter.default is not inspect.Parameter.empty and key in hints:
            assert _conforms(parameter.default, hints[key]), (name, key, parameter.default)


@pytest.mark.parametrize("value,hint,expected", [
    (3, int, True), (True, int, False), (3.0, int, False),
    (3, float, True), (False, float, False), ("0.5", float, False),
    (None, float | None, True), ([0.5], float | None, False),
    ("a", str | Sequence[str], True), (["a", "b"], str | Sequence[str], True),
    (["a", 1], str | Sequence[str], False), ("ab", Sequence[str], False),
    ({"x": 0.5}, dict[str, float], True), ({"x": "y"}, dict[str, float], False),
    ([1, 2], tuple[int, int], True), ([1, 2, 3], tuple[int, int], False),
    ("l2", Callable[..., int], False), (len, Callable[..., int], True),
    ("l2", typing.Literal["l1", "l2"], True), ("l3", typing.Literal["l1", "l2"], False),
    ([{"anything": 1}], typing.Any, True),
])
def test_conforms(value: object, hint: object, expected: bool) -> None:
    assert _conforms(value, hint) is expected


def test_hint_text_reads_as_words() -> None:
    assert _hint_text(float | None) == "a number or null"
    assert _hint_text(str | Sequence[str] | None) == "a string or a list of strings or null"
    assert _hint_text(dict[str, float]) == "a mapping of strings to numbers"
    assert _hint_text(bool) == "true or false"


def step(transform: str, **args: object) -> dict:
    return {"name": "t", "steps": [{"transform": transform, "args": args}]}


@pytest.mark.parametrize("data,message", [
    (step("lowrank.svd", energy=[0.5]),
     "recipe.steps[0] (lowrank.svd): argument 'energy' must be a number or null, got [0.5]"),
    (step("lowrank.svd", rank="3"),
     "recipe.steps[0] (lowrank.svd): argument 'rank' must be an integer or null, got '3'"),
    (step("lowrank.svd", energy=1.5),
     "recipe.steps[0] (lowrank.svd): lowrank.svd: energy=1.5; expected a number in (0, 1]"),
    (step("lowrank.svd"), "give exactly one of rank, energy, param_ratio; got none"),
    (step("lowrank.svd", rank=2, exclude=3), "argument 'exclude' must be a string or a list "
     "of strings or null, got 3"),
    (step("prune.structured", per_layer={"a": "x"}),
     "argument 'per_layer' must be a mapping of strings to numbers or null"),
    (step("prune.structured", loss_fn="mse"), "argument 'loss_fn' must be a Python callable"),
    (step("moefy.split", num_experts="8"),  # **moe_args: names are open, types still checked
     "recipe.steps[0] (moefy.split): argument 'num_experts' must be an integer, got '8'"),
    ({**step("lowrank.svd", rank=2), "gates": [{"metric": "cosine_mean", "min": "high"}]},
     "recipe.gates[0] (cosine_mean): min must be a number, got 'high'"),
    ({**step("lowrank.svd", rank=2), "gates": [{"metric": "cosine_mean", "max": [1]}]},
     "recipe.gates[0] (cosine_mean): max must be a number, got [1]"),
    ({**step("lowrank.svd", rank=2), "gates": [{"metric": ["cosine_mean"], "min": 1}]},
     "recipe.gates[0]: metric must be a metric name, got ['cosine_mean']"),
])
def test_mistyped_steps_and_gates_name_the_argument_and_value(data: dict, message: str) -> None:
    with pytest.raises(LeanError) as info:
        Recipe.from_dict(data)
    assert message in str(info.value)


def test_well_typed_steps_pass() -> None:
    recipe = Recipe.from_dict({**step("prune.structured", ratio=0.5, units="neurons",
                                      per_layer={"fc": 0.25}, round_to=None),
                               "gates": [{"metric": "cosine_mean", "min": 0}]})
    assert recipe.steps[0].args["per_layer"] == {"fc": 0.25}
    assert recipe.gates[0].min == 0.0


@pytest.mark.parametrize("text,where", [
    ("name: x\nsteps: [unclosed\n", "not valid YAML at line 3 column 1: expected ',' or ']'"),
    ("name: x\n  bad: indent\n", "not valid YAML at line 2 column 6: mapping values are not "
     "allowed here"),
])
def test_yaml_errors_are_one_line_with_line_and_column(text: str, where: str, tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(LeanError) as info:
        Recipe.from_yaml(str(path))
    message = str(info.value)
    assert message.startswith(f"recipe file '{path}': {where}")
    assert "\n" not in message and "<unicode string>" not in message
    with pytest.raises(LeanError, match=r"^recipe text: not valid YAML at line"):
        Recipe.from_yaml(text)


def test_a_recipe_built_in_python_is_checked_before_any_step_runs() -> None:
    import torch

    from leantorch.compress.recipe import Step, run_recipe
    from leantorch.compress.verify import Gate

    class Untouchable(torch.nn.Linear):
        def forward(self, x):
            raise AssertionError("the model must not run")

    model = Untouchable(4, 4)
    batch = (torch.randn(2, 4),)
    bad_step = Recipe("t", (Step("lowrank.svd", {"energy": [0.5]}),))
    with pytest.raises(LeanError, match=r"argument 'energy' must be a number or null"):
        run_recipe(bad_step, model, calibration=[batch], evaluation=[batch],
                   example_inputs=batch, latency_runs=0)
    bad_gate = Recipe("t", (Step("lowrank.svd", {"rank": 1}),),
                      gates=(Gate("cosine_mean", min="high"),))
    with pytest.raises(LeanError, match=r"recipe.gates\[0\] \(cosine_mean\): min must be a "):
        run_recipe(bad_gate, model, calibration=[batch], evaluation=[batch],
                   example_inputs=batch, latency_runs=0)
