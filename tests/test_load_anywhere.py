"""What leantorch saves loads in a fresh Python process that imported nothing but leantorch.

Every model is saved here and loaded in a new interpreter (``subprocess.run``), where its
output must equal, bit for bit, the output the saved model gave in this process on the same
fixed input. Several models share one subprocess: each start costs a torch import.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import leantorch
from leantorch.cli import main
from leantorch.compress.registry import accepts, get_transform, transform_names
from leantorch.compress.verify import primary_output
from leantorch.errors import LeanError, UnknownModelError
from leantorch.serialize import (
    _KNOWN_MODULES,
    _KNOWN_STEP_MODULES,
    _MODULES,
    _STEPS,
    read_header,
)
from tests._optional import needs_transformers, transformers

T = transformers

D, FF, VOCAB, HEADS = 16, 32, 40, 2

# Runs in the fresh interpreter: load every case first (so nothing but leantorch itself was
# imported when the first load ran), then compare outputs on the saved inputs.
CHECK = r"""
import json, sys
import torch
torch.set_num_threads(1)
import leantorch
folder, names = sys.argv[1], sys.argv[2:]
imported = sorted(m for m in sys.modules if m.startswith("leantorch"))
models, results = {}, {}
for name in names:
    try:
        models[name] = leantorch.load(f"{folder}/{name}.safetensors").eval()
    except Exception as error:
        results[name] = f"{type(error).__name__}: {error}"
from leantorch.compress.verify import primary_output
for name, model in models.items():
    case = torch.load(f"{folder}/{name}.pt", weights_only=True)
    with torch.no_grad():
        out = primary_output(model(*case["args"], **case["kwargs"]))
    expected = case["expected"]
    results[name] = "equal" if torch.equal(out, expected) else (
        f"differs: shapes {tuple(out.shape)} {tuple(expected.shape)}, max abs "
        f"{(out.double() - expected.double()).abs().max().item() if out.shape == expected.shape else '-'}")
