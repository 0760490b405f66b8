"""Every bad input to the command is one ``leantorch: error:`` line and a non-zero exit, and
nothing half-written is left on disk (issue 10). Each case runs the real command in a
subprocess, as a user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

MODELS = '''
import time

import torch

torch.set_num_threads(1)


class Slow(torch.nn.Module):
    """A Linear whose forward sleeps, so a compress run lasts long enough to interrupt."""

    def __init__(self, delay):
        super().__init__()
        self.delay = delay
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x):
        time.sleep(self.delay)
        return self.fc(x)


def build():
    torch.manual_seed(0)
    return Slow(0.0), (torch.randn(4, 16),)


def slow():
    torch.manual_seed(0)
    return Slow(0.3), (torch.randn(4, 16),)


def needs(width):
    return torch.nn.Linear(width, 3)


def boom():
    raise RuntimeError("no weights here\\nsecond line")
'''

RECIPE = """name: tiny
calibration: {samples: 8, batch_size: 4, seq_len: 8}
steps:
  - transform: lowrank.svd
    args: {%s}
task: embedding
gates:
  - {metric: cosine_mean, min: %s}
"""


@pytest.fixture
def models(tmp_path: Path) -> Path:
    path = tmp_path / "nets.py"
    path.write_text(MODELS)
    return path


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE % ("rank: 2", "-1.0"))
    return path


def leantorch(*argv: object, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "leantorch.cli", *map(str, argv)],
                          capture_output=True, text=True, check=False, env=env, cwd=cwd,
                          timeout=300)


def one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The run failed with exit 2 and exactly one ``leantorch: error:`` line holding every
    fragment (no traceback, nothing on stdout)."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("leantorch: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert result.stdout == ""
    return lines[0]


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- models and inputs
def test_a_factory_that_raises(models) -> None:
    result = leantorch("profile", f"{models}:boom", "--input", "16", "--no-latency")
    one_error_line(result, f"'{models}:boom': the factory raised RuntimeError: no weights here")
    assert "second line" not in result.stderr


def test_a_factory_that_needs_an_argument(models) -> None:
    result = leantorch("profile", f"{models}:needs", "--input", "16", "--no-latency")
    one_error_line(result, "cannot be called without arguments", "'width'")


def test_an_input_larger_than_memory_is_refused_before_allocating(models) -> None:
    # 10^15 float32 elements: 4e15 bytes = 3.73 million GiB, past any machine's memory
    result = leantorch("profile", f"{models}:build", "--input", "1000000x1000000x1000",
                       "--no-latency", "--device-spec", "none")
    one_error_line(result, "input 1000000x1000000x1000:float32 with batch 1 needs 3.73e+06 GiB",
                   "GiB of memory is available")


def test_an_input_size_past_int64_is_refused(models) -> None:
    result = leantorch("profile", f"{models}:build", "--input", "99999999999999999999",
                       "--no-latency")
    one_error_line(result, "input shape '99999999999999999999' has 1e+20 elements",
                   "2^63 - 1")


def test_a_huge_batch_times_a_small_shape_is_refused(models) -> None:
    result = leantorch("profile", f"{models}:build", "--input", "16", "--batch",
                       str(2**62), "--no-latency")
    one_error_line(result, "elements; at most 2^63 - 1 fit a tensor")


# --------------------------------------------------------------------------- recipe and data
def test_a_binary_recipe_file(models, tmp_path) -> None:
    binary = tmp_path / "model.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    out = tmp_path / "out"
    result = leantorch("compress", f"{models}:build", "--recipe", binary, "--out", out)
    one_error_line(result, f"recipe file '{binary}' is not a text/YAML file", "NUL bytes")
    assert not out.exists()


def test_a_binary_data_file(models, recipe, tmp_path) -> None:
    binary = tmp_path / "texts.txt"
    binary.write_bytes(bytes(range(128, 256)) * 4)
    result = leantorch("compress", f"{models}:build", "--recipe", recipe, "--data", binary,
                       "--out", tmp_path / "out")
    one_error_line(result, f"--data '{binary}' is not a text file", "not UTF-8")


def test_malformed_yaml_is_one_line_naming_the_file(models, tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nsteps: [unclosed\n")
    result = leantorch("compress", f"{models}:build", "--recipe", path)
    line = one_error_line(result, f"recipe file '{path}': not valid YAML at line 3 column 1")
    assert "<unicode string>" not in line


def test_a_gate_bound_that_is_not_a_number(models, tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE % ("rank: 2", '"high"'))
    result = leantorch("compress", f"{models}:build", "--recipe", path)
    one_error_line(result, "recipe.gates[0] (cosine_mean): min must be a number, got 'high'")


def test_a_step_argument_of_the_wrong_type_fails_before_the_model_loads(models, tmp_path
                                                                        ) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE % ("energy: [0.5]", "-1.0"))
    # the factory raises if it is ever called: the recipe must be refused first
    result = leantorch("compress", f"{models}:boom", "--recipe", path)
    one_error_line(result, "recipe.steps[0] (lowrank.svd): argument 'energy' must be a number "
                   "or null, got [0.5]")


def test_a_step_argument_out_of_range_fails_before_the_model_loads(models, tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE % ("energy: 1.5", "-1.0"))
    result = leantorch("compress", f"{models}:boom", "--recipe", path)
    one_error_line(result, "recipe.steps[0] (lowrank.svd)", "energy=1.5",
                   "expected a number in (0, 1]")


# --------------------------------------------------------------------------- --out
def test_out_that_is_an_existing_file(models, recipe, tmp_path) -> None:
    target = tmp_path / "model.safetensors"
    target.write_text("mine")
    result = leantorch("compress", f"{models}:boom", "--recipe", recipe, "--out", target)
    one_error_line(result, f"--out '{target}' is an existing file, not a folder")
    assert target.read_text() == "mine"


def test_out_under_a_regular_file(models, recipe, tmp_path) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    out = blocker / "deeper" / "out"
    result = leantorch("compress", f"{models}:boom", "--recipe", recipe, "--out", out)
    one_error_line(result, f"--out '{out}' lies under '{blocker}', which is a file")
    assert blocker.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_folder_that_is_not_writable(models, recipe, tmp_path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        result = leantorch("compress", f"{models}:boom", "--recipe", recipe, "--out",
                           locked / "out")
        one_error_line(result, "cannot be created", "is not writable")
    finally:
        locked.chmod(0o700)


def test_a_non_empty_out_folder_is_refused_without_overwrite(models, recipe, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("the user's own model")
    # the factory raises if called: the folder is checked before the model loads
    result = leantorch("compress", f"{models}:boom", "--recipe", recipe, "--out", out)
    one_error_line(result, f"--out '{out}' already exists and is not empty", "--overwrite")
    assert (out / "model.safetensors").read_text() == "the user's own model"
    assert listing(out) == ["model.safetensors"]


@pytest.mark.slow  # a whole compress run; tests/test_io.py covers the folder swap in-process
def test_overwrite_replaces_the_folder_whole(models, recipe, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    result = leantorch("compress", f"{models}:build", "--recipe", recipe, "--out", out,
                       "--overwrite", "--latency-runs", "0", "--json")
    assert result.returncode == 0, result.stderr
    # the old folder is gone, not merged: only the new set is there
    assert listing(out) == ["model.safetensors", "report.json", "report.md"]
    assert json.loads((out / "report.json").read_text())["passed"]
    assert listing(tmp_path) == ["nets.py", "out", "r.yaml"]  # no temporary left beside it


def test_default_out_is_named_before_the_model_loads(models, recipe, tmp_path) -> None:
    existing = tmp_path / "out" / "nets.py:boom-tiny"
    existing.mkdir(parents=True)
    (existing / "report.md").write_text("kept")
    result = leantorch("compress", f"{models}:boom", "--recipe", recipe, cwd=tmp_path)
    one_error_line(result, "--out 'out/nets.py:boom-tiny' already exists and is not empty")


# --------------------------------------------------------------------------- devices
def test_meta_device_refuses_timing(models) -> None:
    result = leantorch("profile", f"{models}:build", "--device", "meta")
    one_error_line(result, "--device meta runs no kernels", "--no-latency")


def test_meta_device_refuses_a_measured_roofline(models) -> None:
    result = leantorch("profile", f"{models}:build", "--device", "meta", "--no-latency")
    one_error_line(result, "--device-spec auto measures the device", "--device-spec none")


def test_meta_device_counts_without_timing(models) -> None:
    result = leantorch("profile", f"{models}:build", "--device", "meta", "--no-latency",
                       "--device-spec", "none", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["forward"]["macs"] == 4 * 16 * 16  # the factory's (4, 16) example input
    assert report["latency"] is None and report["device"] is None


# --------------------------------------------------------------------------- Ctrl-C
@pytest.mark.slow
def test_ctrl_c_exits_130_with_one_line_and_no_output_folder(models, recipe, tmp_path
                                                             ) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "leantorch.cli", "compress", f"{models}:slow", "--recipe",
         str(recipe), "--out", str(out), "--latency-runs", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in process.stdout:  # the first step line: the run is under way
            if "step 1/" in line:
                break
        else:
            pytest.fail(f"no step line; stderr: {process.stderr.read()}")
        time.sleep(0.2)  # inside the step (each forward sleeps 0.3 s)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert err.strip().splitlines() == ["leantorch: interrupted"]
    assert not out.exists()
    assert listing(tmp_path) == ["nets.py", "r.yaml"]  # no temporary folder beside it
