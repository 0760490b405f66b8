"""``leantorch.save`` / ``leantorch.load``: one safetensors file that round-trips any compressed
model bit-exactly.

The file holds every tensor of the state dict (each storage once: tied weights stay tied) and,
in the safetensors metadata, a small JSON that says how to rebuild the modules before the
tensors are loaded into them:

1. ``base``: the architecture to build first (a transformers model from its config, a
   registered leantorch module from its spec, torch's own layers and containers);
2. ``steps``: structural edits recorded by transforms, replayed in order
   (:func:`record_step`, :func:`register_step`);
3. ``overrides``: modules that still differ from what 1-2 build (a Linear replaced by an int8
   one, a factorised layer, a pruned shape) with the architecture to build in their place;
4. ``parametrizations``: masks and other ``torch.nn.utils.parametrize`` entries to re-register.

A module class of your own joins in with :func:`register_module` (``spec()`` returns its
constructor arguments, ``from_spec(spec)`` builds it). A model whose base leantorch cannot
build (your own top-level class) still saves; load it with ``load(path, model=skeleton)``.

Every registered class and step is saved with the Python module that defines it
(``"module": "leantorch.compress.quant.modules"``), and :func:`load` imports that module when
the name is not registered yet, so a fresh interpreter loads any file without the user
importing anything. Files written before the module was recorded name leantorch's own classes
only by their registered name; :data:`_KNOWN_MODULES` leads those names to their module.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from leantorch.errors import LeanError, LeanTypeError, describe
from leantorch.io import atomic_write_bytes

__all__ = [
    "FORMAT_VERSION",
    "MODEL_FILE",
    "architecture",
    "build",
    "is_leantorch_file",
    "load",
    "model_file",
    "read_header",
    "record_step",
    "register_module",
    "register_step",
    "save",
]

FORMAT_VERSION = 1
_METADATA_KEY = "leantorch"
_MODULES: dict[str, type[nn.Module]] = {}
_STEPS: dict[str, Callable[..., None]] = {}
_BASE_ATTR = "_leantorch_base_architecture"
_STEPS_ATTR = "_leantorch_steps"
_HEADER_KEYS: dict[str, type] = {"base": dict, "steps": list, "overrides": dict,
                                 "parametrizations": list, "aliases": dict}

# Where leantorch's own registered names are defined, for files written before the header
# recorded the module (tests/test_load_anywhere.py checks this table against the registry).
_KNOWN_MODULES: dict[str, str] = {
    "leantorch.FakeQuantLinear": "leantorch.compress.quant.modules",
    "leantorch.FeedForward": "leantorch.nn.moe.experts",
    "leantorch.Float32Island": "leantorch.compress.quant.cast",
    "leantorch.Int8DynamicLinear": "leantorch.compress.quant.modules",
    "leantorch.LLMInt8Linear": "leantorch.compress.quant.modules",
    "leantorch.LowRankLinear": "leantorch.compress.lowrank",
    "leantorch.MoE": "leantorch.nn.moe.layer",
    "leantorch.Router": "leantorch.nn.moe.router",
    "leantorch.SentenceEncoder": "leantorch.models.sentence",
    "leantorch.SparseLinear": "leantorch.compress.prune.sparse_exec",
    "leantorch.StackedExperts": "leantorch.nn.moe.experts",
    "leantorch.TernaryLinear": "leantorch.compress.quant.modules",
    "leantorch.WeightMask": "leantorch.compress.prune.masks",
    "leantorch.WeightOnlyLinear": "leantorch.compress.quant.modules",
    "leantorch.ZeroBranch": "leantorch.compress.prune.sublayers",
}
_KNOWN_STEP_MODULES: dict[str, str] = {
    "prune.resize": "leantorch.compress.prune.layers",
    "quant.autocast": "leantorch.compress.quant.cast",
    "quant.cast": "leantorch.compress.quant.cast",
}


# --------------------------------------------------------------------------- registries
def register_module(cls: type[nn.Module] | None = None, *, name: str | None = None) -> Any:
    """Class decorator: make a module class saveable. The class implements
    ``spec(self) -> dict`` (JSON-able constructor arguments; a child module may be described
    with :func:`architecture`) and ``from_spec(cls, spec) -> instance`` (a classmethod; when
    absent, ``cls(**spec)`` is used)."""

    def register(klass: type[nn.Module]) -> type[nn.Module]:
        if not (isinstance(klass, type) and issubclass(klass, nn.Module)):
            raise LeanTypeError(f"register_module: expected an nn.Module subclass, got "
                                f"{describe(klass)}")
        if not callable(getattr(klass, "spec", None)):
            raise LeanTypeError(f"register_module: {klass.__name__} needs a spec() method "
                                "returning its constructor arguments")
        _MODULES[name or f"{klass.__module__}.{klass.__qualname__}"] = klass
        klass._leantorch_name = name or f"{klass.__module__}.{klass.__qualname__}"
        return klass

    return register if cls is None else register(cls)


def register_step(name: str, fn: Callable[..., None] | None = None) -> Any:
    """Register a structural edit ``fn(model, **args)`` that :func:`load` can replay."""

    def register(f: Callable[..., None]) -> Callable[..., None]:
        _STEPS[name] = f
        return f

    return register if fn is None else register(fn)


def record_step(model: nn.Module, name: str, **args: Any) -> None:
    """Note on ``model`` (a transform's output) that structural edit ``name`` was applied with
    ``args`` (JSON-able), so :func:`save` can tell :func:`load` to replay it. The architecture
    before the first recorded edit is remembered as the base to replay on."""
    if name not in _STEPS:
        raise LeanError(f"record_step: {name!r} is not a registered step; known: "
                        f"{', '.join(sorted(_STEPS)) or 'none'}")
    if _STEPS_ATTR not in model.__dict__:
        model.__dict__[_BASE_ATTR] = architecture(model)
        model.__dict__[_STEPS_ATTR] = []
    json.dumps(args)  # fail now, not at save time, on arguments that cannot be stored
    model.__dict__[_STEPS_ATTR].append({"step": name, "args": args,
                                        "module": _STEPS[name].__module__})


# --------------------------------------------------------------------------- architectures
def _torch_spec(module: nn.Module) -> dict[str, Any] | None:
    """Constructor arguments of torch's own layers (None when not one of them)."""
    m = module
    if type(m) is nn.Linear:
        return {"in_features": m.in_features, "out_features": m.out_features,
                "bias": m.bias is not None}
    if type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                   nn.ConvTranspose3d):
        spec = {"in_channels": m.in_channels, "out_channels": m.out_channels,
                "kernel_size": list(m.kernel_size), "stride": list(m.stride),
                "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
                "dilation": list(m.dilation), "groups": m.groups, "bias": m.bias is not None,
                "padding_mode": m.padding_mode}
        if m.transposed:
            spec["output_padding"] = list(m.output_padding)
        return spec
    if type(m) is nn.Embedding:
        return {"num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim,
                "padding_idx": m.padding_idx}
    if type(m) is nn.LayerNorm:
        return {"normalized_shape": list(m.normalized_shape), "eps": m.eps,
                "elementwise_affine": m.elementwise_affine, "bias": m.bias is not None}
    if type(m) is nn.RMSNorm:
        return {"normalized_shape": list(m.normalized_shape), "eps": m.eps,
                "elementwise_affine": m.elementwise_affine}
    if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        return {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum,
                "affine": m.affine, "track_running_stats": m.track_running_stats}
    if type(m) is nn.GroupNorm:
        return {"num_groups": m.num_groups, "num_channels": m.num_channels, "eps": m.eps,
                "affine": m.affine}
    if type(m) in (nn.Dropout, nn.Dropout1d, nn.Dropout2d):
        return {"p": m.p}
    if type(m) is nn.GELU:
        return {"approximate": m.approximate}
    if type(m) in (nn.Softmax, nn.LogSoftmax):
        return {"dim": m.dim}
    if type(m) is nn.Flatten:
        return {"start_dim": m.start_dim, "end_dim": m.end_dim}
    if type(m) is nn.Hardtanh:
        return {"min_val": m.min_val, "max_val": m.max_val}
    if type(m) in (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Hardswish,
                   nn.Hardsigmoid, nn.Mish):
        return {}
    if type(m) in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d):
        size = m.output_size
        return {"output_size": list(size) if isinstance(size, tuple) else size}
    return None


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _is_transformers(module: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel"
               for c in type(module).__mro__)


