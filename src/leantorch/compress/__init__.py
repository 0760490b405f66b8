"""Transforms on existing models. Each returns ``(new_model, Change)`` and leaves the caller's
model untouched unless ``inplace=True``."""

from leantorch.compress.change import (
    Change,
    CostSummary,
    apply_transform,
    get_module,
    replace_module,
    select_modules,
    summarize,
)

__all__ = [
    "Change",
    "CostSummary",
    "apply_transform",
    "get_module",
    "replace_module",
    "select_modules",
    "summarize",
]
