"""Lazy sub-package attributes (PEP 562), so ``import leantorch`` stays cheap while
``leantorch.compress.quant.int8_dynamic`` still works after a bare ``import leantorch``."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any


def lazy_submodules(package: str, names: Iterable[str], namespace: dict[str, Any]
                    ) -> tuple[Callable[[str], ModuleType], Callable[[], list[str]]]:
    """The ``(__getattr__, __dir__)`` pair of ``package`` that imports ``package.<name>`` on
    first access for each name in ``names``.

    ``namespace`` is the package's ``globals()``: ``__dir__`` lists what is already defined
    there and the lazy names, so tab completion and ``dir()`` show the sub-packages before
    they are imported. Any other missing name raises the usual ``AttributeError``."""
    lazy = frozenset(names)

    def __getattr__(name: str) -> ModuleType:
        if name in lazy:
            # import_module also binds the sub-module as an attribute of the package, so
            # this hook runs once per name
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | lazy)

    return __getattr__, __dir__
