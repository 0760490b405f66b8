"""The leantorch command: results on stdout, one-line errors on stderr, exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from leantorch.cli import main
from leantorch.errors import LeanError

MODEL_FILE = '''
import torch

def build():
    return torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.ReLU())
'''


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(MODEL_FILE)
    return path


def test_profile_json(model_file, capsys) -> None:
    code = main(["profile", f"{model_file}:build", "--input", "6", "--batch", "4", "--json",
                 "--no-latency", "--device-spec", "none"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["forward"]["macs"] == 4 * 6 * 3
    assert data["inputs"] == [{"name": "arg0", "shape": [4, 6], "dtype": "float32"}]
    assert data["latency"] is None and data["device"] is None


def test_profile_table_with_backward(model_file, capsys) -> None:
    code = main(["profile", f"{model_file}:build", "--input", "6", "--backward", "--runs", "2",
                 "--warmup", "0", "--depth", "1", "--device-spec", "t4"])
    assert code == 0
    out = capsys.readouterr().out
    assert "bwd FLOPs" in out and "latency forward + backward" in out and "roofline on t4" in out


@pytest.mark.parametrize("argv,fragment", [
    (["profile", "no-such-model"], "unknown model 'no-such-model'"),
    (["profile", "{file}:nothing"], "has no callable 'nothing'"),
    (["profile", "{file}:build", "--input", "6x"], "input shape '6x' is malformed"),
    (["profile", "{file}:build", "--input", "7"], "the model's forward failed"),
    (["profile", "{file}:build"], "no example inputs"),
    (["profile", "{file}:build", "--input", "6", "--device-spec", "tpu"], "--device-spec"),
    (["profile", "{file}:build", "--input", "6", "--depth", "-1"], "--depth must be >= 0"),
    (["profile", "{file}:build", "--input", "6", "--batch", "0"], "batch=0; expected an int >= 1"),
])
def test_bad_input_is_one_line_on_stderr(argv, fragment, model_file, capsys) -> None:
    argv = [a.replace("{file}", str(model_file)) for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("leantorch: error: ")
    assert fragment in lines[0]


def test_the_installed_command_exits_without_a_traceback(tmp_path) -> None:
    result = subprocess.run([sys.executable, "-m", "leantorch.cli", "profile", "nope"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "unknown model 'nope'" in result.stderr


def test_models_lists_builtins(capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "minilm" in out and "resnet50" in out


RECIPE = """
name: tiny-lowrank
description: test recipe
calibration: {samples: 16, batch_size: 8, seq_len: 8}
steps:
  - transform: lowrank.svd
    args: {rank: 4, exclude: ["*pooler*"]}
task: embedding
gates:
  - {metric: cosine_mean, min: %s}
