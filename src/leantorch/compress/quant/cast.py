"""Lower-precision casts: ``quant.bf16``, ``quant.fp16`` and ``quant.autocast``.

``bf16`` / ``fp16`` store the selected floating parameters and buffers in bfloat16 / float16
and run them in that dtype, except for **float32 islands**: modules whose arithmetic loses too
much in 8 (bf16) or 11 (fp16) significant bits. An island keeps its tensors in float32 and is
wrapped in :class:`Float32Island`, which casts its floating inputs up to float32 and its
floating outputs back down to the compute dtype. The default islands
(:data:`DEFAULT_ISLANDS`) are the normalisation layers (a mean and a variance over hundreds
of values: LayerNorm, RMSNorm, GroupNorm, BatchNorm and transformers' ``*RMSNorm`` /
``*LayerNorm`` classes) and softmax modules. Around the model the transform adds a boundary:
floating inputs are cast to the compute dtype, floating outputs back to float32, so callers and
``verify`` get float32.

Attention scores: in transformers models the softmax is a function call inside the attention,
not a module, so it cannot be an island. On a CPU, torch's ``scaled_dot_product_attention``
kernel for bf16/fp16 inputs (the flash-attention kernel) computes ``q k^T``, the scale, the
mask, the running max, ``exp`` and the row sums in float32; only the unnormalised
probabilities ``exp(s - max)`` are rounded to the input dtype before the ``P V`` product,
which again accumulates in float32, and the output is rounded once. Its error is therefore
at most about ``2u (P |V|)`` (``u`` the unit roundoff: 2**-8 for bf16, 2**-11 for fp16),
whatever the size of the scores (``tests/compress/quant/test_cast.py`` checks this bound).
BERT's eager path instead rounds the scores themselves to bf16, an error that grows with the
scores' magnitude. So ``attention="sdpa"`` (the default) switches transformers models that run
eager attention to sdpa where they support it; the Change says which path every transformers
model takes. leantorch's own ``Attention`` ("exact" kind) already calls sdpa.

Pooling: :class:`leantorch.models.SentenceEncoder` pools and normalises in float32 whatever the
dtype of its encoder, so a cast sentence encoder averages bf16 hidden states in float32.

Layers that hold integer tensors (int8 / int4 quantized Linears) and layers that ``include`` /
``exclude`` leave out keep float32 and become islands too, so a partly cast model still runs.

``autocast`` instead keeps every weight in float32 and runs the model's forward under
``torch.autocast(device_type, dtype)`` (matmuls and convolutions in the lower dtype, the rest
in float32), outputs cast to float32.

Both kinds are saved and loaded by :mod:`leantorch.serialize`: the islands and the boundary are
recorded as a structural step (``quant.cast`` / ``quant.autocast``) that :func:`leantorch.load`
replays, and the tensors keep their saved dtypes.
"""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from leantorch.compress.change import Change, _patterns, apply_transform, replace_module
from leantorch.compress.registry import register_transform
from leantorch.errors import LeanError, LeanTypeError, describe
from leantorch.serialize import (
    architecture,
    build,
    record_step,
    register_module,
    register_step,
)
from leantorch.validate import one_of

__all__ = [
    "DEFAULT_ISLANDS",
    "Float32Island",
    "autocast",
    "bf16",
    "fp16",
    "precision",
]

Patterns = str | Sequence[str] | None

#: Island patterns used when ``islands`` is None; each is an ``fnmatch`` glob matched against a
#: module's class name and against its dotted path. ``"*Norm"`` covers LayerNorm, RMSNorm,
#: GroupNorm, SyncBatchNorm and transformers' ``LlamaRMSNorm`` / ``T5LayerNorm`` ...;
#: ``"*Norm[123]d"`` BatchNorm1d-3d, InstanceNorm1d-3d and timm's ``LayerNorm2d``.
DEFAULT_ISLANDS = ("*Norm", "*Norm[123]d", "Softmax", "Softmax2d", "LogSoftmax")

