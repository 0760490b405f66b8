"""Transforms by name, so recipes (YAML or Python) can call them.

A registered transform is a function ``fn(model, *, inplace=False, example_inputs=None,
calibration=None, **args) -> (new_model, Change)``. ``calibration`` is a list of model inputs
(each a tuple of positional inputs or a dict of keyword inputs) for transforms that look at
activations; a transform that does not need it may leave the argument out of its signature.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from leantorch.errors import LeanError

__all__ = ["get_transform", "register_transform", "transform_names"]

Transform = Callable[..., Any]
_TRANSFORMS: dict[str, Transform] = {}
# modules that register transforms when imported; imported lazily on first lookup
_PROVIDERS = ("leantorch.compress.quant", "leantorch.compress.lowrank",
              "leantorch.compress.prune", "leantorch.compress.moefy")


def register_transform(name: str, fn: Transform | None = None) -> Any:
    """Register ``fn`` under ``name`` (e.g. ``"quant.int8_dynamic"``); usable as a decorator."""

    def register(f: Transform) -> Transform:
        parameters = inspect.signature(f).parameters
        if "inplace" not in parameters:
            raise LeanError(f"register_transform({name!r}): {f.__name__} must take inplace=")
        _TRANSFORMS[name] = f
        return f

    return register if fn is None else register(fn)


def _load_providers() -> None:
    for module in _PROVIDERS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:  # the provider exists but something it needs is missing
                raise


def get_transform(name: str) -> Transform:
    """The transform registered as ``name``; the error lists the known names."""
    if name not in _TRANSFORMS:
        _load_providers()
    if name not in _TRANSFORMS:
        raise LeanError(f"unknown transform {name!r}; known: {', '.join(transform_names())}")
    return _TRANSFORMS[name]


def transform_names() -> list[str]:
    _load_providers()
    return sorted(_TRANSFORMS)


def accepts(fn: Transform, argument: str) -> bool:
    """Whether ``fn`` takes ``argument`` (or **kwargs)."""
    parameters = inspect.signature(fn).parameters
    return argument in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
