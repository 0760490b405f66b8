"""Block-sparse attention: a boolean block mask says which (query block, key block) tiles are
computed; the others are skipped (no FLOPs, no memory).

Per query block, the active key blocks are gathered into one contiguous key range and the block
is attended with dense masked scores and the package's own ``masked_softmax`` (not the
reference it is tested against), so the work is proportional to the
number of active blocks. Rows of the mask with fewer active blocks than the busiest row of the
same query block (in another head or batch element) are padded with masked slots; patterns with
the same count per row (``random_block_mask``) waste nothing.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from leantorch.errors import LeanError, LeanTypeError, describe
from leantorch.ops.attention._common import (
    check_positive_int,
    check_qkv,
    masked_softmax,
    resolve_scale,
)

__all__ = [
    "block_sparse_attention",
    "expand_block_mask",
    "global_block_mask",
    "local_block_mask",
    "random_block_mask",
]


def local_block_mask(num_q_blocks: int, num_k_blocks: int, width: int) -> Tensor:
    """Band of key blocks around each query block's diagonal: (1, num_q_blocks, num_k_blocks).

    Query block i is aligned bottom-right with key block i + num_k_blocks - num_q_blocks and sees
    the key blocks less than ``width`` away from it on either side (``causal=True`` in
    :func:`block_sparse_attention` then keeps the past side only).
    """
    for name, value in (("num_q_blocks", num_q_blocks), ("num_k_blocks", num_k_blocks),
                        ("width", width)):
        check_positive_int("local_block_mask", name, value)
    diagonal = torch.arange(num_q_blocks)[:, None] + (num_k_blocks - num_q_blocks)
    distance = (torch.arange(num_k_blocks)[None, :] - diagonal).abs()
    return (distance < width).unsqueeze(0)


def global_block_mask(num_q_blocks: int, num_k_blocks: int, num_global: int) -> Tensor:
    """Global blocks (Longformer / BigBird): every query block sees the first ``num_global`` key
    blocks and the first ``num_global`` query blocks see every key block.
    (1, num_q_blocks, num_k_blocks)."""
    for name, value in (("num_q_blocks", num_q_blocks), ("num_k_blocks", num_k_blocks)):
        check_positive_int("global_block_mask", name, value)
    check_positive_int("global_block_mask", "num_global", num_global, minimum=0)
    mask = torch.zeros(1, num_q_blocks, num_k_blocks, dtype=torch.bool)
    mask[..., :num_global] = True
    mask[:, :num_global, :] = True
    return mask


def random_block_mask(num_q_blocks: int, num_k_blocks: int, density: float, seed: int, *,
                      num_heads: int = 1) -> Tensor:
    """Each query block row keeps round(density * num_k_blocks) key blocks chosen at random
    (the same count in every row, so the cost is proportional to ``density``).
    (num_heads, num_q_blocks, num_k_blocks); heads draw independently; deterministic in seed."""
    for name, value in (("num_q_blocks", num_q_blocks), ("num_k_blocks", num_k_blocks),
                        ("num_heads", num_heads)):
        check_positive_int("random_block_mask", name, value)
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not (
            0 <= density <= 1):
        raise LeanError(f"random_block_mask: density must be in [0, 1], got {describe(density)}")
    keep = round(density * num_k_blocks)
    generator = torch.Generator().manual_seed(int(seed))
    order = torch.rand(num_heads, num_q_blocks, num_k_blocks, generator=generator).argsort(-1)
    mask = torch.zeros(num_heads, num_q_blocks, num_k_blocks, dtype=torch.bool)
    mask.scatter_(-1, order[..., :keep], True)
    return mask


def expand_block_mask(block_mask: Tensor, block_size: int, q_len: int, k_len: int) -> Tensor:
    """The element mask a block mask stands for: (..., q_len, k_len)."""
    return (block_mask.repeat_interleave(block_size, -2)
            .repeat_interleave(block_size, -1)[..., :q_len, :k_len])


def _check_block_mask(op: str, block_mask: object, batch: int, q_heads: int, q_blocks: int,
                      k_blocks: int) -> Tensor:
    """The block mask as (batch or 1, q_heads or 1, q_blocks, k_blocks)."""
    expected = (f"boolean (q_heads or 1, {q_blocks}, {k_blocks}) or "
                f"(batch or 1, q_heads or 1, {q_blocks}, {k_blocks})")
    if not isinstance(block_mask, Tensor) or block_mask.dtype != torch.bool:
        raise LeanTypeError(f"{op}: block_mask must be a {expected} tensor, got "
                            f"{describe(block_mask)}")
    mask = block_mask if block_mask.dim() == 4 else block_mask.unsqueeze(0)
    if (mask.dim() != 4 or mask.shape[0] not in (1, batch) or mask.shape[1] not in (1, q_heads)
            or tuple(mask.shape[2:]) != (q_blocks, k_blocks)):
        raise LeanError(f"{op}: block_mask must be {expected}, got shape "
                        f"{tuple(block_mask.shape)}")
    return mask


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: Tensor,
    *,
    block_size: int,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Attention restricted to the (query block, key block) tiles that ``block_mask`` turns on.

    Equal to :func:`naive_attention` with the expanded element mask (and ``causal``); tiles that
    are off, and with ``causal`` tiles entirely above the diagonal, are never computed.

    Args:
        q: (batch, q_heads, q_len, head_dim).
        k: (batch, kv_heads, k_len, head_dim).
        v: (batch, kv_heads, k_len, value_dim).
        block_mask: boolean (q_heads or 1, ceil(q_len / block_size), ceil(k_len / block_size)),
            optionally with a leading batch dim (batch or 1); True = compute the tile.
            ``local_block_mask | global_block_mask | random_block_mask`` combine with ``|``.
        block_size: query and key block side (the last blocks may be ragged).
        causal: bottom-right aligned, inside the active tiles as well.
        scale: default head_dim ** -0.5.

    Returns:
        (batch, q_heads, q_len, value_dim); queries with no active key give 0.
    """
    op = "block_sparse_attention"
    shapes = check_qkv(op, q, k, v)
    scale = resolve_scale(op, scale, shapes.head_dim)
    check_positive_int(op, "block_size", block_size)
    b, hq, hk, g, nq, nk, d, dv = (shapes.batch, shapes.q_heads, shapes.kv_heads, shapes.groups,
                                   shapes.q_len, shapes.k_len, shapes.head_dim,
                                   shapes.value_dim)
    q_blocks, k_blocks = math.ceil(nq / block_size), math.ceil(nk / block_size)
    mask = _check_block_mask(op, block_mask, b, hq, q_blocks, k_blocks).to(q.device)
    offset = nk - nq
    if causal:  # drop tiles whose first key lies after the block's last query
        last_query = (torch.arange(q_blocks, device=q.device) + 1) * block_size - 1
        last_query = last_query.clamp(max=nq - 1) + offset
        first_key = torch.arange(k_blocks, device=q.device) * block_size
        mask = mask & (first_key[None, :] <= last_query[:, None])

    # A pattern shared by all heads is gathered per KV head (grouped layout, K/V never
    # repeated); per-head patterns gather the KV head of each query head.
    shared = mask.shape[1] == 1
    heads = hk if shared else hq
    padded_len = k_blocks * block_size
    pad = padded_len - nk
    k_blocked = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(b, hk, k_blocks, block_size, d)
    v_blocked = torch.nn.functional.pad(v, (0, 0, 0, pad)).view(b, hk, k_blocks, block_size, dv)
    batch_index = torch.arange(b, device=q.device)[:, None, None]
    kv_head_index = torch.arange(heads, device=q.device)
    if not shared:
        kv_head_index = kv_head_index // g
    kv_head_index = kv_head_index[None, :, None]
    slot = torch.arange(block_size, device=q.device)
    out = q.new_zeros(b, hq, nq, dv)
    computed = False
    for qb in range(q_blocks):
        q0, q1 = qb * block_size, min((qb + 1) * block_size, nq)
        rows = q1 - q0
        active = mask[:, :, qb].expand(b, heads, k_blocks)  # (batch, heads, k_blocks)
        most = int(active.sum(-1).max())
        if most == 0:
            continue
        # the active key blocks first (in key order), then padding slots
        order = torch.argsort((~active).to(torch.int8), dim=-1, stable=True)[..., :most]
        valid = active.gather(-1, order)  # (batch, heads, most)
        keys = k_blocked[batch_index, kv_head_index, order].reshape(b, heads, most * block_size,
                                                                     d)
        values = v_blocked[batch_index, kv_head_index, order].reshape(b, heads,
                                                                       most * block_size, dv)
        key_position = (order[..., None] * block_size + slot).reshape(b, heads, 1, -1)
        allowed = valid.repeat_interleave(block_size, -1)[:, :, None, :] & (key_position < nk)
        if causal:
            query_position = torch.arange(q0, q1, device=q.device)[:, None] + offset
            allowed = allowed & (key_position <= query_position)  # (batch, heads, rows, keys)
        if shared:
            queries = q[:, :, q0:q1].reshape(b, hk, g * rows, d)
            allowed = allowed.unsqueeze(2)  # broadcast over the query heads of a KV head
        else:
            queries = q[:, :, q0:q1]
        scores = (queries @ keys.transpose(-1, -2)).mul_(scale)
        if shared:
            scores = scores.view(b, hk, g, rows, -1)
        weights = masked_softmax(scores.masked_fill(~allowed, -math.inf))
        if shared:
            weights = weights.view(b, hk, g * rows, -1)
        out[:, :, q0:q1] = (weights @ values).view(b, hq, rows, dv)
        computed = True
    if not computed and q.requires_grad and torch.is_grad_enabled():
        out = out + 0 * q[..., :1]  # no tile at all: still a (zero-gradient) function of q
    return out
