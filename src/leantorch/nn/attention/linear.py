"""The linear kinds: ``linear`` (phi(q) (sum phi(k)^T v) / phi(q) (sum phi(k))) and ``gla``
(gated linear attention, S_t = diag(alpha_t) S_{t-1} + k_t^T v_t, o_t = q_t S_t), with their
configs.

Both run the chunkwise ops of ``leantorch.ops.linear_attn`` over a sequence and keep a
recurrent state in the cache instead of keys and values (``entry.state``; its size does not
depend on the context). The linear ops take one K/V head per query head, so GQA's K/V heads are
repeated to their groups first.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leantorch.errors import LeanError, LeanTypeError, describe
from leantorch.nn.attention.base import Attention, repeat_kv, split_heads
from leantorch.nn.attention.cache import LayerCache
from leantorch.ops.linear_attn import (
    FEATURE_MAPS,
    gated_linear_attention,
    gla_step,
    linear_attention,
    linear_attention_step,
)
from leantorch.validate import positive_int, ratio

__all__ = ["GLAConfig", "GatedLinearAttention", "LinearAttention", "LinearConfig"]

FeatureMap = str | Callable[[Tensor], Tensor]


def check_feature_map(owner: str, value: Any) -> FeatureMap:
    """``value`` if it names a map in ``FEATURE_MAPS`` or is a callable."""
    if (isinstance(value, str) and value in FEATURE_MAPS) or (callable(value) \
            and not isinstance(value, str)):
        return value
    raise LeanError(f"{owner}: feature_map={describe(value)}; expected one of "
                    f"{sorted(FEATURE_MAPS)} or a callable")


def check_bool(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise LeanTypeError(f"{owner}: {name}={describe(value)}; expected a bool")
    return value


def apply_feature_map(feature_map: FeatureMap, x: Tensor) -> Tensor:
    return (FEATURE_MAPS[feature_map] if isinstance(feature_map, str) else feature_map)(x)


@dataclass(frozen=True)
class LinearConfig:
    """``linear``: the feature map (a name in ``leantorch.ops.linear_attn.FEATURE_MAPS`` or a
    callable), whether to divide by ``phi(q) . sum phi(k)``, and the chunk size of the op."""

    feature_map: FeatureMap = "elu"
    normalize: bool = True
    chunk_size: int = 64

    def __post_init__(self) -> None:
        check_feature_map("LinearConfig", self.feature_map)
        check_bool("LinearConfig", "normalize", self.normalize)
        positive_int("LinearConfig", "chunk_size", self.chunk_size)


@dataclass(frozen=True)
class GLAConfig:
    """``gla``: the decay is ``alpha = sigmoid(x W_1 W_2 + b) ** (1 / gate_normalizer)`` with
    ``W_1 W_2`` of rank ``gate_rank`` (defaults 16 and 16, as in the GLA paper), i.e. ``log
    alpha = logsigmoid(...) / gate_normalizer``; ``chunk_size`` of the chunkwise op."""

    gate_rank: int = 16
    gate_normalizer: float = 16.0
    chunk_size: int = 64

    def __post_init__(self) -> None:
        positive_int("GLAConfig", "gate_rank", self.gate_rank)
        normalizer = ratio("GLAConfig", "gate_normalizer", self.gate_normalizer, low=0.0,
                           high=math.inf, include_low=False)
        object.__setattr__(self, "gate_normalizer", normalizer)  # frozen: store the float
        positive_int("GLAConfig", "chunk_size", self.chunk_size)


def linear_op(q: Tensor, k: Tensor, v: Tensor, entry: LayerCache | None, *,
              feature_map: FeatureMap, normalize: bool, chunk_size: int, causal: bool) -> Tensor:
    """Linear attention of ``q, k, v (batch, heads, n, d)`` (one K/V head per query head),
    continuing and updating ``entry.state`` when a cache entry is given."""
    if entry is None:
        return linear_attention(q, k, v, feature_map=feature_map, causal=causal,
                                normalize=normalize, mode="chunk", chunk_size=chunk_size)
    if q.shape[2] == 1:
        out, entry.state = linear_attention_step(q, k, v, entry.state, feature_map=feature_map,
                                                 normalize=normalize)
        return out
    out, entry.state = linear_attention(
        q, k, v, feature_map=feature_map, causal=True, normalize=normalize, mode="chunk",
        chunk_size=chunk_size, initial_state=entry.state, return_state=True)
    return out


class _RecurrentAttention(Attention):
    """Kinds whose cache is a recurrent state: no KV bytes per token."""

    def cached_kv_layout(self) -> None:
        """None: a fixed-size state (:meth:`state_nbytes`) instead of cached keys and values,
        so 0 KV bytes per token."""
        return None

    def _repeated_qkv(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self._qkv(x, positions)
        return q, repeat_kv(k, self.group), repeat_kv(v, self.group)


class LinearAttention(_RecurrentAttention):
    """``linear``: phi(q) (sum phi(k)^T v) / phi(q) (sum phi(k)), causal by a prefix sum."""

    kind = "linear"
    config_class = LinearConfig

    def _build(self, qkv_bias: bool) -> None:
        self.feature_map = self.config.feature_map
        self.normalize = self.config.normalize
        self.chunk_size = self.config.chunk_size
        super()._build(qkv_bias)

    def state_nbytes(self, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
        """``batch * heads * F * (value_dim + 1)`` elements: ``S = sum phi(k)^T v`` and
        ``z = sum phi(k)``, with ``F`` the feature size."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        features = apply_feature_map(self.feature_map,
                                     torch.zeros(1, self.head_dim, dtype=dtype)).shape[-1]
        return batch * self.num_heads * features * (self.value_dim + 1) * itemsize

    def _heads(self, x, positions, cache, entry, key_padding_mask, absorb) -> Tensor:
        q, k, v = self._repeated_qkv(x, positions)
        return linear_op(q, k, v, entry, feature_map=self.feature_map, normalize=self.normalize,
                         chunk_size=self.chunk_size, causal=self.causal)