print(json.dumps({"imported_before_load": imported, "results": results}))
"""


def run_fresh(code: str, *args: str, cwd: Path | None = None,
              pythonpath: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -c code args...`` in a new interpreter, with this process's PYTHONPATH (so it
    finds the same leantorch) plus ``pythonpath``."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    paths = (pythonpath or []) + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def check_in_fresh_process(folder: Path, names: list[str]) -> dict[str, Any]:
    result = run_fresh(CHECK, str(folder), *names)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def save_case(folder: Path, name: str, model: nn.Module, inputs: Any) -> None:
    """Save ``model`` and, beside it, ``inputs`` with the output it gives on them here."""
    args, kwargs = ((), inputs) if isinstance(inputs, dict) else ((inputs,), {})
    model = model.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fresh process runs on one thread too: same reduction order
    try:
        with torch.no_grad():
            expected = primary_output(model(*args, **kwargs)).clone()
    finally:
        torch.set_num_threads(threads)
    leantorch.save(model, folder / f"{name}.safetensors")
    torch.save({"args": args, "kwargs": kwargs, "expected": expected}, folder / f"{name}.pt")


# --------------------------------------------------------------------------- tiny models
def ids(batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def calibration() -> list[dict[str, torch.Tensor]]:
    return [ids(4, 8, seed) for seed in range(1, 4)]


def bert() -> nn.Module:
    return T.BertModel(T.BertConfig(hidden_size=D, num_hidden_layers=2,
                                    num_attention_heads=HEADS, intermediate_size=FF,
                                    vocab_size=VOCAB)).eval()


def sentence_encoder() -> nn.Module:
    """A MiniLM-shaped model (SentenceEncoder over a BERT), tiny."""
    from leantorch.models import SentenceEncoder

    return SentenceEncoder(bert()).eval()


def gpt2() -> nn.Module:
    return T.GPT2LMHeadModel(T.GPT2Config(n_embd=D, n_layer=2, n_head=HEADS, n_inner=FF,
                                          vocab_size=VOCAB, n_positions=32, bos_token_id=0,
                                          eos_token_id=0)).eval()


def llama() -> nn.Module:
    return T.LlamaForCausalLM(T.LlamaConfig(
        hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=1,
        intermediate_size=FF, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)).eval()


def mixtral() -> nn.Module:
    return T.MixtralForCausalLM(T.MixtralConfig(
        hidden_size=D, intermediate_size=FF, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, vocab_size=VOCAB,
        bos_token_id=0, eos_token_id=0)).eval()


def net() -> nn.Module:
    """Torch layers only (loading it needs no transformers): an FFN, then a head."""
    ffn = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    return nn.Sequential(ffn, nn.ReLU(), nn.Linear(16, 8)).eval()


def vector() -> torch.Tensor:
    return torch.randn(3, 16, generator=torch.Generator().manual_seed(0))


Steps = tuple[tuple[str, dict[str, Any]], ...]


def apply_steps(model: nn.Module, inputs: Any, steps: Steps) -> nn.Module:
    """Apply registered transforms in order, each with example inputs (and calibration data
    when it takes them)."""
    cal = calibration() if isinstance(inputs, dict) else [
        (torch.randn(4, 16, generator=torch.Generator().manual_seed(s)),) for s in (1, 2)]
    for name, args in steps:
        fn = get_transform(name)
        extra = {"calibration": cal} if accepts(fn, "calibration") else {}
        model, _ = fn(model, example_inputs=inputs, **extra, **args)
    return model


# name -> (model builder, input builder, transforms applied in order). Every registered
# transform is in CASES at least once (test_every_registered_transform_has_a_case checks).
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], Any], Steps]] = {
    "sentence_int8_dynamic": (sentence_encoder, ids, (("quant.int8_dynamic", {}),)),
    "net_int8_dynamic": (net, vector, (("quant.int8_dynamic", {}),)),
    "net_int8_weight": (net, vector, (("quant.int8_weight", {"group_size": 8}),)),
    "net_int4_weight": (net, vector, (("quant.int4_weight", {"group_size": 8}),)),
    "net_llm_int8": (net, vector, (("quant.llm_int8", {"threshold": 1.0}),)),
    "net_fake_ternary": (net, vector, (("quant.fake_quantize", {"scheme": "ternary"}),)),
    "net_fake_then_convert": (net, vector, (
        ("quant.fake_quantize", {"scheme": "int4_weight", "group_size": 8}), ("quant.convert", {}))),
    "net_lowrank": (net, vector, (("lowrank.svd", {"rank": 4}),)),
    "net_magnitude_masks": (net, vector, (("prune.magnitude", {"ratio": 0.5}),)),
    "net_masks_made_permanent": (net, vector, (
        ("prune.magnitude", {"ratio": 0.5}), ("prune.make_permanent", {}))),
    "net_nm": (net, vector, (("prune.nm", {"n": 2, "m": 4}),)),
    "net_block": (net, vector, (("prune.block", {"ratio": 0.5, "block_size": 4}),)),
    "net_sparse_csr": (net, vector, (
        ("prune.magnitude", {"ratio": 0.9}), ("prune.make_sparse", {"format": "csr"}))),
    "net_sparse_bsr": (net, vector, (
        ("prune.block", {"ratio": 0.5, "block_size": 4}),
        ("prune.make_sparse", {"format": "bsr", "block_size": 4, "force": True}))),
    "net_structured": (net, vector, (("prune.structured", {"ratio": 0.5,
                                                           "units": "neurons"}),)),
    "net_moefy_split": (net, vector, (("moefy.split", {"num_experts": 4, "k": 2}),)),
    "net_moefy_upcycle_int8": (net, vector, (
        ("moefy.upcycle", {"num_experts": 2, "k": 1, "noise": 0.01}),
        ("quant.int8_dynamic", {}))),
    "llama_sublayers": (llama, ids, (("prune.sublayers", {"count": 1}),)),
    "mixtral_convert": (mixtral, ids, (("moefy.convert_mixtral", {}),)),
    "sentence_bf16": (sentence_encoder, ids, (("quant.bf16", {}),)),
    "net_masks_fp16": (net, vector, (("prune.magnitude", {"ratio": 0.5}), ("quant.fp16", {}))),
    "sentence_autocast": (sentence_encoder, ids, (("quant.autocast", {}),)),
}

# The same transforms on transformers models (their own layer types: GPT-2's Conv1D, BERT's
# post-norm blocks, Llama's GQA): slower to transform, so not in the default run.
TRANSFORMERS_CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], Any], Steps]] = {
    "bert_int4_weight": (bert, ids, (("quant.int4_weight", {"group_size": 8}),)),
    "gpt2_lowrank": (gpt2, ids, (("lowrank.svd", {"rank": 4}),)),
    "bert_magnitude_masks": (bert, ids, (("prune.magnitude", {"ratio": 0.5}),)),
    "llama_nm": (llama, ids, (("prune.nm", {"n": 2, "m": 4}),)),
    "gpt2_sparse_csr": (gpt2, ids, (
        ("prune.magnitude", {"ratio": 0.9}), ("prune.make_sparse", {"format": "csr"}))),
    "bert_structured": (bert, ids, (
        ("prune.structured", {"ratio": 0.5, "units": ["heads", "neurons"]}),)),
    "llama_structured": (llama, ids, (
        ("prune.structured", {"ratio": 0.5, "units": ["kv_heads", "neurons"]}),)),
    "sentence_structured_int8": (sentence_encoder, ids, (
        ("prune.structured", {"ratio": 0.5, "units": "neurons"}), ("quant.int8_dynamic", {}))),
    "bert_moefy_split": (bert, ids, (
        ("moefy.split", {"num_experts": 4, "k": 2, "partition": "random"}),)),
    "gpt2_moefy_upcycle": (gpt2, ids, (
        ("moefy.upcycle", {"num_experts": 2, "k": 1, "noise": 0.01}),)),
}


def save_cases(folder: Path, cases: dict[str, tuple[Callable[[], nn.Module],
                                                    Callable[[], Any], Steps]]) -> None:
    for name, (build, inputs, steps) in cases.items():
        torch.manual_seed(0)
        example = inputs()
        save_case(folder, name, apply_steps(build(), example, steps), example)


def test_every_registered_transform_has_a_case() -> None:
    covered = {name for _, _, steps in CASES.values() for name, _ in steps}
    leantorchs = {name for name in transform_names()  # other tests register their own
                  if get_transform(name).__module__.startswith("leantorch.")}
    assert len(leantorchs) >= 16 and leantorchs <= covered, sorted(leantorchs - covered)


# Cases also saved as a leantorch that did not record defining modules wrote them: they load
# through the table of leantorch's own names.
WITHOUT_MODULES = ["sentence_int8_dynamic", "net_structured", "net_magnitude_masks",
                   "net_moefy_upcycle_int8", "sentence_bf16"]


@needs_transformers
def test_every_transform_output_loads_in_a_fresh_process(tmp_path) -> None:
    save_cases(tmp_path, CASES)
    for name in WITHOUT_MODULES:
        for suffix in (".safetensors", ".pt"):
            shutil.copy(tmp_path / f"{name}{suffix}", tmp_path / f"old_{name}{suffix}")
        path = tmp_path / f"old_{name}.safetensors"
        assert '"module": "leantorch.' in json.dumps(read_header(path))
        _rewrite_header(path, _strip_modules)
        assert '"module"' not in json.dumps(read_header(path))
    names = list(CASES) + [f"old_{name}" for name in WITHOUT_MODULES]
    report = check_in_fresh_process(tmp_path, names)
    assert report["results"] == dict.fromkeys(names, "equal")
    # the loads themselves found the modules: none of these was imported beforehand
    assert not {"leantorch.models.sentence", "leantorch.compress.quant.modules",
                "leantorch.compress.prune.layers", "leantorch.nn.moe.layer"} & \
        set(report["imported_before_load"])


@pytest.mark.slow
@needs_transformers
def test_transformers_models_load_in_a_fresh_process(tmp_path) -> None:
    save_cases(tmp_path, TRANSFORMERS_CASES)
    report = check_in_fresh_process(tmp_path, list(TRANSFORMERS_CASES))
    assert report["results"] == dict.fromkeys(TRANSFORMERS_CASES, "equal")


# --------------------------------------------------------------------------- the mechanism
def _import_every_leantorch_module() -> None:
    for info in pkgutil.walk_packages(leantorch.__path__, "leantorch."):
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as error:  # an optional extra not installed here
            if error.name is None or error.name.startswith("leantorch"):
                raise


def test_the_table_of_leantorch_names_is_complete() -> None:
    """Files written before headers named the module load through the table: it must list
    every class and step leantorch registers, with the module that registers it."""
    _import_every_leantorch_module()
    classes = {name: cls.__module__ for name, cls in _MODULES.items()
               if cls.__module__.startswith("leantorch.")}
    steps = {name: fn.__module__ for name, fn in _STEPS.items()
             if fn.__module__.startswith("leantorch.")}
    assert classes == _KNOWN_MODULES
    assert steps == _KNOWN_STEP_MODULES
    assert {"leantorch.SentenceEncoder", "leantorch.Int8DynamicLinear"} <= set(classes)


def _rewrite_header(path: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    """Replace the leantorch header of the file at ``path`` by ``edit(header)``."""
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["leantorch"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    save_file(tensors, str(path), metadata={"leantorch": json.dumps(edit(header))})


def _strip_modules(value: Any) -> Any:
    """The header as a leantorch that did not record defining modules wrote it."""
    if isinstance(value, dict):
        return {k: _strip_modules(v) for k, v in value.items() if k != "module"}
    if isinstance(value, list):
        return [_strip_modules(v) for v in value]
    return value


USER_MODULE = '''
import torch
from torch import nn
from leantorch.serialize import register_module

@register_module
class Doubler(nn.Module):
    def __init__(self, features):
        super().__init__()
        self.scale = nn.Parameter(torch.full((features,), 2.0))

    def spec(self):
        return {"features": self.scale.shape[0]}

    def forward(self, x):
        return x * self.scale
'''

LOAD_USER_MODEL = r"""
import sys, leantorch
path, package_root = sys.argv[1], sys.argv[2]
try:
    leantorch.load(path)  # userpkg is not importable yet
