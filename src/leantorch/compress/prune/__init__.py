"""Pruning: unstructured, N:M and block masks, sparse execution, lottery tickets, structured
pruning. Each transform returns ``(new_model, Change)``.

Structured pruning (physically smaller dense models): :func:`prune_structured` (channels,
heads, neurons, width, experts; registered as ``prune.structured``) and
:func:`prune_sublayers` (FinerCut-style removal of attention / MLP sublayers; registered as
``prune.sublayers``), built on the dependency graph of :mod:`leantorch.compress.graph`.
"""

from importlib import import_module
from importlib.util import find_spec

from leantorch.compress.prune.importance import IMPORTANCES, group_scores, score_groups
from leantorch.compress.prune.layers import Removal, remove_units
from leantorch.compress.prune.structured import (
    KINDS,
    mask_units,
    plan_removal,
    prune_structured,
)
from leantorch.compress.prune.sublayers import ZeroBranch, prune_sublayers, sublayer_scores

__all__ = [
    "IMPORTANCES",
    "KINDS",
    "Removal",
    "ZeroBranch",
    "group_scores",
    "mask_units",
    "plan_removal",
    "prune_structured",
    "prune_sublayers",
    "remove_units",
    "score_groups",
    "sublayer_scores",
]

# Masks, N:M, block sparsity, sparse execution and lottery tickets live in modules written
# alongside; re-export their public names when they are present (importing them also
# registers their transforms).
def _reexport(names: tuple[str, ...]) -> None:
    for name in names:
        if find_spec(f"{__name__}.{name}") is None:
            continue
        module = import_module(f"{__name__}.{name}")
        for public in getattr(module, "__all__", ()):
            if public not in globals():
                globals()[public] = getattr(module, public)
                __all__.append(public)


_reexport(("masks", "nm", "block", "sparse_exec", "lottery"))
