"""The contract every transform follows: copy unless ``inplace``, select modules by path, and
return a :class:`Change` that says what was replaced and what it bought.

A transform is written as::

    def my_transform(model, *, include=None, exclude=None, example_inputs=None, inplace=False):
        def edit(target: nn.Module, change: Change) -> None:
            for path, module in select_modules(target, nn.Linear, include, exclude):
                replace_module(target, path, NewModule.from_linear(module))
                change.replaced.append(path)
        return apply_transform("my_transform", model, edit, params={...},
                               example_inputs=example_inputs, inplace=inplace)
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from leantorch.errors import LeanError, LeanTypeError, describe
from leantorch.inputs import as_call

__all__ = [
    "Change",
    "CostSummary",
    "apply_transform",
    "get_module",
    "replace_module",
    "select_modules",
    "summarize",
]


@dataclass
class CostSummary:
    """Size and (with example inputs) forward cost of a model, from ``leantorch.measure``."""

    params: int
    param_bytes: int  # parameters and buffers: what the model weighs on disk and in memory
    flops: int | None = None
    macs: int | None = None
    bytes: int | None = None  # forward bytes read + written

    def to_dict(self) -> dict[str, Any]:
        """``{"params", "param_bytes", "flops", "macs", "bytes"}``: the counts (the last three None
        when measured without example inputs)."""
        return asdict(self)


def summarize(model: nn.Module, example_inputs: Any = None) -> CostSummary:
    """Parameters and bytes always; FLOPs, MACs and bytes moved when ``example_inputs`` are
    given (any form :func:`leantorch.inputs.as_call` reads: a tensor, a tuple or list of
    positional inputs, a mapping of keyword inputs, or ``(args, kwargs)``)."""
    from leantorch.measure import count_params, profile

    counts = count_params(model)
    summary = CostSummary(params=counts.total, param_bytes=counts.bytes + counts.buffer_bytes)
    if example_inputs is not None:
        report = profile(model, example_inputs=example_inputs, latency=False,
                         device_spec=None, activations=False)
        summary.flops, summary.macs = report.flops, report.macs
        summary.bytes = report.forward.bytes
    return summary


def run_calibration(model: nn.Module, calibration: Sequence[Any],
                    on_input: dict[str, Callable[[torch.Tensor], None]] | None = None,
                    label: str = "calibrating") -> None:
    """Run ``calibration`` (model inputs: tuples, dicts or tensors) through ``model`` in eval
    mode without gradients, calling ``on_input[path](x)`` with the first input of the module
    at each ``path`` as it runs. Hooks are removed and the train/eval mode restored afterwards,
    also when the forward raises. ``label`` names the progress bar."""
    from leantorch.compress.progress import track

    handles = []
    for path, fn in (on_input or {}).items():
        def hook(_module: nn.Module, args: tuple[Any, ...], fn=fn) -> None:
            fn(args[0].detach())
        handles.append(model.get_submodule(path).register_forward_pre_hook(hook))
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for batch in track(calibration, len(calibration), label):
                args, kwargs = as_call(batch, owner="calibration")
                model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)

@dataclass
class Change:
    """What one transform did to a model.

    ``replaced``: module paths that were replaced or edited; ``skipped``: path -> why it was left
    alone; ``before``/``after``: sizes and costs; ``details``: transform-specific facts (for
    example the fraction of activations kept in 8 bits).
    """

    transform: str
    params: dict[str, Any] = field(default_factory=dict)
    replaced: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    before: CostSummary | None = None
    after: CostSummary | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with the fields ``transform``, ``params`` (the arguments), ``replaced``,
        ``skipped``, ``before``/``after`` (:meth:`CostSummary.to_dict` or None) and ``details``."""
        return {
            "transform": self.transform,
            "params": _jsonable(self.params),
            "replaced": list(self.replaced),
            "skipped": dict(self.skipped),
            "before": None if self.before is None else self.before.to_dict(),
            "after": None if self.after is None else self.after.to_dict(),
            "details": _jsonable(self.details),
        }

    def __str__(self) -> str:
        text = f"{self.transform}: {len(self.replaced)} module(s) changed"
        if self.skipped:
            text += f", {len(self.skipped)} skipped"
        if self.before is not None and self.after is not None:
            text += (f"; params {self.before.params:,} -> {self.after.params:,}, bytes "
                     f"{self.before.param_bytes:,} -> {self.after.param_bytes:,}")
            if self.before.flops is not None and self.after.flops is not None:
                text += f", FLOPs {self.before.flops:,} -> {self.after.flops:,}"
        return text


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.numel() <= 64 else f"tensor{list(value.shape)}"
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path`` (``""`` is the model)."""
    try:
        return model.get_submodule(path)
    except AttributeError as error:
        raise LeanError(f"no module at path {path!r} in {type(model).__name__}") from error


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` (which must exist and not be the model itself)."""
    if not path:
        raise LeanError("replace_module: path '' is the model itself; return a new model instead")
    parent_path, _, name = path.rpartition(".")
    parent = get_module(model, parent_path)
    if not hasattr(parent, name):
        raise LeanError(f"no module at path {path!r} in {type(model).__name__}")
    setattr(parent, name, new)


def select_modules(
    model: nn.Module,
    types: type | tuple[type, ...] = nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> Iterator[tuple[str, nn.Module]]:
    """Modules of ``types`` whose path matches one of the ``include`` glob patterns (all when
    None) and none of ``exclude``. Patterns are ``fnmatch`` globs over dotted paths
    (``"encoder.layer.*.attention.*"``). The list is taken before yielding, so callers may
    replace what they get."""
    includes = _patterns("include", include)
    excludes = _patterns("exclude", exclude) or []
    chosen = []
    for path, module in model.named_modules():
        if not path or not isinstance(module, types):
            continue
        if includes is not None and not any(fnmatch.fnmatchcase(path, p) for p in includes):
            continue
        if any(fnmatch.fnmatchcase(path, p) for p in excludes):
            continue
        chosen.append((path, module))
    yield from chosen


def _patterns(name: str, value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise LeanTypeError(f"{name} must be a glob pattern or a list of them, got "
                            f"{describe(value)}")
    return list(value)


def apply_transform(
    name: str,
    model: nn.Module,
    edit: Callable[[nn.Module, Change], None],
    *,
    params: dict[str, Any] | None = None,
    example_inputs: Any = None,
    inplace: bool = False,
) -> tuple[nn.Module, Change]:
    """Run ``edit(target, change)`` on a deep copy of ``model`` (on ``model`` itself when
    ``inplace``) and fill the change's before/after costs. The caller's model and tensors are
    untouched unless ``inplace``."""
    if not isinstance(model, nn.Module):
        raise LeanTypeError(f"{name}: model must be a torch.nn.Module, got "
                            f"{type(model).__name__}")
    change = Change(transform=name, params=dict(params or {}))
    change.before = summarize(model, example_inputs)
    target = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        edit(target, change)
    change.after = summarize(target, example_inputs)
    return target, change