# the names a user may give, and the dtype each means
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_LOW = (torch.bfloat16, torch.float16)
_PRECISION_ATTR = "_leantorch_precision"
_ATTENTION = ("sdpa", "keep")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_dtype(owner: str, value: Any) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in _LOW:
        return value
    if isinstance(value, str) and value in _DTYPES:
        return _DTYPES[value]
    raise LeanError(f"{owner}: dtype={describe(value)}; expected 'bfloat16' or 'float16' "
                    "(or torch.bfloat16 / torch.float16)")


def precision(model: nn.Module) -> dict[str, str] | None:
    """What a cast or autocast transform did to ``model`` (``{"transform", "dtype"}``, plus
    ``device_type`` for autocast), or None for a model neither touched."""
    value = model.__dict__.get(_PRECISION_ATTR)
    return None if value is None else dict(value)


# --------------------------------------------------------------------------- tensor maps
def _to_float32(value: Any) -> Any:
    """Every bf16/fp16 tensor in ``value`` (nested tuples, lists, dicts, transformers
    ModelOutputs) as float32; other tensors and objects as they are."""
    return tree_map_only(torch.Tensor,
                         lambda t: t.float() if t.dtype in _LOW else t, value)


def _to_dtype(value: Any, dtype: torch.dtype) -> Any:
    """Every floating tensor in ``value`` as ``dtype`` (integer and bool tensors untouched)."""
    return tree_map_only(torch.Tensor,
                         lambda t: t.to(dtype) if t.is_floating_point() else t, value)


# --------------------------------------------------------------------------- island module
@register_module(name="leantorch.Float32Island")
class Float32Island(nn.Module):
    """Runs ``module`` (whose tensors are float32) in float32 inside a lower-precision model.

    forward(*args, **kwargs): every bf16/fp16 tensor argument is cast to float32, ``module``
    runs, and every floating tensor it returns is cast to ``compute_dtype`` ("bfloat16" or
    "float16"), the dtype of the layers around it. Shapes are the wrapped module's. Attributes
    the wrapper does not have (``weight``, ``eps``, ``normalized_shape``...) are read from the
    wrapped module."""

    def __init__(self, module: nn.Module, compute_dtype: str = "bfloat16") -> None:
        super().__init__()
        self.module = module
        self.compute_dtype = _dtype_name(_check_dtype("Float32Island", compute_dtype))

    def spec(self) -> dict[str, Any]:
        """``{"module": the wrapped module's architecture (a nested spec), "compute_dtype": the
        dtype name outputs are cast back to}``."""
        return {"module": architecture(self.module), "compute_dtype": self.compute_dtype}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Float32Island:
        """Rebuild the island from :meth:`spec`'s dict (the wrapped module with fresh weights)."""
        return cls(build(spec["module"]), spec["compute_dtype"])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped module with every bf16/fp16 tensor argument cast to float32 and cast its
        floating outputs to ``compute_dtype``; shapes are the wrapped module's."""
        args, kwargs = _to_float32(args), _to_float32(kwargs)
        return _to_dtype(self.module(*args, **kwargs), _DTYPES[self.compute_dtype])

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # code around a norm may read norm.weight / norm.eps directly
            inner = self.__dict__.get("_modules", {}).get("module")
            if inner is None:  # half-built (copy, unpickling): no fallback yet
                raise
            return getattr(inner, name)

    def extra_repr(self) -> str:
        return f"float32 inside a {self.compute_dtype} model"


