"""Transforms on existing models. Each returns ``(new_model, Change)`` and leaves the caller's
model untouched unless ``inplace=True``.

The transform families load on first use: ``leantorch.compress.quant``, ``.prune``,
``.lowrank``, ``.moefy`` and the dependency ``graph``. :func:`transforms` lists every registered
transform with its knobs.
"""

from leantorch._lazy import lazy_submodules as _lazy_submodules
from leantorch.compress.catalog import Knob, TransformInfo, transforms
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
    "Knob",
    "TransformInfo",
    "apply_transform",
    "get_module",
    "replace_module",
    "select_modules",
    "summarize",
    "transforms",
]

# imported on first attribute access (PEP 562), so importing compress stays cheap
_SUBMODULES = ("catalog", "finetune", "graph", "lowrank", "moefy", "progress", "prune", "quant",
              "recipe", "registry", "verify")
__getattr__, __dir__ = _lazy_submodules(__name__, _SUBMODULES, globals())
