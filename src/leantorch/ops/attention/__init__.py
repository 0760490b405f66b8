"""Softmax attention in plain PyTorch: a readable reference (:func:`naive_attention`) beside
exact tiled, split-KV, sliding-window / neighbourhood, block-sparse and top-k variants.

Shapes: q (batch, q_heads, q_len, head_dim), k (batch, kv_heads, k_len, head_dim),
v (batch, kv_heads, k_len, value_dim), q_heads % kv_heads == 0 (grouped-query attention).
Causal masks are bottom-right aligned: query i sees keys 0..k_len - q_len + i.
"""

from leantorch.ops.attention.block_sparse import (
    block_sparse_attention,
    expand_block_mask,
    global_block_mask,
    local_block_mask,
    random_block_mask,
)
from leantorch.ops.attention.naive import naive_attention
from leantorch.ops.attention.sliding import (
    neighborhood_attention_2d,
    sliding_window_attention,
)
from leantorch.ops.attention.split_kv import (
    AttentionPartial,
    finalize,
    merge_partials,
    partial_attention,
    split_kv_attention,
)
from leantorch.ops.attention.tiled import attention, tiled_attention
from leantorch.ops.attention.topk import topk_attention

__all__ = [
    "AttentionPartial",
    "attention",
    "block_sparse_attention",
    "expand_block_mask",
    "finalize",
    "global_block_mask",
    "local_block_mask",
    "merge_partials",
    "naive_attention",
    "neighborhood_attention_2d",
    "partial_attention",
    "random_block_mask",
    "sliding_window_attention",
    "split_kv_attention",
    "tiled_attention",
    "topk_attention",
]
