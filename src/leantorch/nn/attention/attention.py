"""``Attention``, the factory of the eight attention kinds, and the table of kinds.

``Attention(dim, num_heads, num_kv_heads, kind=..., **kind_args)`` returns the module of that
kind; each is a subclass of :class:`~leantorch.nn.attention.base.Attention` (the shared base:
projections, RoPE, GQA, the cache plumbing) living with its family, and takes its own arguments
as a config dataclass:

======================  =========================  ==========================================
kind                    class (module)             config
======================  =========================  ==========================================
``"exact"``             ``ExactAttention``         none
``"sliding"``           ``SlidingAttention``       ``SlidingConfig(window)``
``"block_sparse"``      ``BlockSparseAttention``   ``BlockSparseConfig(block_size, block_mask)``
``"topk"``              ``TopKAttention``          ``TopKConfig(topk)``
                        (all four: ``softmax.py``)
``"mla"``               ``LatentAttention``        ``MLAConfig(kv_lora_rank, rope_dim,
                        (``mla.py``)               latent_rope_dim)``
``"linear"``            ``LinearAttention``        ``LinearConfig(feature_map, normalize,
                                                   chunk_size)``
``"gla"``               ``GatedLinearAttention``   ``GLAConfig(gate_rank, gate_normalizer,
                        (both: ``linear.py``)      chunk_size)``
``"based"``             ``BasedAttention``         ``BasedConfig(window, feature_map,
                        (``based.py``)             feature_dim, normalize, chunk_size)``
======================  =========================  ==========================================

The kinds (``kind=``) and what each computes per head (``n`` tokens, ``d`` head size):

======================  ===============================================================================
``"exact"``             softmax(q k^T / sqrt(d)) v, causal or not (``leantorch.ops.attention.attention``)
``"sliding"``           each query sees the ``window`` most recent keys (itself included)
``"block_sparse"``      query block i sees key block j where ``block_mask[h, i, j]`` (and causal)
``"topk"``              each query keeps its ``topk`` largest allowed scores
``"mla"``               multi-head latent attention: keys/values rebuilt from a cached latent
``"linear"``            phi(q) (sum phi(k)^T v) / phi(q) (sum phi(k)), causal by a prefix sum
``"gla"``               gated linear attention: S_t = diag(alpha_t) S_{t-1} + k_t^T v_t, o_t = q_t S_t
``"based"``             half the heads Taylor linear attention, half sliding-window softmax
======================  ===============================================================================

Grouped-query attention: ``num_kv_heads`` KV heads, each serving ``num_heads // num_kv_heads``
consecutive query heads (MQA: 1, MHA: ``num_heads``). The softmax ops take grouped K/V as is;
the linear ops need one K/V head per query head, so the module repeats them there.

RoPE (``rope=True``) rotates every query and key that enters an attention op, for every kind, by
its absolute position (the GLA and Based papers use no RoPE: pass ``rope=False`` to match them).
With a cache, token positions continue from ``cache.seen_tokens(layer_idx)``.
"""

from __future__ import annotations

from leantorch.nn.attention.base import EVICTABLE_KINDS, KINDS, Attention, BlockMask
from leantorch.nn.attention.based import BasedAttention, BasedConfig
from leantorch.nn.attention.linear import (
    GatedLinearAttention,
    GLAConfig,
    LinearAttention,
    LinearConfig,
)
from leantorch.nn.attention.mla import LatentAttention, MLAConfig
from leantorch.nn.attention.softmax import (
    BlockSparseAttention,
    BlockSparseConfig,
    ExactAttention,
    SlidingAttention,
    SlidingConfig,
    TopKAttention,
    TopKConfig,
)

__all__ = [
    "EVICTABLE_KINDS",
    "KINDS",
    "KIND_CLASSES",
    "Attention",
    "BasedAttention",
    "BasedConfig",
    "BlockMask",
    "BlockSparseAttention",
    "BlockSparseConfig",
    "ExactAttention",
    "GLAConfig",
    "GatedLinearAttention",
    "LatentAttention",
    "LinearAttention",
    "LinearConfig",
    "MLAConfig",
    "SlidingAttention",
    "SlidingConfig",
    "TopKAttention",
    "TopKConfig",
]

#: the class ``Attention(..., kind=k)`` builds, for each kind
KIND_CLASSES: dict[str, type[Attention]] = {
    "exact": ExactAttention,
    "sliding": SlidingAttention,
    "block_sparse": BlockSparseAttention,
    "topk": TopKAttention,
    "mla": LatentAttention,
    "linear": LinearAttention,
    "gla": GatedLinearAttention,
    "based": BasedAttention,
}
assert tuple(KIND_CLASSES) == KINDS and all(
    cls.kind == kind for kind, cls in KIND_CLASSES.items())
