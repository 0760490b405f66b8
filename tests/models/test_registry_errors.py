"""Factories that fail, shapes that overflow and inputs larger than memory are clean errors,
raised before anything is allocated."""

from __future__ import annotations

import pytest
import torch

from leantorch.errors import LeanError, UnknownModelError
from leantorch.models import load_model, parse_shape, registry
from leantorch.models.registry import LoadedModel, check_fits_memory, model_label

FACTORIES = '''
import torch

def build():
    return torch.nn.Linear(4, 2)

def needs(width, depth=2):
    return torch.nn.Linear(width, 2)

def optional(width=4):
    return torch.nn.Linear(width, 2)

def boom():
    raise ValueError("checkpoint missing\\nmore detail")
'''


@pytest.fixture
def factories(tmp_path):
    path = tmp_path / "f.py"
    path.write_text(FACTORIES)
    return path


def test_a_factory_that_raises_is_named_with_its_first_line(factories) -> None:
    with pytest.raises(UnknownModelError) as info:
        load_model(f"{factories}:boom")
    assert str(info.value) == (f"'{factories}:boom': the factory raised ValueError: "
                               "checkpoint missing")


def test_a_factory_with_required_arguments_is_refused_before_it_runs(factories) -> None:
    with pytest.raises(UnknownModelError, match=r"cannot be called without arguments.*'width'"):
        load_model(f"{factories}:needs")
    assert isinstance(load_model(f"{factories}:optional").model, torch.nn.Linear)


def test_model_label_is_the_loaded_name(factories) -> None:
    reference = f"{factories}:build"
    assert model_label(reference) == load_model(reference).name == "f.py:build"
    assert model_label("MiniLM") == "minilm"
    assert model_label("some/folder/tiny-bert/") == "tiny-bert"


def test_a_size_past_int64_is_named() -> None:
    with pytest.raises(LeanError, match=r"'99999999999999999999' has 1e\+20 elements"):
        parse_shape("99999999999999999999")
    with pytest.raises(LeanError, match=r"'4294967296x4294967296' has 1.84e\+19 elements"):
        parse_shape("4294967296x4294967296")  # each size fits int64, the product does not
    assert parse_shape("3037000499x3037000499")[0] == (3037000499, 3037000499)  # fits int64


def test_memory_check_counts_bytes_before_allocating(monkeypatch) -> None:
    monkeypatch.setattr(registry, "available_memory", lambda: 1000)
    check_fits_memory("x", (10, 25), torch.float32)  # 1000 bytes: exactly fits
    with pytest.raises(LeanError, match=r"^x needs 2.79e-06 GiB but only 9.31e-07 GiB"):
        # 250 x (8 + 4: made as float32 first) = 3000 B
        check_fits_memory("x", (10, 25), torch.float64)
    with pytest.raises(LeanError, match="needs"):
        check_fits_memory("x", (1001,), torch.bool)  # 1 + 4 bytes each
    check_fits_memory("x", (125,), torch.int64)  # int64 is generated directly: 8 bytes each
    monkeypatch.setattr(registry, "available_memory", lambda: None)
    check_fits_memory("x", (10**12,), torch.float32)  # unknown memory: nothing to compare


def test_example_inputs_check_memory_first(monkeypatch) -> None:
    monkeypatch.setattr(registry, "available_memory", lambda: 2**20)
    custom = LoadedModel("m", torch.nn.Identity(), "custom")
    with pytest.raises(LeanError, match=r"^input 512x1024:float32 with batch 1 needs 0.00195"):
        custom.example_inputs(shapes=["512x1024"])
    assert custom.example_inputs(shapes=["256x1024"])[0][0].shape == (1, 256, 1024)
    text = LoadedModel("t", torch.nn.Identity(), "text", vocab_size=10)
    with pytest.raises(LeanError, match="token ids of batch 1024 x seq_len 1024 needs"):
        text.example_inputs(batch=1024, seq_len=1024)


def test_available_memory_reads_something_on_this_machine() -> None:
    available = registry.available_memory()
    assert available is None or available > 0
