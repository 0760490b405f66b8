"""Efficient building blocks (``nn.Module``s built on ``leantorch.ops``).

``leantorch.nn.attention``: :class:`Attention` (exact, sliding, block-sparse, top-k, MLA, linear,
GLA and Based kinds with RoPE and GQA), :class:`KVCache` with eviction policies, and the exact
GQA -> MLA conversion.

``leantorch.nn.moe``: :class:`MoE` (routed experts, shared and MoE++ experts, balancing losses),
its :class:`Router` and :class:`StackedExperts`, and Mixtral interop.
"""

from leantorch.nn.attention import (
    Attention,
    HeavyHitters,
    KVCache,
    RotaryEmbedding,
    SnapKV,
    StreamingLLM,
    gqa_to_mla,
    kv_bytes_per_token,
)
from leantorch.nn.moe import FeedForward, MoE, Router, StackedExperts, moe_aux_loss

__all__ = [
    "Attention",
    "FeedForward",
    "HeavyHitters",
    "KVCache",
    "MoE",
    "RotaryEmbedding",
    "Router",
    "SnapKV",
    "StackedExperts",
    "StreamingLLM",
    "gqa_to_mla",
    "kv_bytes_per_token",
    "moe_aux_loss",
]