# --------------------------------------------------------------------------- boundaries
class _CastBoundary:
    """Forward hooks of a cast model's top module: floating inputs to the compute dtype,
    bf16/fp16 outputs to float32 (objects of this class deep-copy and pickle)."""

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype

    def before(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
               ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        dtype = _DTYPES[self.dtype]
        return _to_dtype(args, dtype), _to_dtype(kwargs, dtype)

    def after(self, _module: nn.Module, _args: Any, output: Any) -> Any:
        return _to_float32(output)


class _AutocastBoundary:
    """Forward hooks that run the top module under ``torch.autocast``: the pre-hook enters
    the context, the forward hook (``always_call``, so also when the forward raises) leaves
    it and casts bf16/fp16 outputs to float32. A stack per thread allows nested calls."""

    def __init__(self, device_type: str, dtype: str) -> None:
        self.device_type, self.dtype = device_type, dtype
        self._local = threading.local()

    def _stack(self) -> list[Any]:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def before(self, _module: nn.Module, _args: Any) -> None:
        context = torch.autocast(self.device_type, dtype=_DTYPES[self.dtype])
        context.__enter__()
        self._stack().append(context)

    def after(self, _module: nn.Module, _args: Any, output: Any) -> Any:
        stack = self._stack()
        if stack:
            stack.pop().__exit__(None, None, None)
        return _to_float32(output)

    # threading.local neither deep-copies nor pickles: a copy starts with no open context
    def __getstate__(self) -> dict[str, Any]:
        return {"device_type": self.device_type, "dtype": self.dtype}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["device_type"], state["dtype"])


def _check_not_cast(owner: str, model: nn.Module) -> None:
    done = model.__dict__.get(_PRECISION_ATTR)
    if done is not None:
        raise LeanError(f"{owner}: the model was already changed by {done['transform']} "
                        f"({done['dtype']}); apply one precision transform to the float32 "
                        "model")


@register_step("quant.cast")
def _replay_cast(model: nn.Module, dtype: str, islands: list[str], transform: str) -> None:
    """Wrap the island paths and add the boundary hooks (tensors come after, with their saved
    dtypes)."""
    for path in islands:
        replace_module(model, path, Float32Island(model.get_submodule(path), dtype))
    boundary = _CastBoundary(dtype)
    model.register_forward_pre_hook(boundary.before, with_kwargs=True)
    model.register_forward_hook(boundary.after)
    model.__dict__[_PRECISION_ATTR] = {"transform": transform, "dtype": dtype}


@register_step("quant.autocast")
def _replay_autocast(model: nn.Module, device_type: str, dtype: str) -> None:
    boundary = _AutocastBoundary(device_type, dtype)
    model.register_forward_pre_hook(boundary.before)
    model.register_forward_hook(boundary.after, always_call=True)
    model.__dict__[_PRECISION_ATTR] = {"transform": "quant.autocast", "dtype": dtype,
                                       "device_type": device_type}


# --------------------------------------------------------------------------- planning
def _island_patterns(islands: Patterns) -> tuple[list[str], list[str]]:
    """(all patterns, the ones the user named): ``None`` means :data:`DEFAULT_ISLANDS`; an
    entry ``"default"`` in a list stands for them too, so ``["default", "*classifier*"]``
    adds one and ``["*Norm"]`` keeps fewer."""
    if islands is None:
        return list(DEFAULT_ISLANDS), []
    given = _patterns("islands", islands)
    assert given is not None
    for pattern in given:
        if not pattern:
            raise LeanError("islands: an empty pattern matches nothing; give fnmatch globs "
                            "over module class names or paths, e.g. '*Norm' or 'pooler'")
    named = [p for p in given if p != "default"]
    expanded = [p for p in given if p != "default"]
    if "default" in given:
        expanded += list(DEFAULT_ISLANDS)
    return expanded, named


def _matches(path: str, module: nn.Module, patterns: Sequence[str]) -> str | None:
    """The first pattern matching the module's class name or path."""
    cls = type(module).__name__
    for pattern in patterns:
        if fnmatch.fnmatchcase(cls, pattern) or (path and fnmatch.fnmatchcase(path, pattern)):
            return pattern
    return None


def _selected(path: str, includes: list[str] | None, excludes: list[str]) -> bool:
    if includes is not None and not any(fnmatch.fnmatchcase(path, p) for p in includes):
        return False
    return not any(fnmatch.fnmatchcase(path, p) for p in excludes)


def _own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, is_parameter) of the module's own floating tensors."""
    found = [(n, t, True) for n, t in module._parameters.items() if t is not None]
    found += [(n, t, False) for n, t in module._buffers.items() if t is not None]
    return [(n, t, p) for n, t, p in found if t.is_floating_point()]


