"""Block sparsity: zero whole ``b x b`` tiles of a layer's weight matrix.

The matrix is the one the layer multiplies by, ``(out_features, in_features)``: a Linear's
weight, transformers' ``Conv1D`` weight transposed, a convolution's weight flattened to
``(out, in/groups * prod(kernel))`` in its ``unfold`` order. Both sides must be multiples of
``b``; other layers are skipped with the reason in ``Change.skipped``.

Importance of a tile (higher = kept): ``"l1"`` (sum of ``|w|``), ``"l2"`` (Frobenius norm) or
``"taylor"``, the first-order saliency of the tile (LPViT; Molchanov et al. 2019), ``sum over
calibration batches of (sum over the tile of w * dL/dw)^2``, computed by
:func:`leantorch.compress.prune.importance.taylor_saliency` exactly as structured pruning scores
a channel. The loss is ``loss_fn(output, batch)`` when given, else the model's own ``.loss``
(calibration inputs that carry labels), else a fixed random projection of the output.

Scope: ``"layer"`` prunes ``round(ratio * tiles)`` of every layer, ``"global"`` ranks the tiles
of all layers together, ``"row"`` prunes ``round(ratio * tiles_per_row)`` in every block row of
every layer, so each block row keeps the same number of tiles (no padding in the block-sparse
matmul, see :mod:`leantorch.compress.prune.sparse_exec`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from leantorch import validate
from leantorch.compress.change import Change, apply_transform
from leantorch.compress.prune.importance import LossFn, check_loss_fn, taylor_saliency
from leantorch.compress.prune.masks import (
    _check_scope,
    _count,
    _is_transformers_conv1d,
    _original,
    _record_sparsity,
    get_mask,
    lowest_k,
    prunable_modules,
    prune_scores,
    set_mask,
)
from leantorch.compress.registry import register_transform
from leantorch.errors import LeanError, describe

__all__ = ["block_mask", "block_scores", "expand_blocks", "matrix_view", "prune_block"]

IMPORTANCES = ("l1", "l2", "taylor")


def matrix_view(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (shaped like the layer's weight) as the ``(out, in)`` matrix the layer
    multiplies by (a view where possible)."""
    if _is_transformers_conv1d(module):
        return tensor.t()
    return tensor.reshape(tensor.shape[0], -1)


