"""Attention modules: ``Attention`` with eight kinds (exact, sliding, block-sparse, top-k, MLA,
linear, gated linear, Based), rotary embeddings, GQA/MQA, a static or dynamic ``KVCache`` with a
decode ``step()`` for every kind, KV-cache eviction (StreamingLLM, SnapKV, H2O), and the exact
GQA -> MLA conversion. See docs/attention_module.md.

Files: ``base.py`` (the shared base class and the ``Attention(kind=...)`` factory),
``softmax.py`` / ``mla.py`` / ``linear.py`` / ``based.py`` (one kind family each, with its
configs), ``attention.py`` (the table of kinds), ``cache.py`` (the KV cache: storage, writing
and eviction), ``eviction.py`` (the policies), ``rotary.py`` (RoPE), ``naive.py`` (the readable
reference of a layer).
"""

from leantorch.nn.attention.attention import (
    EVICTABLE_KINDS,
    KIND_CLASSES,
    KINDS,
    Attention,
    BasedAttention,
    BasedConfig,
    BlockSparseAttention,
    BlockSparseConfig,
    ExactAttention,
    GatedLinearAttention,
    GLAConfig,
    LatentAttention,
    LinearAttention,
    LinearConfig,
    MLAConfig,
    SlidingAttention,
    SlidingConfig,
    TopKAttention,
    TopKConfig,
)
from leantorch.nn.attention.cache import KVBuffer, KVCache, LayerCache, kv_bytes_per_token
from leantorch.nn.attention.eviction import (
    EvictionPolicy,
    HeavyHitters,
    SnapKV,
    StreamingLLM,
    attention_votes,
    heavy_hitter_indices,
    snapkv_indices,
    streaming_indices,
)
from leantorch.nn.attention.kv_quant import KVQuant
from leantorch.nn.attention.mla import FoldedMLA, fold_mla_weights, gqa_to_mla
from leantorch.nn.attention.rotary import RotaryEmbedding, rotate_half

__all__ = [
    "EVICTABLE_KINDS",
    "KINDS",
    "KIND_CLASSES",
    "Attention",
    "BasedAttention",
    "BasedConfig",
    "BlockSparseAttention",
    "BlockSparseConfig",
    "EvictionPolicy",
    "ExactAttention",
    "FoldedMLA",
    "GLAConfig",
    "GatedLinearAttention",
    "HeavyHitters",
    "KVBuffer",
    "KVCache",
    "KVQuant",
    "LatentAttention",
    "LayerCache",
    "LinearAttention",
    "LinearConfig",
    "MLAConfig",
    "RotaryEmbedding",
    "SlidingAttention",
    "SlidingConfig",
    "SnapKV",
    "StreamingLLM",
    "TopKAttention",
    "TopKConfig",
    "attention_votes",
    "fold_mla_weights",
    "gqa_to_mla",
    "heavy_hitter_indices",
    "kv_bytes_per_token",
    "rotate_half",
    "snapkv_indices",
    "streaming_indices",
]