def architecture(module: nn.Module) -> dict[str, Any]:
    """How to build ``module`` again with fresh weights, as JSON-able data (``kind``: leantorch,
    transformers, torch, container, or unknown). Parametrizations are not part of it."""
    module = _unparametrized(module)
    name = getattr(type(module), "_leantorch_name", None)
    if name is not None and _MODULES.get(name) is type(module):
        return {"kind": "leantorch", "class": name, "module": type(module).__module__,
                "spec": module.spec()}
    if _is_transformers(module):
        return {"kind": "transformers", "class": type(module).__name__,
                "config": module.config.to_dict()}
    spec = _torch_spec(module)
    if spec is not None:
        return {"kind": "torch", "class": type(module).__name__, "spec": spec}
    if type(module) in _CONTAINERS:
        return {"kind": "container", "class": type(module).__name__,
                "children": {n: architecture(c) for n, c in module.named_children()}}
    return {"kind": "unknown", "class": f"{type(module).__module__}.{type(module).__qualname__}"}


def buildable(arch: dict[str, Any]) -> bool:
    if arch.get("kind") == "container":
        return all(buildable(a) for a in arch.get("children", {}).values())
    return arch.get("kind") != "unknown"


def build(arch: dict[str, Any]) -> nn.Module:
    """The module ``arch`` (from :func:`architecture`) describes, with fresh weights."""
    kind = arch.get("kind")
    if kind == "leantorch":
        cls = _registered(_MODULES, "module class", arch.get("class"), arch.get("module"),
                          _KNOWN_MODULES)
        from_spec = getattr(cls, "from_spec", None)
        return from_spec(arch["spec"]) if from_spec is not None else cls(**arch["spec"])
    if kind == "transformers":
        try:
            import transformers
        except ImportError as error:
            raise LeanError("this model was saved from transformers: pip install "
                            "'leantorch[hf]' to load it") from error
        config = dict(arch["config"])
        model_type = config.pop("model_type")
        cfg = transformers.AutoConfig.for_model(model_type, **config)
        return getattr(transformers, arch["class"])(cfg)
    if kind == "torch":
        spec = dict(arch["spec"])
        for key in ("kernel_size", "stride", "dilation", "output_padding"):
            if isinstance(spec.get(key), list):
                spec[key] = tuple(spec[key])
        if isinstance(spec.get("padding"), list):
            spec["padding"] = tuple(spec["padding"])
        if isinstance(spec.get("output_size"), list):
            spec["output_size"] = tuple(spec["output_size"])
        return getattr(nn, arch["class"])(**spec)
    if kind == "container":
        children = {n: build(a) for n, a in arch["children"].items()}
        if arch["class"] == "ModuleDict":
            return nn.ModuleDict(children)
        if arch["class"] == "ModuleList":
            return nn.ModuleList(children[str(i)] for i in range(len(children)))
        container = nn.Sequential()
        for n, child in children.items():
            container.add_module(n, child)
        return container
    raise LeanError(f"cannot build a module of class {arch.get('class')!r}: leantorch does not "
                    "know how to construct it; pass load(path, model=skeleton)")


