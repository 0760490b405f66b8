"""The ``based`` kind: half the heads Taylor linear attention, half sliding-window softmax
attention (Based, Arora et al. 2024, in one layer), with its config.

The first ``num_kv_heads // 2`` KV heads (and their query groups) run causal linear attention
on ``feature_dim``-sized queries/keys (projected separately); the others run causal
sliding-window softmax attention with ``window``. Their per-head outputs are concatenated before
the output projection. The cache holds the linear heads' state and the window heads' last
``window - 1`` keys and values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from leantorch.errors import LeanError
from leantorch.nn.attention.base import Attention, missing_hint, repeat_kv, split_heads
from leantorch.nn.attention.linear import (
    FeatureMap,
    apply_feature_map,
    check_bool,
    check_feature_map,
    linear_op,
)
from leantorch.nn.attention.rotary import RotaryEmbedding
from leantorch.nn.attention.softmax import sliding_over_cache
from leantorch.ops.attention import sliding_window_attention
from leantorch.validate import positive_int

__all__ = ["BasedAttention", "BasedConfig"]


@dataclass(frozen=True)
class BasedConfig:
    """``based``: ``window`` (keys each window-head query sees, itself included), the linear
    heads' ``feature_map`` (default Taylor) on ``feature_dim``-sized queries/keys (default 16,
    as in Based), ``normalize`` and the op's ``chunk_size``."""

    window: int = field(
        metadata=missing_hint("the number of keys each query sees, e.g. window=256"))
    feature_map: FeatureMap = "taylor"
    feature_dim: int = 16
    normalize: bool = True
    chunk_size: int = 64

    def __post_init__(self) -> None:
        positive_int("BasedConfig", "window", self.window)
        check_feature_map("BasedConfig", self.feature_map)
        positive_int("BasedConfig", "feature_dim", self.feature_dim)
        check_bool("BasedConfig", "normalize", self.normalize)
        positive_int("BasedConfig", "chunk_size", self.chunk_size)


class BasedAttention(Attention):
    """``based``: linear heads and sliding-window heads side by side (causal only)."""

    kind = "based"
    config_class = BasedConfig
    causal_only = True

    def _build(self, qkv_bias: bool) -> None:
        config, dim, hd = self.config, self.dim, self.head_dim
        kv_heads = self.num_kv_heads
        if kv_heads % 2:
            raise LeanError(f"Attention: num_kv_heads={kv_heads} with kind='based'; the KV "
                            "heads are split in two halves (linear, sliding), so it must "
                            "be even")
        if self.rope and config.feature_dim % 2:
            raise LeanError(f"Attention: feature_dim={config.feature_dim} with rope=True; "
                            "expected an even int")
        self.window = config.window
        self.feature_map = config.feature_map
        self.feature_dim = config.feature_dim
        self.normalize = config.normalize
        self.chunk_size = config.chunk_size
        self.linear_kv_heads = kv_heads // 2
        self.linear_heads = self.linear_kv_heads * self.group
        window_heads = self.num_heads - self.linear_heads
        self.q_feat = nn.Linear(dim, self.linear_heads * self.feature_dim, bias=qkv_bias)
        self.k_feat = nn.Linear(dim, self.linear_kv_heads * self.feature_dim, bias=qkv_bias)
        self.q_proj = nn.Linear(dim, window_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, (kv_heads - self.linear_kv_heads) * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, kv_heads * hd, bias=qkv_bias)
        self.feature_rotary = RotaryEmbedding(self.feature_dim, self.rope_base) \
            if self.rope else None

    def cached_kv_layout(self) -> tuple[int, int, int | None]:
        """The window heads' share: ``2 * (num_kv_heads / 2) * head_dim * itemsize`` bytes."""
        return self.num_kv_heads - self.linear_kv_heads, self.head_dim, self.head_dim

    def cached_entries(self, context_len: int) -> int:
        return min(context_len, self.window - 1)

    def state_nbytes(self, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
        """The linear heads' state: ``batch * linear_heads * F * (value_dim + 1)`` elements."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        features = apply_feature_map(self.feature_map,
                                     torch.zeros(1, self.feature_dim, dtype=dtype)).shape[-1]
        return batch * self.linear_heads * features * (self.value_dim + 1) * itemsize

    def _heads(self, x, positions, cache, entry, key_padding_mask, absorb) -> Tensor:
        v = split_heads(self.v_proj(x), self.num_kv_heads)
        v_linear, v_window = v[:, : self.linear_kv_heads], v[:, self.linear_kv_heads:]
        qf = split_heads(self.q_feat(x), self.linear_heads)
        kf = split_heads(self.k_feat(x), self.linear_kv_heads)
        if self.feature_rotary is not None:
            qf, kf = self.feature_rotary(qf, positions), self.feature_rotary(kf, positions)
        linear_out = linear_op(qf, repeat_kv(kf, self.group), repeat_kv(v_linear, self.group),
                               entry, feature_map=self.feature_map, normalize=self.normalize,
                               chunk_size=self.chunk_size, causal=True)
        q = self._rotate(split_heads(self.q_proj(x), self.num_heads - self.linear_heads),
                         positions)
        k = self._rotate(split_heads(self.k_proj(x), self.num_kv_heads - self.linear_kv_heads),
                         positions)
        if entry is None:
            window_out = sliding_window_attention(q, k, v_window, window=self.window,
                                                  causal=True)
        else:
            def attend(keys: Tensor, values: Tensor, key_positions: Tensor) -> Tensor:
                return sliding_over_cache(q, keys, values, self.window)

            window_out = self._write_and_attend(cache, entry, k, v_window, positions, attend, q,
                                                window=self.window)
        return torch.cat((linear_out, window_out), dim=1)
