"""Model names, shapes and factory files resolve, or fail with an error that says what to do."""

from __future__ import annotations

import pytest
import torch

from leantorch.errors import LeanError, UnknownModelError
from leantorch.models import BUILTINS, load_model, parse_shape
from tests._optional import needs_transformers


@pytest.mark.parametrize("text,expected", [
    ("3x224x224", ((3, 224, 224), torch.float32)),
    ("3, 32,32", ((3, 32, 32), torch.float32)),
    ("128:int64", ((128,), torch.int64)),
    ("4x4:bfloat16", ((4, 4), torch.bfloat16)),
])
def test_parse_shape(text: str, expected) -> None:
    assert parse_shape(text) == expected


@pytest.mark.parametrize("text", ["", "3x", "x3", "3xx4", "a,b", "3x-4", "3x4:complex7", "0x4"])
def test_malformed_shapes_are_named(text: str) -> None:
    with pytest.raises(LeanError) as info:
        parse_shape(text)
    assert repr(text) in str(info.value) or "malformed" in str(info.value)


def test_unknown_model_lists_what_is_accepted() -> None:
    with pytest.raises(UnknownModelError) as info:
        load_model("resnet51")
    message = str(info.value)
    assert "'resnet51'" in message and "minilm" in message and "file.py:factory" in message


FACTORY = '''
import torch

def build():
    return torch.nn.Sequential(torch.nn.Linear(6, 3))

def build_with_inputs():
    return torch.nn.Linear(6, 3), torch.randn(2, 6)

def not_a_model():
    return 42
'''


def test_factory_files(tmp_path) -> None:
    path = tmp_path / "mymodels.py"
    path.write_text(FACTORY)
    loaded = load_model(f"{path}:build")
    assert isinstance(loaded.model, torch.nn.Sequential)
    args, kwargs = loaded.example_inputs(batch=4, shapes=["6"])
    assert args[0].shape == (4, 6) and kwargs == {}
    with pytest.raises(LeanError, match="no example inputs"):
        loaded.example_inputs()
    with_inputs = load_model(f"{path}:build_with_inputs")
    assert with_inputs.example_inputs()[0][0].shape == (2, 6)
    with pytest.raises(UnknownModelError, match=r"has no callable 'missing'.*build"):
        load_model(f"{path}:missing")
    with pytest.raises(UnknownModelError, match="returned int"):
        load_model(f"{path}:not_a_model")
    with pytest.raises(UnknownModelError, match="does not exist"):
        load_model(f"{tmp_path}/nope.py:build")


def test_a_folder_without_config_is_refused(tmp_path) -> None:
    with pytest.raises(UnknownModelError, match=r"no config\.json"):
        load_model(str(tmp_path))


@needs_transformers
def test_text_and_vision_inputs() -> None:
    text = load_model("llama-tiny")
    _, kwargs = text.example_inputs(batch=2, seq_len=9)
    assert kwargs["input_ids"].shape == (2, 9)
    assert int(kwargs["input_ids"].max()) < text.vocab_size
    with pytest.raises(LeanError, match="--input does not apply"):
        text.example_inputs(shapes=["3x4"])
    vision = load_model("resnet50")
    args, _ = vision.example_inputs(batch=1)
    assert args[0].shape == (1, 3, 224, 224)
    with pytest.raises(LeanError, match="--seq-len applies to text models"):
        vision.example_inputs(seq_len=4)
    with pytest.raises(LeanError, match="resnet50: batch=0; expected an int >= 1"):
        vision.example_inputs(batch=0)


def test_every_builtin_has_a_description() -> None:
    assert {"minilm", "bert-base", "gpt2", "llama-tiny", "vit-b16", "resnet50",
            "mixtral-tiny"} <= set(BUILTINS)
    assert all(description for description, _ in BUILTINS.values())


@needs_transformers
def test_a_local_transformers_folder_loads(tmp_path) -> None:
    import transformers

    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    transformers.BertModel(config).save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.kind == "text" and loaded.vocab_size == 100
    _, kwargs = loaded.example_inputs(seq_len=5)
    assert kwargs["input_ids"].shape == (1, 5)