_DOTTED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _registered(registry: dict[str, Any], what: str, name: Any, module_name: Any,
                known: dict[str, str]) -> Any:
    """``registry[name]``, importing the module that registers ``name`` first when needed: the
    module the header names, else leantorch's own table (files written before headers named
    it), else the name's dotted prefix (a class registered under its default
    ``module.QualName`` name). Only a module name is ever taken from the file, never code."""
    if not isinstance(name, str) or not name:
        raise LeanError(f"load: the header names a {what} {describe(name)}; expected a "
                        "non-empty string (is the file corrupt?)")
    if name in registry:
        return registry[name]
    hint = ("import the module that defines and registers it before leantorch.load, or pass "
            "load(path, model=<a fresh instance>) built by your own code")
    if module_name is None and name not in known:
        # An older file naming a class of the user's: its default name is module.QualName.
        guess = name.rpartition(".")[0]
        if _importable(guess):
            with contextlib.suppress(Exception):  # a guess: the error below says what is missing
                importlib.import_module(guess)
        if name not in registry:
            raise LeanError(f"load: {what} {name!r} is not registered and the file does not "
                            f"say which module defines it: {hint}")
        return registry[name]
    if module_name is None:
        module_name = known[name]
    if not isinstance(module_name, str) or not _DOTTED_NAME.fullmatch(module_name):
        raise LeanError(f"load: {what} {name!r} names its defining module as "
                        f"{describe(module_name)}, which is not a dotted Python module name "
                        "(letters, digits, '_' and '.'); refusing to import it")
    if not _importable(module_name):
        raise LeanError(f"load: {what} {name!r} was registered in {module_name!r}, which "
                        f"leantorch will not import for you: {hint}")
    try:
        importlib.import_module(module_name)  # classes and steps register when imported
    except Exception as error:
        raise LeanError(f"load: {what} {name!r} is defined in module {module_name!r}, which "
                        f"cannot be imported ({type(error).__name__}: {error}): {hint}"
                        ) from error
    if name not in registry:
        raise LeanError(f"load: {what} {name!r} is not registered (importing {module_name!r} "
                        f"did not register it): {hint}")
    return registry[name]


