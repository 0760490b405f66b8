"""Models by name: built-ins, local transformers folders, folders written by
``leantorch compress``, and ``path/to/file.py:factory``.

Built-ins other than ``minilm`` are built from transformers configs with random weights (the
architecture, not the training, decides what they cost); ``minilm`` carries real weights.
Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leantorch.errors import LeanError, UnknownModelError, describe
from leantorch.validate import positive_int

__all__ = [
    "BUILTINS",
    "LoadedModel",
    "available_memory",
    "check_fits_memory",
    "load_model",
    "model_label",
    "parse_shape",
]


@dataclass
class LoadedModel:
    """A model and how to make inputs for it.

    ``kind`` is ``"text"`` (inputs: token ids and an attention mask of ``(batch, seq_len)``),
    ``"vision"`` (an image batch ``(batch, *image_shape)``) or ``"custom"``.
    """

    name: str
    model: nn.Module
    kind: str
    vocab_size: int = 0
    image_shape: tuple[int, ...] = ()
    default_seq_len: int = 128
    example: tuple[Any, ...] | None = None  # inputs a factory supplied
    description: str = ""
    tokenizer: Callable[[], Any] | None = None  # builds the model's tokenizer, when it has one
    extras: dict[str, Any] = field(default_factory=dict)

    def batches(
        self,
        texts: Sequence[str],
        batch_size: int = 32,
        seq_len: int = 128,
        seed: int = 0,
        shapes: Sequence[str] | None = None,
    ) -> list[Any]:
        """Model inputs for ``texts`` in batches: tokenized when the model has a tokenizer
        (padded to the longest text of each batch, at most ``seq_len`` tokens); otherwise one
        deterministic random input per text (token ids for text models, images for vision,
        tensors of ``shapes`` such as ``"3x32x32"`` for other models)."""
        positive_int(self.name, "batch_size", batch_size)
        positive_int(self.name, "seq_len", seq_len)
        if shapes and self.kind == "text":
            raise LeanError(f"--input does not apply to {self.name}, a text model: its "
                            "inputs are token ids; use --seq-len N")
        chunks = [list(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
        if self.kind == "text" and self.tokenizer is not None:
            tokenizer = self.extras.setdefault("_tokenizer", self.tokenizer())
            return [dict(tokenizer(chunk, padding=True, truncation=True, max_length=seq_len,
                                   return_tensors="pt")) for chunk in chunks]
        batches = []
        for i, chunk in enumerate(chunks):
            args, kwargs = self.example_inputs(batch=len(chunk),
                                               seq_len=seq_len if self.kind == "text" else None,
                                               shapes=shapes, seed=seed + i)
            batches.append(kwargs if kwargs else args)
        return batches

    def example_inputs(
        self,
        batch: int = 1,
        seq_len: int | None = None,
        shapes: Sequence[str] | None = None,
        seed: int = 0,
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """(positional inputs, keyword inputs) for a forward pass, generated deterministically."""
        positive_int(self.name, "batch", batch)
        generator = torch.Generator().manual_seed(seed)
        if self.kind == "text":
            if shapes:
                raise LeanError(f"--input does not apply to {self.name}, a text model: its "
                                "inputs are token ids; use --seq-len N")
            length = self.default_seq_len if seq_len is None else positive_int(self.name, "seq_len", seq_len)
            check_fits_memory(f"token ids of batch {batch} x seq_len {length}",
                              (batch, length), torch.int64, copies=2)  # ids and mask
            ids = torch.randint(0, self.vocab_size, (batch, length), generator=generator)
            return (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if seq_len is not None:
            raise LeanError(f"--seq-len applies to text models; {self.name} is a {self.kind} "
                            "model: give its input shape with --input SHAPE")
        if shapes:
            return tuple(_random_input(parse_shape(s), batch, generator) for s in shapes), {}
        if self.kind == "vision":
            shape = (batch, *self.image_shape)
            check_fits_memory(f"images of batch {batch}", shape, torch.float32)
            return (torch.randn(shape, generator=generator),), {}
        if self.example is not None:
            return self.example, {}
        raise LeanError(f"{self.name}: no example inputs; give their shapes with --input SHAPE "
                        "(e.g. --input 3x224x224), or return (model, example_inputs) from the "
                        "factory")


_DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
           "int64": torch.int64, "long": torch.int64, "int32": torch.int32, "int": torch.int32,
           "bool": torch.bool}
_MAX_ELEMENTS = 2**63 - 1
_SHAPE = re.compile(r"^\s*(\d+(?:\s*[x,]\s*\d+)*)\s*(?::\s*([a-z0-9]+))?\s*$")


def parse_shape(text: str) -> tuple[tuple[int, ...], torch.dtype]:
    """``"3x224x224"`` or ``"3,224,224"`` (optionally ``":int64"``) -> (shape, dtype).

    The shape excludes the batch dimension. Accepted dtypes: float32 (default), float16,
    bfloat16, float64, int64, int32, bool.
    """
    match = _SHAPE.match(text) if isinstance(text, str) else None
    if match is None:
        raise LeanError(
            f"input shape {describe(text)} is malformed; expected sizes joined by 'x' or ',' "
            "without the batch dimension, optionally with a dtype, e.g. 3x224x224 or 128:int64"
        )
    sizes = tuple(int(s) for s in re.split(r"\s*[x,]\s*", match.group(1)))
    if any(s == 0 for s in sizes):
        raise LeanError(f"input shape {text!r} has a zero size; every size must be >= 1")
    # torch sizes are int64: a larger one would overflow inside torch, not fail cleanly
    if math.prod(sizes) > _MAX_ELEMENTS:
        raise LeanError(f"input shape {text!r} has {math.prod(sizes):.3g} elements; at most "
                        f"2^63 - 1 fit a tensor (and far fewer fit memory)")
    dtype_name = match.group(2) or "float32"
    if dtype_name not in _DTYPES:
        raise LeanError(f"input shape {text!r}: unknown dtype {dtype_name!r}; accepted: "
                        f"{', '.join(sorted(_DTYPES))}")
    return sizes, _DTYPES[dtype_name]


def _shape_text(sizes: Sequence[int], dtype: torch.dtype) -> str:
    return "x".join(map(str, sizes)) + f":{str(dtype).removeprefix('torch.')}"


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation: ``MemAvailable`` from /proc/meminfo on
    Linux, else the physical memory size; None when neither can be read."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def check_fits_memory(what: str, shape: Sequence[int], dtype: torch.dtype,
                      copies: int = 1) -> None:
    """Refuse, before allocating, a tensor of ``shape`` (``copies`` of it) that does not fit the
    available memory, naming ``what`` and the size in GiB."""
    numel = math.prod(shape)
    if numel > _MAX_ELEMENTS:
        raise LeanError(f"{what} has {numel:.3g} elements; at most 2^63 - 1 fit a tensor")
    # a bool or non-float32 floating tensor is generated as float32 first, then converted
    via_float32 = dtype == torch.bool or (dtype.is_floating_point and dtype != torch.float32)
    itemsize = dtype.itemsize + (4 if via_float32 else 0)
    needed = numel * itemsize * copies
    available = available_memory()
    if available is not None and needed > available:
        raise LeanError(f"{what} needs {needed / 2**30:.3g} GiB but only "
                        f"{available / 2**30:.3g} GiB of memory is available; use a smaller "
                        "shape or batch")


def _random_input(parsed: tuple[tuple[int, ...], torch.dtype], batch: int,
                  generator: torch.Generator) -> torch.Tensor:
    sizes, dtype = parsed
    shape = (batch, *sizes)
    check_fits_memory(f"input {_shape_text(sizes, dtype)} with batch {batch}", shape, dtype)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.randint(0, 100, shape, generator=generator, dtype=dtype)


# --------------------------------------------------------------------------- built-ins
def _transformers() -> Any:
    try:
        import transformers
    except ImportError as error:
        raise LeanError("this model is built with transformers: pip install 'leantorch[hf]'") \
            from error
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return transformers


def _uncased_wordpiece() -> Any:
    from leantorch.models.sentence import minilm_tokenizer

    return minilm_tokenizer()


# Each built-in factory takes ``model=``: a model built from it and then compressed and saved
# (a ``leantorch compress`` folder) gets the same inputs and tokenizer as the original.
def _minilm(model: nn.Module | None = None) -> LoadedModel:
    from leantorch.models.sentence import load_minilm

    _transformers()
    from leantorch.models.sentence import minilm_tokenizer

    model = load_minilm() if model is None else model
    return LoadedModel("minilm", model, "text", vocab_size=_config(model).vocab_size,
                       description="all-MiniLM-L6-v2 sentence encoder, real pretrained weights",
                       tokenizer=minilm_tokenizer)


def _text(name: str, config_name: str, model_name: str, description: str,
          tokenizer: Callable[[], Any] | None = None, **config: Any
          ) -> Callable[..., LoadedModel]:
    def build(model: nn.Module | None = None) -> LoadedModel:
        t = _transformers()
        if model is None:
            torch.manual_seed(0)
            model = getattr(t, model_name)(getattr(t, config_name)(**config)).eval()
        cfg = _config(model)
        return LoadedModel(name, model, "text", vocab_size=cfg.vocab_size,
                           description=description, tokenizer=tokenizer)

    return build


def _vision(name: str, config_name: str, model_name: str, description: str,
            **config: Any) -> Callable[..., LoadedModel]:
    def build(model: nn.Module | None = None) -> LoadedModel:
        t = _transformers()
        if model is None:
            torch.manual_seed(0)
            model = getattr(t, model_name)(getattr(t, config_name)(**config)).eval()
        cfg = _config(model)
        size = getattr(cfg, "image_size", 224)
        return LoadedModel(name, model, "vision", image_shape=(cfg.num_channels, size, size),
                           description=description)

    return build


def _config(model: nn.Module) -> Any:
    """The transformers config of ``model`` (of its encoder, for a sentence encoder)."""
    config = getattr(model, "config", None)
    if config is None:
        config = getattr(getattr(model, "encoder", None), "config", None)
    return config


BUILTINS: dict[str, tuple[str, Callable[..., LoadedModel]]] = {
    "minilm": ("all-MiniLM-L6-v2 sentence encoder (real weights, 22.7M params)", _minilm),
    "bert-base": ("BERT-base encoder (110M params), random weights", _text(
        "bert-base", "BertConfig", "BertModel", "BERT-base",
        tokenizer=_uncased_wordpiece)),  # BERT's uncased vocabulary is MiniLM's
    "gpt2": ("GPT-2 small with its LM head (124M params), random weights", _text(
        "gpt2", "GPT2Config", "GPT2LMHeadModel", "GPT-2 small")),
    "llama-tiny": ("a 4-layer Llama (GQA 8/4 heads, SwiGLU), random weights", _text(
        "llama-tiny", "LlamaConfig", "LlamaForCausalLM", "tiny Llama", hidden_size=256,
        intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)),
    "mixtral-tiny": ("a 2-layer Mixtral (8 experts, top-2), random weights", _text(
        "mixtral-tiny", "MixtralConfig", "MixtralForCausalLM", "tiny Mixtral", hidden_size=256,
        intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
        max_position_embeddings=2048)),
    "vit-b16": ("ViT-B/16 at 224x224 with a 1000-class head, random weights", _vision(
        "vit-b16", "ViTConfig", "ViTForImageClassification", "ViT-B/16", num_labels=1000)),
    "resnet50": ("ResNet-50 with a 1000-class head, random weights", _vision(
        "resnet50", "ResNetConfig", "ResNetForImageClassification", "ResNet-50",
        num_labels=1000)),
    "convnext-tiny": ("ConvNeXt-T with a 1000-class head, random weights", _vision(
        "convnext-tiny", "ConvNextConfig", "ConvNextForImageClassification", "ConvNeXt-T",
        num_labels=1000)),
    "mobilenetv2": ("MobileNetV2 1.0 with a 1000-class head, random weights", _vision(
        "mobilenetv2", "MobileNetV2Config", "MobileNetV2ForImageClassification",
        "MobileNetV2", num_labels=1000)),
}


def _from_folder(path: Path) -> LoadedModel:
    t = _transformers()
    from safetensors import SafetensorError

    try:
        config = t.AutoConfig.from_pretrained(str(path), local_files_only=True)
        model = t.AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    except (OSError, ValueError, KeyError, SafetensorError) as error:
        # SafetensorError: a truncated or corrupt model.safetensors
        raise UnknownModelError(
            f"model folder {str(path)!r} is not a loadable transformers model: "
            f"{type(error).__name__}: {str(error).splitlines()[0]}") from error
    return _inputs_from_config(path.name, model, config)


def _inputs_from_config(name: str, model: nn.Module, config: Any,
                        tokenizer: Callable[[], Any] | None = None) -> LoadedModel:
    """A text, vision or custom LoadedModel, as the transformers ``config`` says."""
    if hasattr(config, "num_channels") and not hasattr(config, "vocab_size"):
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        return LoadedModel(name, model, "vision",
                           image_shape=(config.num_channels, size, size))
    if hasattr(config, "vocab_size"):
        return LoadedModel(name, model, "text", vocab_size=config.vocab_size,
                           tokenizer=tokenizer)
    return LoadedModel(name, model, "custom")


def _from_saved(path: Path) -> LoadedModel:
    """A folder holding a ``model.safetensors`` written by ``leantorch.save`` (what
    ``leantorch compress`` writes). Its inputs are made as for the model it came from: the source the
    file's header (or the folder's report.json) names, when that is a built-in; else as the
    model's transformers config says (a sentence encoder with MiniLM's vocabulary gets
    MiniLM's tokenizer); else the caller gives ``--input``."""
    from leantorch.models.sentence import SentenceEncoder
    from leantorch.serialize import load, read_header

    header = read_header(path)
    source = header.get("metadata", {}).get("source") or _report_source(path)
    model = load(path).eval()
    name = path.resolve().name
    recipe = header.get("metadata", {}).get("recipe")
    description = (f"saved by leantorch from {source or 'an unnamed model'}" +
                   (f" with recipe {recipe}" if recipe else ""))
    if isinstance(source, str) and source.lower() in BUILTINS:
        loaded = BUILTINS[source.lower()][1](model=model)
    else:
        config = _config(model)
        tokenizer = None
        if isinstance(model, SentenceEncoder) and _has_minilm_vocabulary(config):
            from leantorch.models.sentence import minilm_tokenizer

            tokenizer = minilm_tokenizer
        loaded = _inputs_from_config(name, model, config, tokenizer)
    loaded.name, loaded.description = name, description
    loaded.extras["source"] = source
    return loaded