def _holds_integers(module: nn.Module) -> bool:
    return any(t is not None and not t.is_floating_point() for t in module._parameters.values())


def _has_selected_descendant(module: nn.Module, path: str, includes: list[str] | None,
                             excludes: list[str]) -> bool:
    return any(_selected(f"{path}.{sub}" if path else sub, includes, excludes)
               for sub, _ in module.named_modules() if sub)


def _plan(model: nn.Module, island_patterns: list[str], includes: list[str] | None,
          excludes: list[str]) -> tuple[dict[str, str], list[str]]:
    """({island path: why it stays float32}, [paths whose own tensors are cast]).

    Top-down: an island's whole subtree stays float32. A module whose own floating tensors are
    not selected by include/exclude becomes an island too (its neighbours are cast, so it must
    convert), as does one holding integer parameters (a quantized layer computes in float32)."""
    islands: dict[str, str] = {}
    cast: list[str] = []

    def visit(module: nn.Module, path: str) -> None:
        if path:  # the top module cannot be wrapped: its boundary is the hooks
            pattern = _matches(path, module, island_patterns)
            if pattern is not None:
                islands[path] = f"island pattern {pattern!r}"
                return
            if _holds_integers(module):
                islands[path] = ("holds integer parameters (a quantized layer, which computes "
                                 "in float32)")
                return
        own = _own_tensors(module)
        # the top module's own tensors follow include alone (no path for a glob to match)
        selected = _selected(path, includes, excludes) if path else includes is None
        if own:
            if selected:
                cast.append(path)
            elif not path:
                names = ", ".join(n for n, _, _ in own)
                raise LeanError(f"the model itself owns floating tensors ({names}) that "
                                "include= does not select, and its forward mixes them with its "
                                "children's outputs; leave include=None and use exclude= for "
                                "the layers to keep in float32")
            else:
                islands[path] = "not selected by include/exclude: kept in float32"
                return
        elif path and not _selected(path, includes, excludes) and \
                not _has_selected_descendant(module, path, includes, excludes) and \
                any(_own_tensors(m) for m in module.modules()):
            islands[path] = "not selected by include/exclude: kept in float32"
            return
        for name, child in module.named_children():
            visit(child, f"{path}.{name}" if path else name)

    visit(model, "")
    # A tensor shared with a float32 module (tied weights) stays float32 for every owner; a
    # module turned into an island that way takes its whole subtree along (an island inside
    # an island, or a cast layer inside one, would hand the wrong dtype across).
    while True:
        kept = {id(t) for p in islands for m in model.get_submodule(p).modules()
                for _, t, _ in _own_tensors(m)}
        tied = [p for p in cast
                if any(id(t) in kept for _, t, _ in _own_tensors(model.get_submodule(p)))]
        if not tied:
            break
        if "" in tied:
            raise LeanError("the model itself shares a tensor (tied weights) with a module "
                            f"kept in float32 ({', '.join(sorted(islands))}); keep fewer "
                            "layers in float32")
        for p in tied:
            islands[p] = "shares a tensor (tied weights) with a module kept in float32"
        islands = {p: why for p, why in islands.items()
                   if not any(p.startswith(f"{q}.") for q in islands)}
        cast = [p for p in cast if p not in islands and
                not any(p.startswith(f"{q}.") for q in islands)]
    return islands, cast


def _transformers_roots(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(p, m) for p, m in model.named_modules()
            if hasattr(m, "set_attn_implementation") and hasattr(m, "config")]


