"""Sliding-window (1-D) and neighbourhood (2-D) attention, computed blockwise so the work is
O(n * window), not a masked dense (n x n) matrix.

Both reduce to "query i may see keys lo[i] <= j < hi[i]" with lo and hi non-decreasing in i, so
a block of queries needs only the key range [lo[first], hi[last]): each block runs dense masked
attention (``_common.dense_attention``, not the reference it is tested against) on that range
with the exact window mask. With a block of ``block``
queries and a window of ``window`` keys, a query is scored against block + window - 1 keys
(about 2 * window with the default block), which is what ``leantorch.measure`` counts.

Dilation splits the positions into ``dilation`` interleaved sub-sequences (positions with the
same remainder modulo ``dilation``); a dilated window is an ordinary window inside each one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from leantorch.errors import LeanError, describe
from leantorch.ops.attention._common import (
    check_positive_int,
    check_qkv,
    dense_attention,
    resolve_scale,
)

__all__ = ["neighborhood_attention_2d", "sliding_window_attention", "window_bounds"]


def window_bounds(centres: Tensor, length: int, window: int, causal: bool) -> tuple[Tensor, Tensor]:
    """Key range [lo, hi) of each query in a sequence of ``length`` keys.

    Args:
        centres: (num_queries,) integer position of each query among the keys (may lie outside
            0..length - 1 for bottom-right aligned queries that precede the first key).
        window: keys per query.
        causal: True: the ``window`` most recent keys centre - window + 1..centre (fewer near
            the start). False: ``window`` (odd) keys centred on the query, shifted inward at
            the borders so every query sees min(window, length) keys.

    Returns:
        lo, hi: (num_queries,) integer tensors, both non-decreasing.
    """
    if causal:
        hi = (centres + 1).clamp(0, length)
        lo = (centres - window + 1).clamp(0, length).minimum(hi)
        return lo, hi
    span = min(window, length)
    lo = (centres - window // 2).clamp(0, length - span)
    return lo, lo + span


def _banded(q: Tensor, k: Tensor, v: Tensor, lo: Tensor, hi: Tensor, scale: float,
            block: int) -> Tensor:
    """Attention where query i sees keys lo[i] <= j < hi[i], one block of queries at a time."""
    q_len = q.shape[2]
    lo_list, hi_list = lo.tolist(), hi.tolist()
    pieces = []
    for q0 in range(0, q_len, block):
        q1 = min(q0 + block, q_len)
        k0, k1 = lo_list[q0], hi_list[q1 - 1]  # bounds are monotone: the block's key range
        if k1 <= k0:  # no query of the block sees a key
            pieces.append(q.new_zeros(q.shape[0], q.shape[1], q1 - q0, v.shape[3]))
            continue
        keys = torch.arange(k0, k1, device=q.device)
        allowed = (keys >= lo[q0:q1, None]) & (keys < hi[q0:q1, None])
        pieces.append(dense_attention(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], allowed,
                                      scale))
    return torch.cat(pieces, 2)


def _check_window_args(op: str, window: object, dilation: object, block: object,
                       causal: bool, name: str = "window") -> None:
    check_positive_int(op, name, window)
    check_positive_int(op, "dilation", dilation)
    if block is not None:
        check_positive_int(op, "block", block)
    if not causal and window % 2 == 0:  # type: ignore[operator]
        raise LeanError(f"{op}: a centred {name} must be odd (the query in the middle), got "
                        f"{describe(window)}")


def sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int,
    causal: bool = True,
    dilation: int = 1,
    scale: float | None = None,
    block: int | None = None,
) -> Tensor:
    """1-D sliding-window attention, blockwise: O(n * window) work and memory.

    Query i sits at absolute position p = k_len - q_len + i (bottom-right aligned).

    Args:
        q: (batch, q_heads, q_len, head_dim).
        k: (batch, kv_heads, k_len, head_dim).
        v: (batch, kv_heads, k_len, value_dim).
        window: keys per query.
        causal: True: the ``window`` most recent keys p, p - dilation, ..., p - (window - 1)
            * dilation (those >= 0). False: a centred window of ``window`` (odd) keys spaced by
            ``dilation``, shifted inward at the borders like neighbourhood attention, so every
            query sees ``window`` keys when its sub-sequence has that many.
        dilation: spacing between the keys of a window.
        scale: default head_dim ** -0.5.
        block: queries per block (default: the window, clamped to 16..256).

    Returns:
        (batch, q_heads, q_len, value_dim). ``window >= k_len`` is full (causal) attention and
        ``window = 1`` returns v at each query's own position.
    """
    op = "sliding_window_attention"
    shapes = check_qkv(op, q, k, v)
    scale = resolve_scale(op, scale, shapes.head_dim)
    _check_window_args(op, window, dilation, block, causal)
    block = block if block is not None else min(max(window, 16), 256)
    offset = shapes.k_len - shapes.q_len
    out = q.new_zeros(shapes.batch, shapes.q_heads, shapes.q_len, shapes.value_dim)
    for residue in range(dilation):
        # the sub-sequence of positions congruent to `residue`: keys residue, residue + dilation..
        first_query = (residue - offset) % dilation
        if residue >= shapes.k_len or first_query >= shapes.q_len:
            continue
        queries = torch.arange(first_query, shapes.q_len, dilation, device=q.device)
        centres = torch.div(queries + offset - residue, dilation, rounding_mode="floor")
        keys_here = k[:, :, residue::dilation]
        lo, hi = window_bounds(centres, keys_here.shape[2], window, causal)
        piece = _banded(q[:, :, first_query::dilation], keys_here, v[:, :, residue::dilation],
                        lo, hi, scale, block)
        if dilation == 1:
            return piece
        out[:, :, first_query::dilation] = piece
    return out


def neighborhood_attention_2d(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    height: int,
    width: int,
    kernel_size: int,
    dilation: int = 1,
    scale: float | None = None,
    block: int | None = None,
) -> Tensor:
    """2-D neighbourhood attention on an image grid, in tiles: O(n * kernel_size^2) work.

    The query at (y, x) sees the kernel_size x kernel_size keys around it, spaced by
    ``dilation``; at the borders the window shifts inward so every query sees kernel_size^2
    keys (when each dilated sub-grid has at least kernel_size rows and columns; otherwise all
    of them along that axis).

    Args:
        q: (batch, q_heads, height * width, head_dim), positions in row-major order.
        k: (batch, kv_heads, height * width, head_dim).
        v: (batch, kv_heads, height * width, value_dim).
        height, width: the grid.
        kernel_size: odd window side.
        dilation: spacing of the window along both axes.
        scale: default head_dim ** -0.5.
        block: side of the square query tiles (default kernel_size // 2 + 1, at least 4): a
            tile of t x t queries is scored against (t + kernel_size - 1)^2 keys.

    Returns:
        (batch, q_heads, height * width, value_dim).
    """
    op = "neighborhood_attention_2d"
    shapes = check_qkv(op, q, k, v)
    scale = resolve_scale(op, scale, shapes.head_dim)
    check_positive_int(op, "height", height)
    check_positive_int(op, "width", width)
    _check_window_args(op, kernel_size, dilation, block, False, name="kernel_size")
    if shapes.q_len != height * width or shapes.k_len != height * width:
        raise LeanError(f"{op}: q_len and k_len must equal height * width = {height * width}, "
                        f"got q_len {shapes.q_len}, k_len {shapes.k_len}")
    tile = block if block is not None else max(kernel_size // 2 + 1, 4)
    b, hq, hk, d, dv = shapes.batch, shapes.q_heads, shapes.kv_heads, shapes.head_dim, \
        shapes.value_dim
    q_grid = q.reshape(b, hq, height, width, d)
    k_grid = k.reshape(b, hk, height, width, d)
    v_grid = v.reshape(b, hk, height, width, dv)
    out = q.new_zeros(b, hq, height, width, dv)
    for row_residue in range(min(dilation, height)):
        for col_residue in range(min(dilation, width)):
            # the dilated sub-grid: a plain neighbourhood problem
            q_sub = q_grid[:, :, row_residue::dilation, col_residue::dilation]
            k_sub = k_grid[:, :, row_residue::dilation, col_residue::dilation]
            v_sub = v_grid[:, :, row_residue::dilation, col_residue::dilation]
            rows, cols = q_sub.shape[2], q_sub.shape[3]
            row_lo, row_hi = window_bounds(torch.arange(rows), rows, kernel_size, False)
            col_lo, col_hi = window_bounds(torch.arange(cols), cols, kernel_size, False)
            sub_out = q.new_zeros(b, hq, rows, cols, dv)
            for y0 in range(0, rows, tile):
                y1 = min(y0 + tile, rows)
                ky0, ky1 = int(row_lo[y0]), int(row_hi[y1 - 1])
                key_rows = torch.arange(ky0, ky1)
                rows_ok = (key_rows >= row_lo[y0:y1, None]) & (key_rows < row_hi[y0:y1, None])
                for x0 in range(0, cols, tile):
                    x1 = min(x0 + tile, cols)
                    kx0, kx1 = int(col_lo[x0]), int(col_hi[x1 - 1])
                    key_cols = torch.arange(kx0, kx1)
                    cols_ok = ((key_cols >= col_lo[x0:x1, None])
                               & (key_cols < col_hi[x0:x1, None]))
                    # (query row, query col, key row, key col) -> (queries, keys)
                    allowed = (rows_ok[:, None, :, None] & cols_ok[None, :, None, :]).reshape(
                        (y1 - y0) * (x1 - x0), (ky1 - ky0) * (kx1 - kx0))
                    tile_out = dense_attention(
                        q_sub[:, :, y0:y1, x0:x1].reshape(b, hq, -1, d),
                        k_sub[:, :, ky0:ky1, kx0:kx1].reshape(b, hk, -1, d),
                        v_sub[:, :, ky0:ky1, kx0:kx1].reshape(b, hk, -1, dv),
                        allowed.to(q.device), scale)
                    sub_out[:, :, y0:y1, x0:x1] = tile_out.view(b, hq, y1 - y0, x1 - x0, dv)
            out[:, :, row_residue::dilation, col_residue::dilation] = sub_out
    return out.view(b, hq, height * width, dv)