def _report_source(path: Path) -> str | None:
    report = path / "report.json"
    if not report.is_file():
        return None
    try:
        source = json.loads(report.read_text()).get("source")
    except (OSError, ValueError, AttributeError) as error:
        raise UnknownModelError(f"{str(report)!r} is not a readable JSON report: {error}"
                                ) from error
    return source if isinstance(source, str) and source else None


def _has_minilm_vocabulary(config: Any) -> bool:
    from leantorch.models.sentence import minilm_path

    try:
        minilm = json.loads((minilm_path() / "config.json").read_text())
    except (LeanError, OSError, ValueError):  # the MiniLM package is not installed
        return False
    return (getattr(config, "model_type", None) == minilm.get("model_type") and
            getattr(config, "vocab_size", None) == minilm.get("vocab_size"))


def _from_factory(reference: str) -> LoadedModel:
    file_part, _, factory_name = reference.rpartition(":")
    path = Path(file_part)
    if not path.is_file():
        raise UnknownModelError(f"model file {file_part!r} does not exist (from {reference!r}; "
                                "expected path/to/file.py:factory)")
    if not factory_name.isidentifier():
        raise UnknownModelError(f"{reference!r}: {factory_name!r} is not a function name; "
                                "expected path/to/file.py:factory")
    module_name = f"_leantorch_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UnknownModelError(f"cannot import {file_part!r} as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        sys.modules.pop(module_name, None)
        raise UnknownModelError(f"importing {file_part!r} failed: {type(error).__name__}: "
                                f"{_first_line(error)}") from error
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        found = sorted(n for n, v in vars(module).items()
                       if callable(v) and not n.startswith("_") and
                       getattr(v, "__module__", None) == module_name)
        raise UnknownModelError(
            f"{file_part!r} has no callable {factory_name!r}; callables defined there: "
            f"{', '.join(found) or 'none'}")
    import inspect

    try:
        inspect.signature(factory).bind()
    except TypeError as error:  # it needs arguments the command line cannot give
        raise UnknownModelError(
            f"{reference!r}: the factory cannot be called without arguments ({error}); write "
            "a function that takes none and returns the model") from error
    except ValueError:  # no signature to inspect (a builtin): just call it
        pass
    try:
        result = factory()
    except Exception as error:
        raise UnknownModelError(f"{reference!r}: the factory raised {type(error).__name__}: "
                                f"{_first_line(error)}") from error
    example = None
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module):
        result, example = result
        example = example if isinstance(example, tuple) else (example,)
    if not isinstance(result, nn.Module):
        raise UnknownModelError(
            f"{reference!r} returned {type(result).__name__}; the factory must return an "
            "nn.Module, or (nn.Module, example_inputs)")
    return LoadedModel(model_label(reference), result, "custom", example=example)


