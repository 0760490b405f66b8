"""Optional packages of the test suite. A test that needs one carries its marker, so a missing
package skips that test only, not every test of its file."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest


def optional_import(name: str) -> ModuleType | None:
    """The module ``name``, or None when it (or something it imports) is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


transformers = optional_import("transformers")
if transformers is not None:
    transformers.utils.logging.set_verbosity_error()

needs_transformers = pytest.mark.skipif(
    transformers is None, reason="needs transformers (pip install 'leantorch[hf]')")
