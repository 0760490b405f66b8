"""Recipes: strict parsing, staged measurement, fine-tune, gates, outputs written only on pass."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import leantorch
from leantorch.compress.recipe import Recipe, builtin_recipes, load_recipe, run_recipe
from leantorch.compress.verify import GateFailure
from leantorch.errors import LeanError

BASE = {"name": "t", "steps": [{"transform": "lowrank.svd", "args": {"rank": 4}}]}


def recipe(**changes) -> dict:
    d = json.loads(json.dumps(BASE))
    d.update(changes)
    return d


@pytest.mark.parametrize("data,message", [
    (recipe(colour="red"), "recipe: unknown key 'colour'; accepted: name"),
    ({"steps": BASE["steps"]}, "recipe: missing key 'name'"),
    (recipe(steps=[]), "recipe.steps must be a non-empty list"),
    (recipe(steps=[{"transfrom": "lowrank.svd"}]), "recipe.steps[0]: unknown key 'transfrom'"),
    (recipe(steps=[{"transform": "nope.nope"}]), "recipe.steps[0]: unknown transform 'nope.nope'"),
    (recipe(steps=[{"transform": "lowrank.svd", "args": {"rnak": 3}}]),
     "recipe.steps[0] (lowrank.svd): unknown argument 'rnak'; accepted: rank"),
    (recipe(calibration={"samples": 0}), "recipe.calibration: samples=0; expected an int >= 1"),
    (recipe(calibration={"holdout": 1.0}), "recipe.calibration: holdout=1.0; expected a number in (0, 1)"),
    (recipe(calibration={"size": 3}), "recipe.calibration: unknown key 'size'"),
    (recipe(finetune={"lr": -1}), "recipe.finetune: lr=-1; expected a number in (0, 1]"),
    (recipe(finetune={"loss": "l7"}), "recipe.finetune.loss must be one of mse"),
    (recipe(finetune={"validation": 0.5}),
     "recipe.finetune: validation=0.5; expected a number in [0, 0.5)"),
    (recipe(finetune={"patience": 3}), "recipe.finetune.patience = 3 needs validation > 0"),
    (recipe(finetune={"validation": 0.1, "patience": -1}),
     "recipe.finetune: patience=-1; expected an int >= 0"),
    (recipe(finetune={"eval_every": 0}), "recipe.finetune: eval_every=0; expected an int >= 1"),
    (recipe(finetune={"l2sp": -0.1}), "recipe.finetune: l2sp=-0.1; expected a number in [0, 1e+06]"),
    (recipe(finetune={"l2sp": "big"}), "recipe.finetune: l2sp='big'; expected a number in [0"),
    (recipe(gates=[{"metric": "cosine_mean"}]), "needs min and/or max"),
    (recipe(gates=[{"metric": "cosine_mean", "minimum": 1}]), "recipe.gates[0]: unknown key"),
    (recipe(task="speech"), "recipe.task must be one of"),
    (recipe(steps=[{"transform": "lowrank.svd", "finetune": {}}]), "exactly one of 'transform'"),
    (recipe(steps=[{"finetune": {"steps": 3}, "args": {}}]), "a finetune step takes no 'args'"),
])
def test_bad_recipes_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(LeanError) as info:
        Recipe.from_dict(data)
    assert message in str(info.value)


def test_yaml_text_files_and_shipped_recipes(tmp_path) -> None:
    text = "name: x\nsteps:\n  - transform: lowrank.svd\n    args: {energy: 0.9}\n"
    assert Recipe.from_yaml(text).steps[0].args == {"energy": 0.9}
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert load_recipe(str(path)).name == "x"
    with pytest.raises(LeanError, match="not valid YAML"):
        Recipe.from_yaml("name: [unclosed\n")
    with pytest.raises(LeanError, match="unknown recipe 'int9'"):
        load_recipe("int9")
    shipped = builtin_recipes()
    assert "lowrank-50" in shipped
    for name in shipped:  # every shipped recipe parses and names real transforms
        assert load_recipe(name).to_dict()["name"] == name


def test_a_shipped_recipe_by_its_file_name(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_recipe("prune-50.yaml") == load_recipe("prune-50")  # no such file here
    (tmp_path / "prune-50.yaml").write_text("name: mine\nsteps:\n  - transform: quant.int8_dynamic\n")
    assert load_recipe("prune-50.yaml").name == "mine"  # a local file wins
    with pytest.raises(LeanError, match="does not exist"):
        load_recipe("elsewhere/prune-50.yaml")


def encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                         nn.Linear(64, 16))


def data(n: int, seed: int) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(6, 32, generator=torch.Generator().manual_seed(7))
    return [(torch.randn(16, 6, generator=g) @ basis + 0.05 * torch.randn(16, 32, generator=g),)
            for _ in range(n)]


def lowrank_recipe(gate: float) -> Recipe:
    return Recipe.from_dict({
        "name": "lr", "steps": [{"transform": "lowrank.svd",
                                 "args": {"rank": 6, "activation_aware": True}}],
        "finetune": {"steps": 60, "lr": 3e-3}, "task": "embedding",
        "gates": [{"metric": "cosine_mean", "min": gate}]})


def test_run_measures_every_stage_and_leaves_the_model_alone(tmp_path) -> None:
    model = encoder()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = run_recipe(lowrank_recipe(0.85), model, calibration=data(6, 1),
                        evaluation=data(2, 2), example_inputs=data(1, 3)[0], latency_runs=2)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    labels = [s.label for s in result.stages]
    assert labels == ["original", "lowrank.svd", "+ fine-tune (60 steps)"]
    original, factored, tuned = result.stages
    assert factored.params < original.params and factored.flops < original.flops
    # rank 6 of 64 loses some of the function; distillation wins part of it back
    assert original.fidelity is None and 0.5 < factored.fidelity["cosine_mean"] < 0.99
    assert tuned.fidelity["cosine_mean"] > factored.fidelity["cosine_mean"] + 0.01
    assert result.finetune_loss[-1] < result.finetune_loss[0]
    assert result.passed and result.changes[0].replaced == ["0", "2", "4"]
    paths = result.write(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "model.safetensors", "report.json", "report.md"]
    report = json.loads(paths["report_json"].read_text())
    assert report["passed"] and len(report["stages"]) == 3
    loaded = leantorch.load(paths["model"])
    x = data(1, 4)[0][0]
    assert torch.equal(loaded(x), result.model(x))
    assert "| lowrank.svd |" in paths["report_md"].read_text()


def test_a_failing_gate_stops_with_the_report_and_writes_nothing(tmp_path) -> None:
    with pytest.raises(GateFailure) as info:
        run_recipe(lowrank_recipe(0.99999), encoder(), calibration=data(6, 1),
                   evaluation=data(2, 2), example_inputs=data(1, 3)[0], latency_runs=0)
    error = info.value
    assert "cosine_mean" in str(error) and "below the minimum 0.99999" in str(error)
    assert len(error.result.stages) == 3
    with pytest.raises(LeanError, match="refusing to write"):
        error.result.write(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_progress_is_drawn_only_when_asked(capsys) -> None:
    from leantorch.compress.progress import showing, track

    assert list(track(range(3), 3, "quiet")) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    with showing():
        assert list(track(range(4), 4, "loud")) == [0, 1, 2, 3]
    err = capsys.readouterr().err
    assert "loud [##########          ] 2/4" in err and "4/4" in err


def test_fine_tune_steps_interleave_with_transforms() -> None:
    schedule = Recipe.from_dict({
        "name": "iterative", "task": "embedding",
        "steps": [{"transform": "lowrank.svd", "args": {"rank": 8, "include": "0"}},
                  {"finetune": {"steps": 20, "lr": 3e-3}},
                  {"transform": "lowrank.svd", "args": {"rank": 8, "include": "2"}}]})
    model = encoder()
    result = run_recipe(schedule, model, calibration=data(4, 1), evaluation=data(2, 2),
                        example_inputs=data(1, 3)[0], latency_runs=0)
    assert [s.label for s in result.stages] == [
        "original", "lowrank.svd", "+ fine-tune (20 steps)", "lowrank.svd"]
    assert len(result.finetune_loss) == 20 and len(result.changes) == 2
    assert schedule.to_dict()["steps"][1] == {"finetune": {
        "steps": 20, "lr": 3e-3, "loss": "mse", "weight_decay": 0.0, "validation": 0.0,
        "eval_every": 10, "patience": 0, "l2sp": 0.0}}
    assert type(model[0]) is nn.Linear  # the caller's model was not touched


def test_a_fine_tune_first_trains_a_copy() -> None:
    model = encoder()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    only = Recipe.from_dict({"name": "ft", "task": "embedding",
                             "steps": [{"finetune": {"steps": 3}}]})
    run_recipe(only, model, calibration=data(2, 1), evaluation=data(1, 2),
               example_inputs=data(1, 3)[0], latency_runs=0)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


FAST = {"name": "fast", "task": "embedding", "gates": [{"metric": "cosine_mean", "min": -1.0}],
        "steps": [{"transform": "lowrank.svd", "args": {"rank": 8}}]}


def test_every_stage_keeps_the_model_it_was_verified_with() -> None:
    from leantorch.compress.verify import verify

    schedule = Recipe.from_dict({
        "name": "kept", "task": "embedding",
        "steps": [{"transform": "lowrank.svd", "args": {"rank": 8, "include": "0"}},
                  {"finetune": {"steps": 5, "lr": 3e-3}},
                  {"transform": "quant.int8_dynamic"}]})
    model = encoder()
    evaluation = data(2, 2)
    result = run_recipe(schedule, model, calibration=data(3, 1), evaluation=evaluation,
                        example_inputs=data(1, 3)[0], latency_runs=3)
    models = [s.model for s in result.stages]
    assert models[0] is model and models[-1] is result.model
    assert len({id(m) for m in models}) == 4  # a later step did not edit an earlier model
    assert type(models[1][0]).__name__ != "Linear" and type(models[1][2]) is nn.Linear
    assert type(models[3][2]) is not nn.Linear  # only the last stage is quantized
    for stage in result.stages[1:]:  # re-verifying stage i's model gives stage i's numbers
        again = verify(model, stage.model, evaluation, task="embedding")
        assert again.metrics == stage.fidelity.metrics
    # the fine-tune changed its own copy, not the factored model before it
    x = data(1, 4)[0][0]
    assert not torch.equal(models[1](x), models[2](x))


def test_stages_are_timed_together_and_the_report_says_how_and_where(tmp_path) -> None:
    import re

    from leantorch.measure import machine_info

    result = run_recipe(FAST, encoder(), calibration=data(2, 1), evaluation=data(1, 2),
                        example_inputs=data(1, 3)[0], latency_runs=4)
    assert result.timing["rounds"] == 4 and result.timing["baseline"] == "original"
    original = result.stages[0]
    assert original.speedup.to_dict() == dict.fromkeys(("median", "q1", "q3", "min", "max"), 1.0)
    for stage in result.stages:
        assert stage.latency_ms == stage.latency.median > 0
        assert stage.speedup.min <= stage.speedup.q1 <= stage.speedup.median \
            <= stage.speedup.q3 <= stage.speedup.max
    header, rows = result.table()
    column = header.index("speedup [q1-q3]")
    assert rows[0][column] == "1.00x"
    for row, stage in zip(rows[1:], result.stages[1:], strict=True):
        assert re.fullmatch(r"\d+\.\d\dx \[\d+\.\d\d-\d+\.\d\d\]", row[column])
        assert row[column] == stage.speedup.bracket()
    paths = result.write(tmp_path / "out")
    report = json.loads(paths["report_json"].read_text())
    assert report["timing"]["rounds"] == 4
    assert report["machine"]["threads"] == report["threads"] == torch.get_num_threads()
    assert report["machine"]["cpu"] == machine_info()["cpu"]
    for entry, stage in zip(report["stages"], result.stages, strict=True):
        assert entry["speedup"] == stage.speedup.to_dict()
        assert entry["latency"]["median_ms"] == entry["latency_ms"]
        assert set(entry["latency"]) == {"median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms"}
    markdown = paths["report_md"].read_text()
    assert "4 interleaved rounds" in markdown and report["machine"]["cpu"]["model"] in markdown


def test_without_timing_the_report_says_so() -> None:
    result = run_recipe(FAST, encoder(), calibration=data(2, 1), evaluation=data(1, 2),
                        example_inputs=data(1, 3)[0], latency_runs=0)
    assert result.timing is None and all(s.speedup is None for s in result.stages)
    assert {row[5] for row in result.table()[1]} == {"-"}
    assert "not timed" in result.timing_note()
    with pytest.raises(LeanError, match=r"run_recipe: latency_runs=-1; expected an int >= 0"):
        run_recipe(FAST, encoder(), calibration=data(1, 1), evaluation=data(1, 2),
                   example_inputs=data(1, 3)[0], latency_runs=-1)


def test_the_second_text_set_is_verified_beside_the_held_out_one_and_not_gated(tmp_path) -> None:
    from leantorch.compress.verify import verify

    model = encoder()
    other = [(torch.randn(16, 32, generator=torch.Generator().manual_seed(9)),)]  # another kind
    result = run_recipe(lowrank_recipe(0.85), model, calibration=data(6, 1),
                        evaluation=data(2, 2), example_inputs=data(1, 3)[0], latency_runs=0,
                        evaluation_ood=other, ood_source="random inputs")
    assert result.stages[0].fidelity_ood is None
    for stage in result.stages[1:]:
        assert stage.fidelity_ood.samples == 16
    # the numbers are verify()'s on that set, for the final model
    assert result.stages[-1].fidelity_ood.metrics == verify(model, result.model, other).metrics
    header, rows = result.table()
    assert header[-3:] == ["cosine_mean_ood", "cosine_min_ood", "retrieval_agreement_ood"]
    assert rows[-1][-3] == f"{result.stages[-1].fidelity_ood['cosine_mean']:.4f}"
    report = result.to_dict()
    assert report["stages"][-1]["fidelity_ood"]["samples"] == 16
    assert report["ood_source"] == "random inputs"
    assert "16 texts of a second, different set never used for tuning (random inputs)" in \
        result.markdown()
    # without the set: no columns, nothing said
    plain = run_recipe(lowrank_recipe(0.85), model, calibration=data(6, 1),
                       evaluation=data(2, 2), example_inputs=data(1, 3)[0], latency_runs=0)
    assert not any(h.endswith("_ood") for h in plain.table()[0])
    assert plain.to_dict()["stages"][-1]["fidelity_ood"] is None
    with pytest.raises(LeanError, match="evaluation_ood must be None or a non-empty list"):
        run_recipe(lowrank_recipe(0.85), model, calibration=data(6, 1), evaluation=data(2, 2),
                   example_inputs=data(1, 3)[0], latency_runs=0, evaluation_ood=[])


def test_a_recipe_fine_tune_with_validation_reports_the_kept_step() -> None:
    tuned = Recipe.from_dict({
        "name": "v", "task": "embedding",
        "steps": [{"transform": "lowrank.svd", "args": {"rank": 6, "activation_aware": True}}],
        "finetune": {"steps": 30, "lr": 3e-3, "validation": 0.2, "eval_every": 5,
                     "patience": 2, "l2sp": 1e-3}})
    result = run_recipe(tuned, encoder(), calibration=data(10, 1), evaluation=data(2, 2),
                        example_inputs=data(1, 3)[0], latency_runs=0)
    (summary,) = result.finetunes
    assert summary["best_step"] % 5 == 0 and summary["best_step"] <= summary["steps"] <= 30
    assert summary["validation_best"] <= summary["validation_first"]
    assert result.to_dict()["finetunes"] == [summary]


def test_one_calibration_batch_fine_tunes_without_validation_and_says_so() -> None:
    tuned = Recipe.from_dict({
        "name": "v1", "task": "embedding", "steps": [{"finetune": {
            "steps": 4, "lr": 1e-3, "validation": 0.2, "patience": 1}}]})
    result = run_recipe(tuned, encoder(), calibration=data(1, 1), evaluation=data(1, 2),
                        example_inputs=data(1, 3)[0], latency_runs=0)
    (summary,) = result.finetunes
    assert summary["steps"] == 4 and "best_step" not in summary
    assert summary["validation_skipped"] == "needs at least 2 calibration batches, got 1"
