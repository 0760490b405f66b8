"""Transforms by name, so recipes (YAML or Python) can call them.

A registered transform is a function ``fn(model, *, inplace=False, example_inputs=None,
calibration=None, **args) -> (new_model, Change)``. ``calibration`` is a list of model inputs
(each a tuple of positional inputs or a dict of keyword inputs) for transforms that look at
activations; a transform that does not need it may leave the argument out of its signature.

Recipes check a step's arguments before any work runs: names against the signature, types
against its annotations, and values with the optional ``check`` a transform registers (a
function of the arguments, without the model, that raises :class:`LeanError`).

**Naming rule.** A transform is registered as ``<family>.<name>``, where ``<family>`` is its
package under :mod:`leantorch.compress` (``prune``, ``quant``, ``lowrank``, ``moefy``) and
``<name>`` is the registered function's ``__name__``: ``prune.structured`` is the function
``structured`` of :mod:`leantorch.compress.prune.structured`, ``quant.fake_quantize`` is
:func:`leantorch.compress.quant.fake_quantize`, ``lowrank.svd`` is
:func:`leantorch.compress.lowrank.svd`. Where the bare name would be ambiguous in a package
namespace (``leantorch.compress.prune.structured`` is also a module), the package exports the
function under a family-prefixed alias too (``prune_structured``); the alias is the same
function object. ``tests/compress/test_vocabulary.py`` holds every registered leantorch
transform to this rule.

Names that a release renamed stay accepted by :func:`get_transform` (and so by recipes) as
deprecated aliases: they warn with :class:`DeprecationWarning` naming the new name, and
:func:`transform_names` lists only the new names.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Callable
from typing import Any

from leantorch.errors import LeanError

__all__ = ["argument_check", "canonical_name", "get_transform", "register_transform",
           "transform_names"]

Transform = Callable[..., Any]
_TRANSFORMS: dict[str, Transform] = {}
_CHECKS: dict[str, Callable[..., None]] = {}
# old name -> new name: accepted with a DeprecationWarning for one release, never listed
DEPRECATED_NAMES: dict[str, str] = {
    "quant.fake": "quant.fake_quantize",
}
# modules that register transforms when imported; imported lazily on first lookup
_PROVIDERS = ("leantorch.compress.quant", "leantorch.compress.lowrank",
              "leantorch.compress.prune", "leantorch.compress.moefy")


def register_transform(name: str, fn: Transform | None = None, *,
                       check: Callable[..., None] | None = None) -> Any:
    """Register ``fn`` under ``name`` (e.g. ``"quant.int8_dynamic"``); usable as a decorator.

    ``check(**args)``, when given, validates a step's arguments (ranges, combinations) without
    a model, so a recipe fails at load time rather than after the model loaded."""

    def register(f: Transform) -> Transform:
        parameters = inspect.signature(f).parameters
        if "inplace" not in parameters:
            raise LeanError(f"register_transform({name!r}): {f.__name__} must take inplace=")
        _TRANSFORMS[name] = f
        if check is not None:
            _CHECKS[name] = check
        return f

    return register if fn is None else register(fn)


def _load_providers() -> None:
    for module in _PROVIDERS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:  # the provider exists but something it needs is missing
                raise


def canonical_name(name: str, *, stacklevel: int = 2) -> str:
    """``name``, or the new name when ``name`` is a deprecated alias (with a
    :class:`DeprecationWarning` that names the new one)."""
    new = DEPRECATED_NAMES.get(name)
    if new is None:
        return name
    warnings.warn(f"transform {name!r} is now called {new!r}; the old name will be removed in "
                  "the next release", DeprecationWarning, stacklevel=stacklevel + 1)
    return new


def get_transform(name: str) -> Transform:
    """The transform registered as ``name`` (a deprecated alias warns and gives the renamed
    transform); the error lists the known names."""
    name = canonical_name(name, stacklevel=2)
    if name not in _TRANSFORMS:
        _load_providers()
    if name not in _TRANSFORMS:
        raise LeanError(f"unknown transform {name!r}; known: {', '.join(transform_names())}")
    return _TRANSFORMS[name]


def argument_check(name: str) -> Callable[..., None] | None:
    """The argument check registered with transform ``name``, if any."""
    with warnings.catch_warnings():  # get_transform warns about an old name; once is enough
        warnings.simplefilter("ignore", DeprecationWarning)
        get_transform(name)
        return _CHECKS.get(DEPRECATED_NAMES.get(name, name))


def transform_names() -> list[str]:
    """The registered transform names, sorted (deprecated aliases are not listed)."""
    _load_providers()
    return sorted(_TRANSFORMS)


def accepts(fn: Transform, argument: str) -> bool:
    """Whether ``fn`` takes ``argument`` (or **kwargs)."""
    parameters = inspect.signature(fn).parameters
    return argument in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
