"""Efficient building blocks (``nn.Module``s built on ``leantorch.ops``).

``leantorch.nn.attention``: :class:`Attention` (exact, sliding, block-sparse, top-k, MLA, linear,
GLA and Based kinds with RoPE and GQA), :class:`KVCache` with eviction policies, and the exact
GQA -> MLA conversion.
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

__all__ = [
    "Attention",
    "HeavyHitters",
    "KVCache",
    "RotaryEmbedding",
    "SnapKV",
    "StreamingLLM",
    "gqa_to_mla",
    "kv_bytes_per_token",
]
