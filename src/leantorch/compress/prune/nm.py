"""N:M semi-structured sparsity: in every run of M consecutive weights along the input
dimension, keep the N largest ``|w|``.

2:4 is the pattern sparse tensor cores execute (on GPUs that have them); 4:8 and any N < M
follow the same rule. "Along the input dimension" means, per output row, along ``in_features``
for a Linear (and along dim 0 of transformers' ``Conv1D``, which stores ``(in, out)``); for a
convolution, along the input channels at every kernel position, the layout of an NHWC
implicit GEMM. A layer whose input size is not a multiple of M is skipped (with the reason in
``Change.skipped``), never padded: padding would make the stored pattern disagree with what
a sparse kernel expects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from leantorch.compress.change import Change, apply_transform
from leantorch.compress.prune.masks import (
    _record_sparsity,
    _scores,
    input_dim,
    prunable_modules,
    set_mask,
)
from leantorch.compress.registry import register_transform
from leantorch.errors import LeanError, LeanTypeError, describe

__all__ = ["check_nm", "nm_mask", "prune_nm"]


def check_nm(name: str, n: Any, m: Any) -> tuple[int, int]:
    """Validate an N:M pattern (1 <= n <= m; n == m keeps everything)."""
    for label, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise LeanTypeError(f"{name}: {label} must be an int, got {describe(value)}")
    if not 1 <= n <= m:
        raise LeanError(f"{name}: need 1 <= n <= m (keep n of every m weights), got n={n}, "
                        f"m={m}")
    return n, m


def nm_mask(scores: torch.Tensor, n: int, m: int, dim: int = 1) -> torch.Tensor:
    """Bool keep mask with exactly ``n`` True in every group of ``m`` consecutive entries
    along ``dim``.

    scores: any shape, higher = more important (``|w|``); ``scores.shape[dim]`` must be a
    multiple of ``m``. Ties keep the earlier entry of the group.
    """
    n, m = check_nm("nm_mask", n, m)
    moved = scores.movedim(dim, -1)  # (..., size): groups run along the last dimension
    size = moved.shape[-1]
    if size % m:
        raise LeanError(f"nm_mask: the size along dim {dim} ({size}) must be a multiple of "
                        f"m={m}")
    groups = moved.reshape(*moved.shape[:-1], size // m, m)
    order = torch.argsort(groups, dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(moved.shape).movedim(-1, dim)


@register_transform("prune.nm")
def nm(
    model: nn.Module,
    *,
    n: int = 2,
    m: int = 4,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    example_inputs: Any = None,
    inplace: bool = False,
) -> tuple[nn.Module, Change]:
    """Mask every Linear / Conv weight to the N:M pattern (keep the ``n`` largest ``|w|`` of
    every ``m`` along the input dimension). ``n == m`` is the identity (ratio 0). On an already
    masked weight the ranking is over survivors, so a group that had fewer than ``n`` left
    keeps fewer.

    Args:
        n: weights kept in every group of ``m`` (1 <= n <= m; 2 for the 2:4 sparse tensor
            cores).
        m: group length along the input dimension; a layer whose input size is not a
            multiple of it is skipped, with the reason in ``change.skipped``.
        include: ``fnmatch`` globs over module paths (``"encoder.layer.*"``); only
            Linear / Conv layers matching one are changed (None: all of them).
        exclude: globs of module paths left as they are, even when ``include`` matches.
    """
    n, m = check_nm("prune.nm", n, m)

    def edit(target: nn.Module, change: Change) -> None:
        if n == m:
            return
        for path, module in prunable_modules(target, include, exclude, change.skipped):
            dim = input_dim(module)
            size = module.weight.shape[dim]
            if size % m:
                change.skipped[path] = (f"input size {size} is not a multiple of m={m}; N:M "
                                        "groups cannot cover it")
                continue
            set_mask(module, nm_mask(_scores(module), n, m, dim))
            change.replaced.append(path)
        if not change.replaced:
            raise LeanError(f"prune.nm: no layer could take the {n}:{m} pattern (include="
                            f"{include!r}, exclude={exclude!r}; skipped: {change.skipped})")
        _record_sparsity(target, change)

    return apply_transform("prune.nm", model, edit,
                           params={"n": n, "m": m, "include": include, "exclude": exclude},
                           example_inputs=example_inputs, inplace=inplace)


# the family-prefixed public name (registry names are <family>.<function name>; see
# leantorch.compress.registry)
prune_nm = nm