def _attention_paths(model: nn.Module, attention: str) -> dict[str, str]:
    """Per transformers model inside ``model``: which attention path it runs and what that
    means for the scores (switching eager to sdpa when ``attention == "sdpa"``)."""
    said: dict[str, str] = {}
    for path, root in _transformers_roots(model):
        name = path or "(model)"
        current = getattr(root.config, "_attn_implementation", None)
        if current == "eager" and attention == "sdpa":
            if getattr(root, "_supports_sdpa", False):
                root.set_attn_implementation("sdpa")
                current = "sdpa"
                said[name] = "eager -> sdpa: "
            else:
                said[name] = (f"eager ({type(root).__name__} does not support sdpa): scores "
                              "are rounded to the compute dtype before the softmax")
                continue
        else:
            said[name] = ""
        if current == "sdpa":
            said[name] += ("sdpa: on a CPU, q k^T, mask, max, exp and row sums in float32; "
                           "probabilities rounded once before P V (float32 accumulation)")
        elif current == "eager":
            said[name] += ("eager (attention='keep'): scores are rounded to the compute dtype "
                           "before the softmax")
        else:
            said[name] += f"{current}: the kernel's own precision"
    return said


# --------------------------------------------------------------------------- transforms
def _cast(name: str, dtype: torch.dtype, model: nn.Module, include: Patterns,
          exclude: Patterns, islands: Patterns, attention: str, inplace: bool,
          example_inputs: Any) -> tuple[nn.Module, Change]:
    if not isinstance(model, nn.Module):
        raise LeanTypeError(f"{name}: model must be a torch.nn.Module, got "
                            f"{type(model).__name__}")
    one_of(name, "attention", attention, _ATTENTION)
    includes = _patterns("include", include)
    excludes = _patterns("exclude", exclude) or []
    island_patterns, named = _island_patterns(islands)
    for pattern in named:
        if not any(_matches(p, m, [pattern]) for p, m in model.named_modules() if p):
            raise LeanError(f"{name}: islands pattern {pattern!r} matches no module class name "
                            "or path of this model (e.g. '*Norm', 'LayerNorm', "
                            "'encoder.pooler')")
    _check_not_cast(name, model)
    dtype_name = _dtype_name(dtype)

    def edit(target: nn.Module, change: Change) -> None:
        island_paths, cast_paths = _plan(target, island_patterns, includes, excludes)
        change.details["attention"] = _attention_paths(target, attention)
        # recorded before the edit: the base saved is the float32 architecture
        record_step(target, "quant.cast", dtype=dtype_name, islands=sorted(island_paths),
                    transform=name)
        before = after = 0
        done: set[int] = set()
        for path in cast_paths:
            module = target.get_submodule(path)
            for tensor_name, tensor, is_parameter in _own_tensors(module):
                if id(tensor) in done or tensor.dtype == dtype:
                    continue
                done.add(id(tensor))
                before += tensor.numel() * tensor.element_size()
                if is_parameter:
                    tensor.data = tensor.data.to(dtype)  # the same Parameter: ties survive
                else:
                    module._buffers[tensor_name] = tensor.to(dtype)
                after += tensor.numel() * dtype.itemsize
            change.replaced.append(path or "(model)")
        # the hooks, the island wrappers and the marker, exactly as load replays them
        _replay_cast(target, dtype_name, sorted(island_paths), name)
        pooled = [p or "(model)" for p, m in target.named_modules()
                  if type(m).__name__ == "SentenceEncoder"]
        change.details.update({
            "dtype": dtype_name,
            "float32": {p: why for p, why in sorted(island_paths.items())},
            "tensors_cast": len(done),
            "bytes_cast_before": before,
            "bytes_cast_after": after,
            "inputs": f"floating inputs cast to {dtype_name} at the model's entry",
            "output": "floating outputs cast to float32 at the model's exit",
        })
        if pooled:
            change.details["pooling"] = {p: "mean pooling and L2 norm in float32"
                                         for p in pooled}

    return apply_transform(name, model, edit,
                           params={"include": include, "exclude": exclude, "islands": islands,
                                   "attention": attention},
                           example_inputs=example_inputs, inplace=inplace)