def _importable(module_name: str) -> bool:
    """Whether leantorch may import ``module_name`` on a file's word: a dotted name, and not a
    script (``__main__``) or the standard library, where no registered class can live."""
    return (bool(_DOTTED_NAME.fullmatch(module_name)) and module_name != "__main__" and
            module_name.partition(".")[0] not in sys.stdlib_module_names)


# --------------------------------------------------------------------------- diffs
def _signature(module: nn.Module) -> tuple[Any, ...]:
    """Class, own tensor names and shapes, child names: what a rebuilt module must match.
    Dtypes are left out: loading assigns the saved tensors with their own dtypes."""
    tensors = [(n, tuple(t.shape)) for n, t in
               list(module.named_parameters(recurse=False)) +
               list(module.named_buffers(recurse=False)) if t is not None]
    return type(module), tuple(sorted(tensors)), tuple(n for n, _ in module.named_children())


def _overrides(model: nn.Module, skeleton: nn.Module | None) -> dict[str, dict[str, Any]]:
    """Modules of ``model`` that ``skeleton`` (the rebuilt base) does not already have, as
    architectures to build in their place; top-down, outermost first. Without a skeleton (a base
    leantorch cannot build) every outermost buildable module is described."""
    found: dict[str, dict[str, Any]] = {}

    def visit(module: nn.Module, other: nn.Module | None, path: str) -> None:
        plain = _unparametrized(module)
        other_plain = None if other is None else _unparametrized(other)
        if other_plain is not None and _signature(plain) == _signature(other_plain):
            reference: nn.Module | None = other_plain
        else:
            arch = architecture(plain)
            if buildable(arch):
                found[path] = arch
                reference = build_on_meta(arch)
            elif skeleton is None:
                reference = None
            else:
                raise LeanError(
                    f"cannot save the module at {path or '(model)'} "
                    f"({type(plain).__name__}): it differs from the rebuilt base and leantorch "
                    "cannot construct it; register its class with "
                    "leantorch.serialize.register_module, or record the edit with record_step")
        for name, child in plain.named_children():
            visit(child, None if reference is None else getattr(reference, name, None),
                  _join(path, name))

    visit(model, skeleton, "")
    return found


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _unparametrized(module: nn.Module) -> nn.Module:
    """The module as its own class, parametrizations hidden (they are saved apart): a shallow
    view sharing the module's tensors, with each parametrized tensor's ``original``."""
    if not parametrize.is_parametrized(module):
        return module
    view = object.__new__(type(module).__bases__[0])  # parametrize subclasses the module's class
    view.__dict__.update(module.__dict__)
    view._modules = {k: v for k, v in module._modules.items() if k != "parametrizations"}
    view._parameters = dict(module._parameters)
    for name, entry in module.parametrizations.items():
        view._parameters[name] = entry.original
    return view


def build_on_meta(arch: dict[str, Any]) -> nn.Module:
    """Build cheaply (no memory, no initialisation cost) when possible."""
    try:
        with torch.device("meta"):
            return build(arch)
    except Exception:
        return build(arch)