except leantorch.LeanError as error:
    print("LeanError:", error)
sys.path.insert(0, package_root)
model = leantorch.load(path)
print("loaded", type(model[1]).__module__, type(model[1]).__name__)
"""


def test_a_user_class_is_imported_by_its_module_name(tmp_path) -> None:
    package = tmp_path / "userpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "layers.py").write_text(USER_MODULE)
    sys.path.insert(0, str(tmp_path))
    try:
        from userpkg.layers import Doubler

        model = nn.Sequential(nn.Linear(4, 4), Doubler(4))
        path = leantorch.save(model, tmp_path / "user.safetensors")
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("userpkg.layers", "userpkg"):
            sys.modules.pop(name, None)
    arch = read_header(path)["base"]["children"]["1"]
    assert arch["class"] == "userpkg.layers.Doubler" and arch["module"] == "userpkg.layers"
    fresh = run_fresh(LOAD_USER_MODEL, str(path), str(tmp_path), cwd=tmp_path.parent)
    assert fresh.returncode == 0, fresh.stderr
    error, loaded = fresh.stdout.strip().splitlines()
    # not importable: one clear error naming the class and its module, and what to do
    assert error.startswith("LeanError: ")
    assert "'userpkg.layers.Doubler'" in error and "'userpkg.layers'" in error
    assert "cannot be imported" in error and "model=" in error
    # importable: found by its module name without the caller importing it
    assert loaded == "loaded userpkg.layers Doubler"


@pytest.mark.parametrize("module,fragment", [
    ("os; import shutil", "not a dotted Python module name"),
    ("userpkg..layers", "not a dotted Python module name"),
    ("layers\n", "not a dotted Python module name"),
    (42, "not a dotted Python module name"),
    ("antigravity", "will not import"),
    ("__main__", "will not import"),
])
def test_module_names_from_a_header_are_checked_before_any_import(tmp_path, module,
                                                                  fragment) -> None:
    path = leantorch.save(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)),
                          tmp_path / "m.safetensors")

    def edit(header: dict[str, Any]) -> dict[str, Any]:
        header["overrides"]["1"] = {"kind": "leantorch", "class": "nowhere.Layer",
                                    "module": module, "spec": {}}
        return header

    _rewrite_header(path, edit)
    before = set(sys.modules)
    with pytest.raises(LeanError, match=fragment) as info:
        leantorch.load(path)
    assert "'nowhere.Layer'" in str(info.value)
    assert set(sys.modules) == before  # nothing was imported


def test_an_unknown_step_names_its_module(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    path = leantorch.save(model, tmp_path / "m.safetensors")

    def edit(header: dict[str, Any]) -> dict[str, Any]:
        header["steps"] = [{"step": "mine.cut", "args": {}, "module": "no_such_pkg.steps"}]
        return header

    _rewrite_header(path, edit)
    with pytest.raises(LeanError, match=r"structural step 'mine\.cut'.*'no_such_pkg\.steps'"):
        leantorch.load(path)


# --------------------------------------------------------------------------- headers
def test_a_header_without_format_version_is_not_a_leantorch_file(tmp_path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"leantorch": json.dumps({"a": 1})})
    with pytest.raises(LeanError, match="not a leantorch file: its header lacks format_version"
                       ) as info:
        leantorch.load(path)
    assert "upgrade" not in str(info.value)
    _rewrite_header(path, lambda h: {"format_version": "one"})
    with pytest.raises(LeanError, match="format version 'one'") as info:
        leantorch.load(path)
    assert "upgrade" not in str(info.value)


@pytest.mark.parametrize("key", ["base", "steps", "overrides", "parametrizations", "aliases"])
def test_a_header_missing_a_key_names_it(tmp_path, key) -> None:
    path = leantorch.save(nn.Linear(2, 2), tmp_path / "m.safetensors")
    _rewrite_header(path, lambda h: {k: v for k, v in h.items() if k != key})
    with pytest.raises(LeanError, match=f"lacks the key '{key}'"):
        leantorch.load(path)
    _rewrite_header(path, lambda h: {**h, key: "text"})
    with pytest.raises(LeanError, match=f"has '{key}' = 'text'; expected a"):
        read_header(path)


# --------------------------------------------------------------------------- folders
def test_load_accepts_a_folder(tmp_path) -> None:
    model = net()
    leantorch.save(model, tmp_path / "out" / "model.safetensors")
    loaded = leantorch.load(tmp_path / "out")
    x = vector()
    assert torch.equal(loaded(x), model(x))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("")
    with pytest.raises(LeanError, match=r"has no model\.safetensors \(found: notes\.txt\)"):
        leantorch.load(tmp_path / "empty")


@pytest.mark.parametrize("where", ["header", "report.json"])
@needs_transformers
def test_a_saved_folder_gets_the_inputs_of_its_builtin_source(tmp_path, where) -> None:
    """The folder names a built-in source (in the file's header, or in report.json as
    ``leantorch compress`` writes it): its inputs come from that built-in, built around the
    saved model (no weights of the built-in are made)."""
    from leantorch.models import load_model

    model = gpt2()
    folder = tmp_path / "g"
    if where == "header":
        leantorch.save(model, folder / "model.safetensors",
                       metadata={"source": "gpt2", "recipe": "int8"})
    else:
        leantorch.save(model, folder / "model.safetensors")
        (folder / "report.json").write_text(json.dumps({"source": "gpt2"}))
    loaded = load_model(str(folder))
    assert (loaded.name, loaded.kind, loaded.vocab_size) == ("g", "text", VOCAB)
    assert loaded.description.startswith("saved by leantorch from gpt2")
    _, kwargs = loaded.example_inputs(batch=2, seq_len=5)
    assert kwargs["input_ids"].shape == (2, 5) and int(kwargs["input_ids"].max()) < VOCAB
    assert torch.equal(loaded.model(**kwargs).logits, model(**kwargs).logits)


@needs_transformers
def test_a_sentence_encoder_with_minilm_vocabulary_gets_minilm_tokenizer(tmp_path) -> None:
    """A folder whose source is not a built-in (a compress of a compress folder) holding a
    SentenceEncoder over MiniLM's vocabulary tokenizes with MiniLM's tokenizer; another
    vocabulary gets random token ids."""
    from leantorch.models import SentenceEncoder, load_model, minilm_tokenizer
    from leantorch.models.sentence import minilm_path

    minilm_vocab = json.loads((minilm_path() / "config.json").read_text())["vocab_size"]
    for vocab, tokenizer in ((minilm_vocab, minilm_tokenizer), (VOCAB, None)):
        config = T.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=16, vocab_size=vocab)
        folder = tmp_path / f"enc{vocab}"
        leantorch.save(SentenceEncoder(T.BertModel(config)), folder / "model.safetensors",
                       metadata={"source": "minilm-int8"})
        loaded = load_model(str(folder))
        assert (loaded.kind, loaded.vocab_size, loaded.tokenizer) == ("text", vocab, tokenizer)


def test_a_saved_folder_without_a_known_source_needs_input_shapes(tmp_path) -> None:
    from leantorch.models import load_model

    leantorch.save(net(), tmp_path / "m" / "model.safetensors")
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.kind == "custom"
    with pytest.raises(LeanError, match="--input"):
        loaded.example_inputs()
    assert loaded.example_inputs(batch=3, shapes=["16"])[0][0].shape == (3, 16)


@needs_transformers
def test_a_truncated_transformers_folder_is_one_clean_error(tmp_path, capsys) -> None:
    from leantorch.models import load_model

    folder = tmp_path / "tiny"
    bert().save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(UnknownModelError, match="not a loadable transformers model"):
        load_model(str(folder))
    assert main(["profile", str(folder), "--no-latency"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a loadable transformers model" in err[0]


RECIPE = """
name: tiny-int8
calibration: {samples: 8, batch_size: 4, seq_len: 8}
steps:
  - transform: quant.int8_dynamic
    args: {exclude: ["*pooler*"]}
