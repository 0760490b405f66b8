"""The softmax kinds: ``exact``, ``sliding``, ``block_sparse`` and ``topk``, with their configs.

All four project q/k/v, rotate q and k, and attend with one op of ``leantorch.ops.attention``
over the whole sequence, or, with a cache, over the entries the cache keeps plus the new ones
(bottom-right causal). They differ in the op and in what the cache keeps: every key (exact,
topk, block_sparse; exact and topk may evict) or the last ``window - 1`` (sliding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from leantorch.errors import LeanError, describe
from leantorch.nn.attention.base import Attention, BlockMask, missing_hint
from leantorch.ops.attention import (
    attention,
    block_sparse_attention,
    sliding_window_attention,
    topk_attention,
)
from leantorch.validate import positive_int

__all__ = [
    "BlockSparseAttention",
    "BlockSparseConfig",
    "ExactAttention",
    "SlidingAttention",
    "SlidingConfig",
    "TopKAttention",
    "TopKConfig",
]


@dataclass(frozen=True)
class SlidingConfig:
    """``sliding``: each query sees its ``window`` most recent keys, itself included (a centred
    window of ``window`` keys, odd, with ``causal=False``)."""

    window: int = field(
        metadata=missing_hint("the number of keys each query sees, e.g. window=256"))

    def __post_init__(self) -> None:
        positive_int("SlidingConfig", "window", self.window)


@dataclass(frozen=True)
class TopKConfig:
    """``topk``: each query keeps its ``topk`` largest allowed scores."""

    topk: int = field(
        metadata=missing_hint("the number of scores each query keeps, e.g. topk=32"))

    def __post_init__(self) -> None:
        positive_int("TopKConfig", "topk", self.topk)


@dataclass(frozen=True, eq=False)  # eq=False: a tensor mask has no single truth value
class BlockSparseConfig:
    """``block_sparse``: query block i sees key block j where ``block_mask[h, i, j]``.

    ``block_mask`` is a boolean ``(num_heads or 1, q_blocks, k_blocks)`` tensor covering the
    longest sequence, or a callable ``(q_blocks, k_blocks) -> mask`` (e.g. built from
    ``leantorch.ops.attention``'s ``local_block_mask`` / ``global_block_mask``)."""

    block_size: int = field(
        metadata=missing_hint("the block side, e.g. block_size=64 (block_mask too)"))
    block_mask: BlockMask = field(metadata=missing_hint(
        "a bool (heads or 1, q_blocks, k_blocks) tensor or a callable "
        "(q_blocks, k_blocks) -> mask"))

    def __post_init__(self) -> None:
        positive_int("BlockSparseConfig", "block_size", self.block_size)
        mask = self.block_mask
        tensor_ok = isinstance(mask, Tensor) and mask.dtype == torch.bool and mask.dim() == 3
        if not (tensor_ok or (callable(mask) and not isinstance(mask, Tensor))):
            raise LeanError(f"BlockSparseConfig: block_mask={describe(mask)}; expected a bool "
                            "tensor (1 or num_heads, q_blocks, k_blocks) or a callable "
                            "(q_blocks, k_blocks) -> mask")


class _SoftmaxAttention(Attention):
    """What the four softmax kinds share: q/k/v, the cache write, and the op hooks."""

    #: the cache keeps the last ``window - 1`` entries (sliding) instead of all or a policy's
    bounded_by_window: ClassVar[bool] = False

    def _heads(self, x, positions, cache, entry, key_padding_mask, absorb) -> Tensor:
        q, k, v = self._qkv(x, positions)
        if entry is None:
            return self._full(q, k, v, key_padding_mask)

        def attend(keys: Tensor, values: Tensor, key_positions: Tensor) -> Tensor:
            return self._cached(q, keys, values, positions, key_positions)

        window = self.window if self.bounded_by_window else None
        return self._write_and_attend(cache, entry, k, v, positions, attend, q, window)

    def _full(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        """The kind's op over a whole sequence (queries and keys at positions 0..n-1)."""
        raise NotImplementedError

    def _cached(self, q: Tensor, keys: Tensor, values: Tensor, positions: Tensor,
                key_positions: Tensor) -> Tensor:
        """New queries (at ``positions``) over cached-and-new keys; bottom-right causal."""
        raise NotImplementedError


class ExactAttention(_SoftmaxAttention):
    """``exact``: softmax(q k^T / sqrt(d)) v (``leantorch.ops.attention.attention``)."""

    kind = "exact"
    supports_key_padding_mask = True

    def _full(self, q, k, v, key_padding_mask) -> Tensor:
        return attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask)

    def _cached(self, q, keys, values, positions, key_positions) -> Tensor:
        return attention(q, keys, values, causal=True)


def sliding_over_cache(q: Tensor, keys: Tensor, values: Tensor, window: int) -> Tensor:
    """New queries ``q (batch, heads, n, d)`` over the last keys of a window cache."""
    if q.shape[2] == 1:  # the cache holds at most window - 1 keys: all are in the window
        return attention(q, keys, values)
    return sliding_window_attention(q, keys, values, window=window, causal=True)


class SlidingAttention(_SoftmaxAttention):
    """``sliding``: each query sees the ``window`` most recent keys (itself included)."""

    kind = "sliding"
    config_class = SlidingConfig
    bounded_by_window = True

    def _build(self, qkv_bias: bool) -> None:
        self.window = self.config.window
        super()._build(qkv_bias)

    def cached_entries(self, context_len: int) -> int:
        return min(context_len, self.window - 1)

    def _full(self, q, k, v, key_padding_mask) -> Tensor:
        return sliding_window_attention(q, k, v, window=self.window, causal=self.causal)

    def _cached(self, q, keys, values, positions, key_positions) -> Tensor:
        return sliding_over_cache(q, keys, values, self.window)


class TopKAttention(_SoftmaxAttention):
    """``topk``: each query keeps its ``topk`` largest allowed scores."""

    kind = "topk"
    config_class = TopKConfig
    supports_key_padding_mask = True

    def _build(self, qkv_bias: bool) -> None:
        self.topk = self.config.topk
        super()._build(qkv_bias)

    def _full(self, q, k, v, key_padding_mask) -> Tensor:
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        return topk_attention(q, k, v, topk=self.topk, causal=self.causal, mask=mask)

    def _cached(self, q, keys, values, positions, key_positions) -> Tensor:
        return topk_attention(q, keys, values, topk=self.topk, causal=True)


class BlockSparseAttention(_SoftmaxAttention):
    """``block_sparse``: query block i sees key block j where ``block_mask[h, i, j]``."""

    kind = "block_sparse"
    config_class = BlockSparseConfig

    def _build(self, qkv_bias: bool) -> None:
        self.block_size = self.config.block_size
        self.block_mask = self.config.block_mask
        mask = self.block_mask
        if isinstance(mask, Tensor) and mask.shape[0] not in (1, self.num_heads):
            raise LeanError(f"Attention: block_mask={describe(mask)}; expected a bool tensor "
                            f"(1 or num_heads={self.num_heads}, q_blocks, k_blocks) or a "
                            "callable (q_blocks, k_blocks) -> mask")
        super()._build(qkv_bias)

    def _block_mask(self, q_blocks: int, k_blocks: int) -> Tensor:
        mask = self.block_mask(q_blocks, k_blocks) if callable(self.block_mask) \
            else self.block_mask
        if mask.shape[-2] < q_blocks or mask.shape[-1] < k_blocks:
            raise LeanError(f"Attention: block_mask of shape {tuple(mask.shape)} covers "
                            f"{mask.shape[-2]} x {mask.shape[-1]} blocks; the sequence needs "
                            f"{q_blocks} x {k_blocks} (block_size={self.block_size}); pass a "
                            "larger mask or a callable")
        return mask[..., :q_blocks, :k_blocks]

    def _full(self, q, k, v, key_padding_mask) -> Tensor:
        blocks = math.ceil(q.shape[2] / self.block_size)
        return block_sparse_attention(q, k, v, self._block_mask(blocks, blocks),
                                      block_size=self.block_size, causal=self.causal)

    def _cached(self, q, keys, values, positions, key_positions) -> Tensor:
        # Expand the block mask at the absolute positions of queries and keys (no eviction for
        # this kind, so key positions are 0..L-1).
        key_blocks = key_positions[0, 0] // self.block_size
        query_blocks = positions // self.block_size
        mask = self._block_mask(int(query_blocks[-1]) + 1, int(key_blocks[-1]) + 1)
        allowed = mask[:, query_blocks][:, :, key_blocks].unsqueeze(0)
        return attention(q, keys, values, causal=True, mask=allowed)