"""


@pytest.fixture
def tiny_bert(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=120)
    folder = tmp_path / "tiny-bert"
    transformers.BertModel(config).save_pretrained(folder)
    return folder


def test_compress_writes_the_model_and_reports(tiny_bert, tmp_path, capsys) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE % "-1.0")
    out = tmp_path / "out"
    code = main(["compress", str(tiny_bert), "--recipe", str(recipe), "--out", str(out),
                 "--latency-runs", "3"])
    assert code == 0
    text = capsys.readouterr().out
    assert "lowrank.svd" in text and "cosine_mean" in text
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "report.json",
                                                     "report.md"]
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["source"] == "tiny-bert"
    assert [s["label"] for s in report["stages"]] == ["original", "lowrank.svd"]
    # the printed speedup is the report's median [q1-q3] of per-round ratios, not markup-eaten
    speed = report["stages"][1]["speedup"]
    assert f"{speed['median']:.2f}x [{speed['q1']:.2f}-{speed['q3']:.2f}]" in text
    assert "speedup [q1-q3]" in text and "3 interleaved rounds" in text
    assert report["machine"]["cpu"]["model"] in text


def test_compress_with_a_pruning_recipe_writes_a_model_that_reloads(tiny_bert, tmp_path,
                                                                     capsys) -> None:
    import leantorch

    recipe = tmp_path / "p.yaml"
    recipe.write_text(
        "name: tiny-prune\ncalibration: {samples: 16, batch_size: 8, seq_len: 8}\n"
        "steps:\n  - transform: prune.structured\n"
        "    args: {ratio: 0.5, units: neurons, importance: l2}\n"
        "task: embedding\ngates:\n  - {metric: cosine_mean, min: -1.0}\n")
    out = tmp_path / "out"
    code = main(["compress", str(tiny_bert), "--recipe", str(recipe), "--out", str(out),
                 "--latency-runs", "0"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    before, after = report["stages"][0], report["stages"][1]
    assert after["label"] == "prune.structured" and after["params"] < before["params"]
    model = leantorch.load(out / "model.safetensors")
    assert model.encoder.layer[0].intermediate.dense.out_features == 32  # 64 neurons halved


def test_a_recipe_gives_the_same_result_from_python_and_from_the_cli(tiny_bert, tmp_path,
                                                                   capsys) -> None:
    import torch

    import leantorch
    from leantorch.compress.recipe import Recipe, recipe_data, run_recipe
    from leantorch.models import load_model

    recipe = tmp_path / "aware.yaml"  # activation-aware: the result depends on calibration
    recipe.write_text(
        "name: tiny-aware\ncalibration: {samples: 12, batch_size: 4, seq_len: 6}\n"
        "steps:\n  - transform: lowrank.svd\n"
        "    args: {rank: 4, activation_aware: true, exclude: ['*pooler*']}\n"
        "task: embedding\ngates:\n  - {metric: cosine_mean, min: -1.0}\n")
    out = tmp_path / "out"
    assert main(["compress", str(tiny_bert), "--recipe", str(recipe), "--out", str(out),
                 "--latency-runs", "0"]) == 0
    capsys.readouterr()
    cli = json.loads((out / "report.json").read_text())
    # from Python, the recipe's calibration settings make the same data
    loaded = load_model(str(tiny_bert))
    data = recipe_data(str(recipe), loaded)
    assert len(data.calibration) == 3  # 12 samples in batches of 4
    assert all(b["input_ids"].shape[0] == 4 and b["input_ids"].shape[1] <= 6
               for b in data.calibration)
    result = run_recipe(str(recipe), loaded, latency_runs=0)
    assert result.to_dict()["stages"] == cli["stages"]
    assert result.to_dict()["source"] == cli["source"] == "tiny-bert"
    saved = leantorch.load(out / "model.safetensors").state_dict()
    for key, value in result.model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    # and the settings matter: other calibration settings give another model
    other = run_recipe(Recipe.from_yaml(recipe.read_text().replace("samples: 12", "samples: 4")),
                       load_model(str(tiny_bert)), latency_runs=0)
    assert other.to_dict()["stages"] != cli["stages"]
    with pytest.raises(LeanError, match=r"model is a LoadedModel .* got calibration as well"):
        run_recipe(str(recipe), loaded, calibration=data.calibration)
    with pytest.raises(LeanError, match=r"texts= and shapes= need a leantorch.models.LoadedModel"):
        run_recipe(str(recipe), loaded.model, texts=["a b"] * 4, calibration=data.calibration,
                   evaluation=data.evaluation)


def test_compress_gate_failure_writes_nothing(tiny_bert, tmp_path, capsys) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE % "1.5")  # cosine can never reach 1.5
    out = tmp_path / "out"
    code = main(["compress", str(tiny_bert), "--recipe", str(recipe), "--out", str(out),
                 "--latency-runs", "0"])
    assert code == 1
    assert "below the minimum 1.5; nothing was written" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("argv,fragment", [
    (["compress", "minilm", "--recipe", "int9"], "unknown recipe 'int9'"),
    (["compress", "minilm", "--recipe", "lowrank-50", "--data", "/nope.txt"], "no such file"),
    (["compress", "minilm", "--recipe", "lowrank-50", "--seq-len", "1"], "--seq-len must be"),
])
def test_compress_bad_input(argv, fragment, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]


def test_recipes_lists_the_shipped_ones(capsys) -> None:
    assert main(["recipes"]) == 0
    assert "lowrank-50:" in capsys.readouterr().out


def test_transforms_lists_every_registered_transform_with_its_knobs(capsys) -> None:
    from leantorch.compress.registry import transform_names

    assert main(["transforms"]) == 0
    out = capsys.readouterr().out
    headers = [line.split()[0] for line in out.splitlines() if line and not line[0].isspace()]
    assert headers == transform_names()
    # a knob line: name, annotation, default, and the doc from the docstring
    assert "group_size: int | None = None  input features per scale" in out
    assert "quant.llm_int8 [reads calibration]" in out
    assert "inplace:" not in out and "example_inputs:" not in out


def test_transforms_json_filters_by_name_and_family(capsys) -> None:
    from leantorch.compress.registry import transform_names

    first_prune = next(n for n in transform_names() if n.startswith("prune."))
    assert main(["transforms", "--json", "quant", first_prune]) == 0
    data = json.loads(capsys.readouterr().out)
    names = [d["name"] for d in data]
    assert names == sorted([first_prune] + [n for n in transform_names()
                                            if n.startswith("quant.")])
    assert len(names) > 2
    int4 = next(d for d in data if d["name"] == "quant.int4_weight")
    assert {k["name"]: k["default"] for k in int4["knobs"]}["group_size"] == 128


def test_transforms_unknown_name_is_one_line_on_stderr(capsys) -> None:
    assert main(["transforms", "quant.int3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("leantorch: error: transforms: unknown transform or family "
                          "'quant.int3'; known: ")
    assert "quant.int8_dynamic" in err and len(err.strip().splitlines()) == 1