def _parametrizations(model: nn.Module) -> list[dict[str, Any]]:
    entries = []
    for path, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name, plist in module.parametrizations.items():
            for p in plist:
                arch = architecture(p)
                if not buildable(arch):
                    raise LeanError(f"cannot save the parametrization {type(p).__name__} on "
                                    f"{path}.{tensor_name}: register its class with "
                                    "leantorch.serialize.register_module")
                entries.append({"path": path, "tensor": tensor_name, "parametrization": arch})
    return entries


# --------------------------------------------------------------------------- save / load
def _base_and_steps(model: nn.Module) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    if _STEPS_ATTR in model.__dict__:
        return model.__dict__[_BASE_ATTR], list(model.__dict__[_STEPS_ATTR])
    return architecture(_unparametrized(model)), []


def _skeleton(base: dict[str, Any], steps: list[dict[str, Any]], meta: bool) -> nn.Module:
    model = build_on_meta(base) if meta else build(base)
    _replay(model, steps)
    return model


def _replay(model: nn.Module, steps: list[dict[str, Any]]) -> None:
    """Apply the recorded structural edits to ``model`` in order."""
    for step in steps:
        if not isinstance(step, dict) or not isinstance(step.get("args", {}), dict):
            raise LeanError(f"load: a recorded step is malformed: {describe(step)}; expected "
                            "{'step': name, 'args': {...}}")
        fn = _registered(_STEPS, "structural step", step.get("step"), step.get("module"),
                         _KNOWN_STEP_MODULES)
        fn(model, **step.get("args", {}))