def _from_matrix(module: nn.Module, matrix: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if _is_transformers_conv1d(module):
        return matrix.t().contiguous()
    return matrix.reshape(shape)


def block_scores(matrix: torch.Tensor, block_size: int, importance: str = "l1") -> torch.Tensor:
    """Per-tile scores of ``matrix: (out, in)``, shape ``(out // b, in // b)``.

    importance: ``"l1"`` sums ``|x|``, ``"l2"`` is the Frobenius norm, ``"sum"`` the plain
    sum followed by ``abs`` (used for Taylor saliency, where ``matrix`` is ``w * grad``)."""
    rows, cols = matrix.shape
    b = block_size
    tiles = matrix.reshape(rows // b, b, cols // b, b)
    if importance == "l1":
        return tiles.abs().sum(dim=(1, 3))
    if importance == "l2":
        return tiles.square().sum(dim=(1, 3)).sqrt()
    if importance == "sum":
        return tiles.sum(dim=(1, 3)).abs()
    raise LeanError(f"block_scores: importance must be 'l1', 'l2' or 'sum', got "
                    f"{describe(importance)}")


def expand_blocks(tiles: torch.Tensor, block_size: int) -> torch.Tensor:
    """A per-tile tensor ``(R, C)`` repeated to the element grid ``(R * b, C * b)``."""
    return tiles.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)


def block_mask(scores: torch.Tensor, ratio: float, scope: str = "layer") -> torch.Tensor:
    """Keep mask over tiles ``(R, C)`` for one layer: ``scope="layer"`` prunes the
    ``round(ratio * R * C)`` lowest, ``"row"`` the ``round(ratio * C)`` lowest of every row
    (ties: earlier tile first)."""
    ratio = validate.ratio("block_mask", "ratio", ratio, include_high=True)
    _check_scope("block_mask", scope, ("layer", "row"))
    if scope == "layer":
        return ~lowest_k(scores, _count(ratio, scores.numel()))
    k = _count(ratio, scores.shape[1])
    return torch.stack([~lowest_k(row, k) for row in scores]) if scores.shape[0] else \
        torch.ones_like(scores, dtype=torch.bool)


def _taylor_tiles(target: nn.Module, modules: list[tuple[str, nn.Module]], block_size: int,
                  calibration: Sequence[Any], loss_fn: LossFn | None, seed: int
                  ) -> dict[str, torch.Tensor]:
    """Per-tile Taylor saliency ``(out // b, in // b)`` of each layer at ``path``: the
    per-weight products of every batch summed over each tile, squared, summed over batches."""
    weights = {path: _original(module) for path, module in modules}

    def per_tile(products: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {path: block_scores(matrix_view(module, products[path]), block_size, "sum")
                for path, module in modules if path in products}

    saliency = taylor_saliency(target, weights, calibration, per_tile, loss_fn=loss_fn,
                               seed=seed, owner="prune.block: importance='taylor'")
    return {path: saliency.get(path, torch.zeros(
        tuple(n // block_size for n in matrix_view(module, weights[path]).shape),
        dtype=torch.float64)) for path, module in modules}


@register_transform("prune.block")
def block(
    model: nn.Module,
    *,
    ratio: float = 0.5,
    block_size: int = 16,
    importance: str = "l1",
    scope: str = "layer",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    calibration: Sequence[Any] | None = None,
    loss_fn: LossFn | None = None,
    seed: int = 0,
    example_inputs: Any = None,
    inplace: bool = False,
) -> tuple[nn.Module, Change]:
    """Zero whole ``block_size x block_size`` tiles of every selected layer's weight matrix.
    Tiles already fully masked are pruned first, so repeated calls nest.

    Args:
        ratio: fraction of tiles (so of weights) removed, exactly ``round(ratio * tiles)`` per
            layer, per block row or over all layers (see ``scope``); 0 is the identity.
        block_size: side of the square tiles; a layer whose weight matrix is not a multiple of
            it on both sides is skipped, with the reason in ``change.skipped``.
        importance: ``"l1"``, ``"l2"`` or ``"taylor"``: the first-order Taylor saliency of
            :func:`leantorch.compress.prune.importance.taylor_saliency` (the one structured
            pruning uses), ``sum over calibration batches of (sum over the tile of w *
            dL/dw)^2``; it needs ``calibration`` (a list of model inputs).
        scope: where the ``round(ratio * tiles)`` count applies: ``"layer"`` (each layer),
            ``"row"`` (each block row of each layer) or ``"global"`` (one ranking over all
            selected layers).
        include: ``fnmatch`` globs over module paths (``"encoder.layer.*"``); only
            Linear / Conv layers matching one are changed (None: all of them).
        exclude: globs of module paths left as they are, even when ``include`` matches.
        loss_fn: ``loss_fn(output, batch) -> scalar``, the loss ``"taylor"`` differentiates;
            without it the model's own ``.loss`` (batches with labels), else a fixed random
            projection of the output drawn from ``seed``.
        seed: seeds that random projection (``"taylor"`` only).
    """
    ratio = validate.ratio("prune.block", "ratio", ratio, include_high=True)
    block_size = validate.positive_int("prune.block", "block_size", block_size)
    _check_scope("prune.block", scope, ("layer", "global", "row"))
    if importance not in IMPORTANCES:
        raise LeanError(f"prune.block: importance must be one of {', '.join(IMPORTANCES)}, got "
                        f"{describe(importance)}")
    loss_fn = check_loss_fn("prune.block", loss_fn)
    if importance == "taylor" and not calibration:
        raise LeanError("prune.block: importance='taylor' needs calibration inputs (a list of "
                        "model inputs), got none")

    def edit(target: nn.Module, change: Change) -> None:
        if ratio == 0:
            return
        modules = []
        for path, module in prunable_modules(target, include, exclude, change.skipped):
            rows, cols = matrix_view(module, _original(module)).shape
            if rows % block_size or cols % block_size:
                change.skipped[path] = (f"weight matrix {rows}x{cols} is not a multiple of "
                                        f"block_size={block_size} on both sides")
                continue
            modules.append((path, module))
        if not modules:
            raise LeanError(f"prune.block: no layer can be tiled by {block_size}x{block_size} "
                            f"(include={include!r}, exclude={exclude!r}; skipped: "
                            f"{change.skipped})")
        saliency = _taylor_tiles(target, modules, block_size, calibration, loss_fn, seed) \
            if importance == "taylor" else {}
        scores = {}
        for path, module in modules:
            weight = _original(module).detach()
            mask = get_mask(module)
            if mask is not None:
                weight = torch.where(mask, weight, 0.0)
            if importance == "taylor":
                tile = saliency[path].float()
            else:
                tile = block_scores(matrix_view(module, weight).float(), block_size, importance)
            if mask is not None:  # fully masked tiles go first, so masks nest
                alive = block_scores(matrix_view(module, mask).float(), block_size, "l1") > 0
                tile = torch.where(alive, tile, -1.0)
            scores[path] = tile
        if scope == "global":
            keep_tiles = prune_scores(scores, ratio, "global")
        else:
            keep_tiles = {path: block_mask(s, ratio, scope) for path, s in scores.items()}
        for path, module in modules:
            weight = _original(module)
            keep = expand_blocks(keep_tiles[path], block_size)
            set_mask(module, _from_matrix(module, keep, weight.shape))
            change.replaced.append(path)
        _record_sparsity(target, change)

    return apply_transform("prune.block", model, edit,
                           params={"ratio": ratio, "block_size": block_size,
                                   "importance": importance, "scope": scope, "seed": seed,
                                   "include": include, "exclude": exclude},
                           example_inputs=example_inputs, inplace=inplace)


# the family-prefixed public name (registry names are <family>.<function name>; see
# leantorch.compress.registry)
prune_block = block