class GatedLinearAttention(_RecurrentAttention):
    """``gla``: gated linear attention with a low-rank data-dependent decay (causal only)."""

    kind = "gla"
    config_class = GLAConfig
    causal_only = True

    def _build(self, qkv_bias: bool) -> None:
        self.gate_rank = self.config.gate_rank
        self.gate_normalizer = self.config.gate_normalizer
        self.chunk_size = self.config.chunk_size
        super()._build(qkv_bias)
        self.gate_proj = nn.Sequential(
            nn.Linear(self.dim, self.gate_rank, bias=False),
            nn.Linear(self.gate_rank, self.num_heads * self.head_dim, bias=True))

    def state_nbytes(self, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
        """``batch * heads * head_dim * value_dim`` elements: the state ``S``."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return batch * self.num_heads * self.head_dim * self.value_dim * itemsize

    def log_decay(self, x: Tensor) -> Tensor:
        """GLA's per-step log decay ``(batch, heads, seq, head_dim)``:
        ``logsigmoid(x W_1 W_2 + b) / gate_normalizer`` (<= 0, so the decay is in (0, 1])."""
        logits = self.gate_proj(x)
        return split_heads(F.logsigmoid(logits) / self.gate_normalizer, self.num_heads)

    def _heads(self, x, positions, cache, entry, key_padding_mask, absorb) -> Tensor:
        q, k, v = self._repeated_qkv(x, positions)
        log_decay = self.log_decay(x)
        if entry is None:
            return gated_linear_attention(q, k, v, log_decay, mode="chunk",
                                          chunk_size=self.chunk_size)
        if q.shape[2] == 1:
            out, entry.state = gla_step(q, k, v, log_decay, entry.state)
            return out
        out, entry.state = gated_linear_attention(
            q, k, v, log_decay, mode="chunk", chunk_size=self.chunk_size,
            initial_state=entry.state, return_state=True)
        return out