def save(model: nn.Module, path: str | os.PathLike[str],
         metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``path`` (one ``.safetensors`` file, atomically)."""
    if not isinstance(model, nn.Module):
        raise LeanTypeError(f"save: model must be a torch.nn.Module, got {type(model).__name__}")
    from safetensors.torch import save as save_tensors

    base, steps = _base_and_steps(model)
    skeleton = _skeleton(base, steps, meta=True) if buildable(base) else None
    overrides = _overrides(model, skeleton)
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype], str] = {}
    for key, tensor in state.items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                    tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if identity in seen and identity[0] != 0:
            aliases[key] = seen[identity]
            continue
        seen[identity] = key
        tensors[key] = tensor.detach().contiguous().cpu()
    header = {
        "format": "leantorch",
        "format_version": FORMAT_VERSION,
        "base": base,
        "steps": steps,
        "overrides": overrides,
        "parametrizations": _parametrizations(model),
        "aliases": aliases,
        "training": model.training,
        "metadata": metadata or {},
    }
    try:
        blob = save_tensors(tensors, metadata={_METADATA_KEY: json.dumps(header)})
    except RuntimeError as error:  # e.g. overlapping views that are not identical
        raise LeanError(f"save: the state dict cannot be written: {error}") from error
    return atomic_write_bytes(path, blob)


MODEL_FILE = "model.safetensors"


def model_file(path: str | os.PathLike[str]) -> Path:
    """The saved model file ``path`` names: the file itself, or ``path/model.safetensors`` for
    a folder (what ``leantorch compress`` writes)."""
    path = Path(path)
    if path.is_dir():
        inside = path / MODEL_FILE
        if not inside.is_file():
            found = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
            shown = ", ".join(found[:10]) + (f", ... ({len(found)} entries)"
                                              if len(found) > 10 else "")
            raise LeanError(f"load: folder {str(path)!r} has no {MODEL_FILE} (found: "
                            f"{shown or 'nothing'}); pass the .safetensors file itself or a "
                            "folder written by leantorch compress")
        return inside
    if not path.is_file():
        raise LeanError(f"load: no file at {str(path)!r}")
    return path


def is_leantorch_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a safetensors file with a leantorch header (False for any other
    file, readable or not)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return _METADATA_KEY in (handle.metadata() or {})
    except Exception:  # not safetensors, truncated, unreadable: not one of ours to read
        return False


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON header of a saved model (checked for format, version and the keys
    :func:`load` needs). ``path``: the file, or a folder holding ``model.safetensors``."""
    path = model_file(path)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:
        raise LeanError(f"load: {str(path)!r} is not a readable safetensors file (corrupt or "
                        f"truncated?): {error}") from error
    if _METADATA_KEY not in metadata:
        raise LeanError(f"load: {str(path)!r} is a safetensors file but was not written by "
                        "leantorch.save (no leantorch header)")
    try:
        header = json.loads(metadata[_METADATA_KEY])
    except json.JSONDecodeError as error:
        raise LeanError(f"load: the leantorch header of {str(path)!r} is corrupt") from error
    if not isinstance(header, dict) or "format_version" not in header:
        raise LeanError(f"load: {str(path)!r} is not a leantorch file: its header lacks "
                        "format_version")
    version = header["format_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise LeanError(f"load: {str(path)!r} has format version {describe(version)}, which is "
                        f"not a leantorch format version (1 to {FORMAT_VERSION}); the file is "
                        "corrupt or was not written by leantorch.save")
    if version > FORMAT_VERSION:
        raise LeanError(f"load: {str(path)!r} has format version {version}; this leantorch "
                        f"reads versions up to {FORMAT_VERSION}: upgrade leantorch")
    for key, kind in _HEADER_KEYS.items():
        if key not in header:
            raise LeanError(f"load: the leantorch header of {str(path)!r} lacks the key "
                            f"{key!r} (it has: {', '.join(sorted(header))}); the file is "
                            "corrupt or was not written by leantorch.save")
        if not isinstance(header[key], kind):
            raise LeanError(f"load: the leantorch header of {str(path)!r} has {key!r} = "
                            f"{describe(header[key])}; expected a {kind.__name__}")
    return header


def load(path: str | os.PathLike[str], model: nn.Module | None = None) -> nn.Module:
    """Rebuild the model saved at ``path`` (a ``.safetensors`` file, or a folder holding
    ``model.safetensors`` such as ``leantorch compress`` writes). ``model``: a freshly built
    base model (same architecture as before any transform) when leantorch cannot build the
    base itself. The classes the file names are imported as needed: nothing has to be imported
    first."""
    from safetensors.torch import load_file

    path = model_file(path)
    header = read_header(path)
    if model is not None:
        if not isinstance(model, nn.Module):
            raise LeanTypeError(f"load: model must be an nn.Module skeleton, got "
                                f"{type(model).__name__}")
        target = model
        _replay(target, header["steps"])
    elif buildable(header["base"]):
        target = _skeleton(header["base"], header["steps"], meta=False)
    else:
        raise LeanError(f"load: the base model ({header['base'].get('class')}) is not a class "
                        "leantorch can build; pass load(path, model=<a fresh instance>)")
    for module_path, arch in sorted(header["overrides"].items(), key=lambda kv: kv[0].count(".")):
        new = build(arch)
        if module_path:
            # torch's own setter, not compress.change.replace_module: serialize sits below
            # compress and must not import it
            try:
                target.set_submodule(module_path, new, strict=True)
            except AttributeError as error:
                raise LeanError(f"load: the file replaces the module at {module_path!r}, which "
                                f"{type(target).__name__} does not have") from error
        else:
            target = new
    for entry in header["parametrizations"]:
        module = target.get_submodule(entry["path"])
        parametrize.register_parametrization(module, entry["tensor"],
                                             build(entry["parametrization"]), unsafe=True)
    try:
        tensors = load_file(str(path))
    except Exception as error:
        raise LeanError(f"load: the tensors of {str(path)!r} cannot be read (corrupt or "
                        f"truncated?): {error}") from error
    for key, source in header["aliases"].items():
        tensors[key] = tensors[source]
    try:
        target.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as error:
        detail = " ".join(line.strip() for line in str(error).splitlines()[:3])
        raise LeanError(f"load: the saved tensors do not fit the rebuilt model: {detail}") \
            from error
    _retie(target, header["aliases"])
    target.train(header.get("training", False))
    return target


def _retie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Make tied parameters the same Parameter object again (assign=True split them)."""
    for key, source in aliases.items():
        owner_path, _, name = key.rpartition(".")
        source_path, _, source_name = source.rpartition(".")
        owner, source_owner = model.get_submodule(owner_path), model.get_submodule(source_path)
        value = getattr(source_owner, source_name)
        if isinstance(value, nn.Parameter) and name in owner._parameters:
            owner._parameters[name] = value