task: embedding
gates:
  - {metric: cosine_mean, min: -1.0}
"""

NET_FILE = """
import torch
from torch import nn

def build():
    ffn = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    return nn.Sequential(ffn, nn.ReLU(), nn.Linear(16, 8)).eval()
"""

LOAD_THEN_PROFILE = r"""
import contextlib, io, json, sys
import torch
torch.set_num_threads(1)
import leantorch
folder = sys.argv[1]
model = leantorch.load(folder)  # first, while nothing but leantorch is imported
loaded = [type(m).__name__ for m in model.modules()]
from leantorch.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = main(["profile", folder, "--input", "16", "--batch", "2", "--no-latency", "--json",
                 "--device-spec", "none"])
print(json.dumps({"loaded": loaded, "code": code, "profile": json.loads(out.getvalue())}))
"""


def test_a_compress_output_folder_loads_and_profiles_in_a_fresh_process(tmp_path,
                                                                        capsys) -> None:
    """``leantorch compress`` writes a folder; a fresh process loads it (``leantorch.load``)
    and profiles it (``leantorch profile FOLDER``)."""
    (tmp_path / "net.py").write_text(NET_FILE)
    (tmp_path / "r.yaml").write_text(RECIPE)
    out = tmp_path / "net-int8"
    assert main(["compress", f"{tmp_path / 'net.py'}:build", "--recipe",
                 str(tmp_path / "r.yaml"), "--input", "16", "--out", str(out),
                 "--latency-runs", "0", "--threads", "1"]) == 0
    capsys.readouterr()
    fresh = run_fresh(LOAD_THEN_PROFILE, str(out))
    assert fresh.returncode == 0, fresh.stderr
    result = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert result["loaded"] == ["Sequential", "Sequential", "Int8DynamicLinear", "GELU",
                                "Int8DynamicLinear", "ReLU", "Int8DynamicLinear"]
    assert result["code"] == 0
    assert result["profile"]["model"].startswith("net-int8 (")
    assert result["profile"]["inputs"] == [{"name": "arg0", "shape": [2, 16],
                                            "dtype": "float32"}]


@needs_transformers
def test_compress_takes_its_own_output_folder_as_model(tmp_path, capsys) -> None:
    """A transformers text model, compressed, then compressed again from its folder: the
    folder gives text inputs from the model's config (no --input needed)."""
    from leantorch.models import load_model

    source = tmp_path / "tiny-bert"
    bert().save_pretrained(source)
    (tmp_path / "r.yaml").write_text(RECIPE)
    out, again = tmp_path / "out", tmp_path / "again"
    for model, folder in ((source, out), (out, again)):
        assert main(["compress", str(model), "--recipe", str(tmp_path / "r.yaml"), "--out",
                     str(folder), "--latency-runs", "0", "--threads", "1"]) == 0
    capsys.readouterr()
    assert json.loads((again / "report.json").read_text())["source"] == "out"
    loaded = load_model(str(out))
    assert (loaded.name, loaded.kind, loaded.vocab_size) == ("out", "text", VOCAB)
    assert loaded.description == "saved by leantorch from tiny-bert with recipe tiny-int8"
    # 2 layers x (query, key, value, attention output, intermediate, output); pooler excluded
    assert sum(type(m).__name__ == "Int8DynamicLinear" for m in loaded.model.modules()) == 12
    # compressing int8 layers again finds no Linear left to replace: same model, same outputs
    twice = leantorch.load(again)
    inputs = ids()
    assert torch.equal(twice(**inputs).last_hidden_state, loaded.model(**inputs).last_hidden_state)
    with pytest.raises(LeanError, match="--input does not apply to out, a text model"):
        loaded.batches(["a", "b"], shapes=["16"])


@pytest.mark.slow
@needs_transformers
def test_minilm_int8_loads_in_a_fresh_process_with_its_tokenizer(tmp_path) -> None:
    """The demo's model: the real MiniLM, int8, saved as ``leantorch compress`` saves it."""
    from leantorch.models import load_model

    minilm = load_model("minilm")
    int8, _ = get_transform("quant.int8_dynamic")(minilm.model)
    texts = ["a cat sits on the mat", "leantorch makes models cheaper"]
    batch = minilm.batches(texts, batch_size=2, seq_len=16)[0]
    folder = tmp_path / "minilm-int8"
    folder.mkdir()
    save_case(folder, "model", int8, batch)
    leantorch.save(int8, folder / "model.safetensors", metadata={"source": "minilm"})
    report = check_in_fresh_process(folder, ["model"])
    assert report["results"] == {"model": "equal"}
    reloaded = load_model(str(folder))  # the folder as a MODEL: MiniLM's tokenizer comes along
    assert reloaded.kind == "text" and reloaded.tokenizer is minilm.tokenizer
    assert all(torch.equal(reloaded.batches(texts, 2, 16)[0][k], batch[k]) for k in batch)