@register_transform("quant.bf16")
def bf16(
    model: nn.Module,
    *,
    include: Patterns = None,
    exclude: Patterns = None,
    islands: Patterns = None,
    attention: str = "sdpa",
    inplace: bool = False,
    example_inputs: Any = None,
) -> tuple[nn.Module, Change]:
    """Store and run ``model`` in bfloat16, with float32 islands.

    Args:
        include: globs over module paths selecting whose tensors are cast (default all); a
            module left out keeps float32 and runs as an island.
        exclude: globs over module paths whose tensors stay float32 (run as islands).
        islands: globs over module class names or paths of modules kept in float32 (default
            :data:`DEFAULT_ISLANDS`: norms and softmax); ``"default"`` in the list stands for
            the defaults, ``[]`` means none.
        attention: "sdpa" (default) switches transformers models running eager attention to
            sdpa (float32 scores on a CPU, see the module doc); "keep" leaves them.

    The returned model takes the same inputs (floating ones are cast at the entry) and returns
    float32. ``Change.replaced`` lists the modules whose tensors were cast,
    ``Change.details["float32"]`` every island and why.
    """
    return _cast("quant.bf16", torch.bfloat16, model, include, exclude, islands, attention,
                 inplace, example_inputs)


@register_transform("quant.fp16")
def fp16(
    model: nn.Module,
    *,
    include: Patterns = None,
    exclude: Patterns = None,
    islands: Patterns = None,
    attention: str = "sdpa",
    inplace: bool = False,
    example_inputs: Any = None,
) -> tuple[nn.Module, Change]:
    """As :func:`bf16` in float16 (11 significant bits, but a range only up to 65504: an
    activation above it becomes inf; keep such layers float32 with ``exclude`` or
    ``islands``).

    Args:
        include: globs over module paths selecting whose tensors are cast (default all).
        exclude: globs over module paths whose tensors stay float32 (run as islands).
        islands: modules kept in float32, as in :func:`bf16` (default: norms and softmax).
        attention: as in :func:`bf16`: "sdpa" (default) or "keep".
    """
    return _cast("quant.fp16", torch.float16, model, include, exclude, islands, attention,
                 inplace, example_inputs)


@register_transform("quant.autocast")
def autocast(
    model: nn.Module,
    *,
    dtype: str = "bfloat16",
    device_type: str | None = None,
    attention: str = "sdpa",
    inplace: bool = False,
    example_inputs: Any = None,
) -> tuple[nn.Module, Change]:
    """Run ``model``'s forward under ``torch.autocast(device_type, dtype)``; weights stay
    float32 (torch casts them per op: matmuls, linear and convolutions run in ``dtype``,
    reductions and norms in float32). Outputs are cast to float32.

    Args:
        dtype: "bfloat16" (default) or "float16".
        device_type: the autocast device, "cpu", "cuda" and so on (default: the device of the
            model's first parameter).
        attention: as in :func:`bf16` (under autocast an eager attention's ``q k^T`` is a
            bf16 matmul too).
    """
    name = "quant.autocast"
    if not isinstance(model, nn.Module):
        raise LeanTypeError(f"{name}: model must be a torch.nn.Module, got "
                            f"{type(model).__name__}")
    one_of(name, "attention", attention, _ATTENTION)
    low = _check_dtype(name, dtype)
    if device_type is None:
        first = next(iter(model.parameters()), None)
        device_type = "cpu" if first is None else first.device.type
    try:
        available = isinstance(device_type, str) and torch.amp.is_autocast_available(
            device_type)
    except RuntimeError:  # not a device type at all
        available = False
    if not available:
        raise LeanError(f"{name}: device_type={describe(device_type)}; expected a device type "
                        "torch.autocast supports here ('cpu', 'cuda'...)")
    _check_not_cast(name, model)
    dtype_name = _dtype_name(low)

    def edit(target: nn.Module, change: Change) -> None:
        record_step(target, "quant.autocast", device_type=device_type, dtype=dtype_name)
        _replay_autocast(target, device_type, dtype_name)
        change.replaced.append("(model)")
        change.details["attention"] = _attention_paths(target, attention)
        change.details.update({
            "dtype": dtype_name, "device_type": device_type,
            "weights": "float32 (cast per op by torch.autocast)",
            "output": "floating outputs cast to float32",
        })

    return apply_transform(name, model, edit,
                           params={"dtype": dtype_name, "device_type": device_type,
                                   "attention": attention},
                           example_inputs=example_inputs, inplace=inplace)