def model_label(name: str) -> str:
    """The name :func:`load_model` gives the model ``name`` refers to, without loading it
    (``"minilm"``, a folder's last component, ``"file.py:factory"``); for default paths."""
    key = name.lower()
    if key in BUILTINS:
        return key
    if ":" in name and name.rpartition(":")[0].endswith(".py"):
        file_part, _, factory_name = name.rpartition(":")
        return f"{Path(file_part).name}:{factory_name}"
    return Path(name).name


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else "(no message)"


def load_model(name: str) -> LoadedModel:
    """Resolve ``name``: a built-in (see :data:`BUILTINS`), a local transformers model folder,
    a folder written by ``leantorch compress`` (``model.safetensors`` with a leantorch header),
    or ``path/to/file.py:factory`` (a function returning an ``nn.Module`` or
    ``(nn.Module, example_inputs)``)."""
    if not isinstance(name, str) or not name:
        raise UnknownModelError(f"model name must be a non-empty string, got {describe(name)}")
    key = name.lower()
    if key in BUILTINS:
        return BUILTINS[key][1]()
    if ":" in name and name.rpartition(":")[0].endswith(".py"):
        return _from_factory(name)
    path = Path(name)
    if path.is_dir():
        from leantorch.serialize import MODEL_FILE, is_leantorch_file

        has_config = (path / "config.json").is_file()
        saved = path / MODEL_FILE
        # without a config.json, a model.safetensors can only be leantorch's: read_header then
        # says precisely what is wrong with it
        if saved.is_file() and (not has_config or is_leantorch_file(saved)):
            return _from_saved(path)
        if not has_config:
            raise UnknownModelError(f"folder {name!r} has no config.json, so it is not a "
                                    f"transformers model folder, and no {MODEL_FILE}, so it "
                                    "was not written by leantorch compress")
        return _from_folder(path)
    raise UnknownModelError(
        f"unknown model {name!r}; accepted: a built-in name ({', '.join(BUILTINS)}), a local "
        "transformers model folder, a folder written by leantorch compress, or "
        "path/to/file.py:factory"
    )
