"""``Attention``: projections, rotary embedding, one of eight attention kinds, output projection,
and a KV cache / recurrent-state decode path for every kind.

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

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leantorch.errors import LeanError, LeanTypeError, describe
from leantorch.nn.attention.cache import KVCache, LayerCache, kv_bytes_per_token
from leantorch.nn.attention.eviction import attention_votes
from leantorch.nn.attention.rotary import RotaryEmbedding
from leantorch.ops.attention import (
    attention,
    block_sparse_attention,
    sliding_window_attention,
    topk_attention,
)
from leantorch.ops.linear_attn import (
    FEATURE_MAPS,
    gated_linear_attention,
    gla_step,
    linear_attention,
    linear_attention_step,
)

__all__ = ["EVICTABLE_KINDS", "KINDS", "Attention"]

KINDS = ("exact", "sliding", "block_sparse", "topk", "mla", "linear", "gla", "based")
SOFTMAX_KV_KINDS = ("exact", "sliding", "block_sparse", "topk")
LINEAR_KINDS = ("linear", "gla")
#: kinds whose KV cache an eviction policy may shrink (per-head softmax over arbitrary keys)
EVICTABLE_KINDS = ("exact", "topk", "mla")

BlockMask = Tensor | Callable[[int, int], Tensor]


def _int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LeanError(f"Attention: {name}={describe(value)}; expected an int >= {minimum}")
    return value


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """(batch, seq, heads * d) -> (batch, heads, seq, d)."""
    batch, seq, _ = x.shape
    return x.view(batch, seq, heads, -1).transpose(1, 2)


def _repeat_kv(x: Tensor, group: int) -> Tensor:
    """(batch, kv_heads, seq, d) -> (batch, kv_heads * group, seq, d): each KV head copied to
    its ``group`` consecutive query heads (for the linear ops, which take one K/V per head)."""
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def _kept_indices(keep: Tensor) -> Tensor:
    """``keep (batch, heads, L)`` bool, the same count per row -> ``(batch, heads, count)``
    ascending indices of the True entries."""
    count = int(keep[(0,) * (keep.dim() - 1)].sum())
    return (~keep).to(torch.uint8).argsort(dim=-1, stable=True)[..., :count]


def _gather_entries(x: Tensor | None, index: Tensor) -> Tensor | None:
    """Entries ``index`` ((kept,) or (batch, heads, kept)) of ``x (batch, heads, L, ...)``."""
    if x is None:
        return None
    if index.dim() == 1:
        return x[:, :, index]
    if x.dim() == 3:
        return x.gather(2, index)
    return x.gather(2, index.unsqueeze(-1).expand(*index.shape, x.shape[-1]))


class Attention(nn.Module):
    """Multi-head attention of a chosen ``kind`` with RoPE, GQA and a KV-cache decode path.

    Args:
        dim: model width (input and output features).
        num_heads: query heads.
        num_kv_heads: key/value heads (GQA; default ``num_heads``; 1 is MQA). Must divide
            ``num_heads``. Not used by ``"mla"`` (its keys/values come from the latent).
        kind: one of :data:`KINDS` (see the module docstring).
        head_dim: per-head size (default ``dim // num_heads``).
        causal: causal attention (bottom-right aligned). ``gla`` and ``based`` are causal only.
            Decoding with a cache needs ``causal=True``.
        window: ``sliding`` and ``based``: keys each query sees (itself included).
        topk: ``topk``: scores each query keeps.
        block_size, block_mask: ``block_sparse``: the block size and a boolean mask
            ``(num_heads or 1, q_blocks, k_blocks)`` covering the longest sequence, or a callable
            ``(q_blocks, k_blocks) -> mask`` (e.g. built from ``leantorch.ops.attention``'s
            ``local_block_mask`` / ``global_block_mask`` helpers).
        kv_lora_rank: ``mla``: size ``d_c`` of the cached latent ``c = x W_DKV``.
        rope_dim: ``mla``: size of the decoupled RoPE part of queries and of the one shared RoPE
            key (default ``head_dim // 2`` with ``rope=True``, 0 without).
        latent_rope_dim: ``mla``: leading latent channels rotated by RoPE in blocks of
            ``head_dim`` (the queries' no-RoPE part is then rotated too). 0 for DeepSeek's MLA;
            :func:`gqa_to_mla` sets it so the converted layer keeps RoPE on the full key.
        feature_map: ``linear`` (default ``"elu"``) and ``based`` (default ``"taylor"``): a name in
            ``leantorch.ops.linear_attn.FEATURE_MAPS`` or a callable.
        feature_dim: ``based``: size of the queries/keys of the linear heads before the feature
            map (default 16, as in Based).
        normalize: ``linear`` and ``based``: divide by ``phi(q) . sum phi(k)`` (default True).
        gate_rank, gate_normalizer: ``gla``: the decay is ``alpha = sigmoid(x W_1 W_2 + b) ** (1 /
            gate_normalizer)`` with ``W_1 W_2`` of rank ``gate_rank`` (defaults 16 and 16, as in
            the GLA paper), i.e. ``log alpha = logsigmoid(...) / gate_normalizer``.
        chunk_size: ``linear``, ``gla``, ``based``: chunk size of the chunkwise op (default 64).
        rope, rope_base: rotary embedding on queries and keys, and its base.
        qkv_bias, proj_bias: biases of the input projections and of the output projection.
        dropout: dropout on the output (after the output projection), in training mode.
        layer_idx: which entry of a :class:`KVCache` this layer uses.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        kind: str = "exact",
        *,
        head_dim: int | None = None,
        causal: bool = True,
        window: int | None = None,
        topk: int | None = None,
        block_size: int | None = None,
        block_mask: BlockMask | None = None,
        kv_lora_rank: int | None = None,
        rope_dim: int | None = None,
        latent_rope_dim: int | None = None,
        feature_map: str | Callable[[Tensor], Tensor] | None = None,
        feature_dim: int | None = None,
        normalize: bool | None = None,
        gate_rank: int | None = None,
        gate_normalizer: float | None = None,
        chunk_size: int | None = None,
        rope: bool = True,
        rope_base: float = 10000.0,
        qkv_bias: bool = False,
        proj_bias: bool = False,
        dropout: float = 0.0,
        layer_idx: int = 0,
    ) -> None:
        super().__init__()
        self.dim = _int("dim", dim)
        self.num_heads = _int("num_heads", num_heads)
        if kind not in KINDS:
            raise LeanError(f"Attention: kind={describe(kind)}; expected one of {KINDS}")
        self.kind = kind
        if kind == "mla" and num_kv_heads not in (None, num_heads):
            raise LeanError(f"Attention: num_kv_heads={describe(num_kv_heads)} with kind='mla'; "
                            "MLA rebuilds per-head keys/values from one latent, leave it None")
        self.num_kv_heads = num_heads if num_kv_heads is None else _int("num_kv_heads",
                                                                         num_kv_heads)
        if self.num_heads % self.num_kv_heads:
            raise LeanError(f"Attention: num_heads={num_heads} is not a multiple of "
                            f"num_kv_heads={num_kv_heads}; each KV head must serve the same "
                            "number of query heads")
        self.group = self.num_heads // self.num_kv_heads
        if head_dim is None:
            if dim % num_heads:
                raise LeanError(f"Attention: dim={dim} is not divisible by num_heads={num_heads};"
                                " pass head_dim explicitly")
            head_dim = dim // num_heads
        self.head_dim = _int("head_dim", head_dim)
        if not isinstance(causal, bool):
            raise LeanTypeError(f"Attention: causal={describe(causal)}; expected a bool")
        if kind in ("gla", "based") and not causal:
            raise LeanError(f"Attention: causal=False with kind={kind!r}; {kind} is causal only")
        self.causal = causal
        if not (isinstance(dropout, int | float) and 0.0 <= dropout < 1.0):
            raise LeanError(f"Attention: dropout={describe(dropout)}; expected a float in [0, 1)")
        self.layer_idx = _int("layer_idx", layer_idx, minimum=0)
        self.rope = bool(rope)
        self.rope_base = float(rope_base)

        # Arguments a kind does not use are refused rather than silently ignored.
        used = {
            "window": ("sliding", "based"), "topk": ("topk",),
            "block_size": ("block_sparse",), "block_mask": ("block_sparse",),
            "kv_lora_rank": ("mla",), "rope_dim": ("mla",), "latent_rope_dim": ("mla",),
            "feature_map": ("linear", "based"), "feature_dim": ("based",),
            "normalize": ("linear", "based"), "gate_rank": ("gla",),
            "gate_normalizer": ("gla",), "chunk_size": ("linear", "gla", "based"),
        }
        given = {"window": window, "topk": topk, "block_size": block_size,
                 "block_mask": block_mask, "kv_lora_rank": kv_lora_rank, "rope_dim": rope_dim,
                 "latent_rope_dim": latent_rope_dim, "feature_map": feature_map,
                 "feature_dim": feature_dim, "normalize": normalize, "gate_rank": gate_rank,
                 "gate_normalizer": gate_normalizer, "chunk_size": chunk_size}
        for name, value in given.items():
            if value is not None and kind not in used[name]:
                raise LeanError(f"Attention: {name}={describe(value)} is not used by "
                                f"kind={kind!r}; it applies to kinds {used[name]}")

        self.window = None if window is None else _int("window", window)
        if kind in ("sliding", "based") and self.window is None:
            raise LeanError(f"Attention: window=None with kind={kind!r}; pass the number of "
                            "keys each query sees, e.g. window=256")
        self.topk = None if topk is None else _int("topk", topk)
        if kind == "topk" and self.topk is None:
            raise LeanError("Attention: topk=None with kind='topk'; pass the number of scores "
                            "each query keeps, e.g. topk=32")
        self.block_size = None if block_size is None else _int("block_size", block_size)
        self.block_mask = block_mask
        if kind == "block_sparse":
            if self.block_size is None or block_mask is None:
                raise LeanError(f"Attention: block_size={describe(block_size)}, block_mask="
                                f"{describe(block_mask)} with kind='block_sparse'; both are "
                                "required")
            tensor_ok = isinstance(block_mask, Tensor) and block_mask.dtype == torch.bool \
                and block_mask.dim() == 3 and block_mask.shape[0] in (1, num_heads)
            if not (callable(block_mask) or tensor_ok):
                raise LeanError(f"Attention: block_mask={describe(block_mask)}; expected a "
                                f"bool tensor (1 or num_heads={num_heads}, q_blocks, "
                                "k_blocks) or a callable (q_blocks, k_blocks) -> mask")
        self.chunk_size = None
        if kind in ("linear", "gla", "based"):
            self.chunk_size = 64 if chunk_size is None else _int("chunk_size", chunk_size)
        self.normalize = (True if normalize is None else bool(normalize)) \
            if kind in ("linear", "based") else None
        self.feature_map = None
        if kind in ("linear", "based"):
            self.feature_map = feature_map or ("elu" if kind == "linear" else "taylor")
            if isinstance(self.feature_map, str) and self.feature_map not in FEATURE_MAPS:
                raise LeanError(f"Attention: feature_map={describe(feature_map)}; expected one "
                                f"of {sorted(FEATURE_MAPS)} or a callable")

        hd, heads, kv_heads = self.head_dim, self.num_heads, self.num_kv_heads
        if self.rope and kind != "mla" and hd % 2:
            raise LeanError(f"Attention: head_dim={hd} with rope=True; RoPE rotates channel "
                            "pairs, so head_dim must be even (or rope=False)")
        self.value_dim = hd
        self.rotary = RotaryEmbedding(hd, rope_base) if self.rope and kind != "mla" else None

        if kind == "mla":
            self._init_mla(kv_lora_rank, rope_dim, latent_rope_dim, qkv_bias)
        elif kind == "based":
            if kv_heads % 2:
                raise LeanError(f"Attention: num_kv_heads={kv_heads} with kind='based'; the KV "
                                "heads are split in two halves (linear, sliding), so it must "
                                "be even")
            self.feature_dim = 16 if feature_dim is None else _int("feature_dim", feature_dim)
            if self.rope and self.feature_dim % 2:
                raise LeanError(f"Attention: feature_dim={feature_dim} with rope=True; expected "
                                "an even int")
            self.linear_kv_heads = kv_heads // 2
            self.linear_heads = self.linear_kv_heads * self.group
            window_heads = heads - self.linear_heads
            self.q_feat = nn.Linear(dim, self.linear_heads * self.feature_dim, bias=qkv_bias)
            self.k_feat = nn.Linear(dim, self.linear_kv_heads * self.feature_dim, bias=qkv_bias)
            self.q_proj = nn.Linear(dim, window_heads * hd, bias=qkv_bias)
            self.k_proj = nn.Linear(dim, (kv_heads - self.linear_kv_heads) * hd, bias=qkv_bias)
            self.v_proj = nn.Linear(dim, kv_heads * hd, bias=qkv_bias)
            self.feature_rotary = RotaryEmbedding(self.feature_dim, rope_base) \
                if self.rope else None
        else:
            self.q_proj = nn.Linear(dim, heads * hd, bias=qkv_bias)
            self.k_proj = nn.Linear(dim, kv_heads * hd, bias=qkv_bias)
            self.v_proj = nn.Linear(dim, kv_heads * hd, bias=qkv_bias)
        if kind == "gla":
            self.gate_rank = 16 if gate_rank is None else _int("gate_rank", gate_rank)
            self.gate_normalizer = 16.0 if gate_normalizer is None else float(gate_normalizer)
            if not self.gate_normalizer > 0:
                raise LeanError(f"Attention: gate_normalizer={describe(gate_normalizer)}; "
                                "expected a positive float")
            self.gate_proj = nn.Sequential(nn.Linear(dim, self.gate_rank, bias=False),
                                           nn.Linear(self.gate_rank, heads * hd, bias=True))
        self.o_proj = nn.Linear(heads * self.value_dim, dim, bias=proj_bias)
        self.dropout = nn.Dropout(dropout)

    # ------------------------------------------------------------------ construction: MLA
    def _init_mla(self, kv_lora_rank, rope_dim, latent_rope_dim, qkv_bias) -> None:
        hd, heads = self.head_dim, self.num_heads
        if kv_lora_rank is None:
            raise LeanError("Attention: kv_lora_rank=None with kind='mla'; pass the latent size "
                            "d_c, e.g. kv_lora_rank=4 * head_dim")
        self.kv_lora_rank = _int("kv_lora_rank", kv_lora_rank)
        if rope_dim is None:
            rope_dim = max(2, (hd // 2) // 2 * 2) if self.rope else 0
        self.rope_dim = _int("rope_dim", rope_dim, minimum=0)
        if self.rope_dim and (not self.rope or self.rope_dim % 2):
            raise LeanError(f"Attention: rope_dim={rope_dim} with rope={self.rope}; the decoupled "
                            "RoPE part needs rope=True and an even size (or rope_dim=0)")
        self.latent_rope_dim = _int("latent_rope_dim", latent_rope_dim or 0, minimum=0)
        if self.latent_rope_dim and (not self.rope or hd % 2 or self.latent_rope_dim % hd
                                     or self.latent_rope_dim > self.kv_lora_rank):
            raise LeanError(f"Attention: latent_rope_dim={latent_rope_dim}; expected a multiple "
                            f"of head_dim={hd} (even) at most kv_lora_rank={self.kv_lora_rank}, "
                            "with rope=True")
        dim = self.dim
        self.q_proj = nn.Linear(dim, heads * (hd + self.rope_dim), bias=qkv_bias)
        self.kv_down = nn.Linear(dim, self.kv_lora_rank, bias=qkv_bias)        # W_DKV
        self.k_up = nn.Linear(self.kv_lora_rank, heads * hd, bias=False)      # W_UK
        self.v_up = nn.Linear(self.kv_lora_rank, heads * hd, bias=False)      # W_UV
        self.k_rope_proj = nn.Linear(dim, self.rope_dim, bias=qkv_bias) if self.rope_dim else None
        self.rope_rotary = RotaryEmbedding(self.rope_dim, self.rope_base) if self.rope_dim else None
        self.latent_rotary = RotaryEmbedding(hd, self.rope_base) if self.latent_rope_dim else None

    def extra_repr(self) -> str:
        parts = [f"kind={self.kind!r}", f"dim={self.dim}", f"num_heads={self.num_heads}",
                 f"num_kv_heads={self.num_kv_heads}", f"head_dim={self.head_dim}",
                 f"causal={self.causal}", f"rope={self.rope}"]
        for name in ("window", "topk", "block_size", "kv_lora_rank", "rope_dim",
                     "latent_rope_dim", "feature_map", "feature_dim", "chunk_size"):
            value = getattr(self, name, None)
            if value:
                parts.append(f"{name}={value!r}")
        return ", ".join(parts)

    @property
    def scale(self) -> float:
        """The softmax scale: ``1 / sqrt(query-key dot size)`` (MLA: ``head_dim + rope_dim``)."""
        width = self.head_dim + (self.rope_dim if self.kind == "mla" else 0)
        return width ** -0.5

    # ------------------------------------------------------------------ cache sizes
    def kv_bytes_per_token(self, dtype: torch.dtype = torch.float32) -> int:
        """Bytes one cached token takes in this layer (batch 1): ``2 * num_kv_heads * head_dim *
        itemsize`` for the KV kinds, ``(kv_lora_rank + rope_dim) * itemsize`` for MLA, the window
        heads' share for ``based``, 0 for ``linear`` and ``gla`` (a fixed-size state instead)."""
        if self.kind == "mla":
            return kv_bytes_per_token(latent_dim=self.kv_lora_rank, rope_dim=self.rope_dim,
                                      dtype=dtype)
        if self.kind in LINEAR_KINDS:
            return 0
        kv_heads = self.num_kv_heads - (self.linear_kv_heads if self.kind == "based" else 0)
        return kv_bytes_per_token(num_kv_heads=kv_heads, head_dim=self.head_dim, dtype=dtype)

    def state_nbytes(self, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the recurrent state (``linear``, ``gla``, the linear heads of ``based``)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        if self.kind == "gla":
            return batch * self.num_heads * self.head_dim * self.value_dim * itemsize
        if self.kind in ("linear", "based"):
            heads = self.num_heads if self.kind == "linear" else self.linear_heads
            width = self.head_dim if self.kind == "linear" else self.feature_dim
            features = self._feature(torch.zeros(1, width, dtype=dtype)).shape[-1]
            return batch * heads * features * (self.value_dim + 1) * itemsize
        return 0

    def cache_nbytes(self, context_len: int, batch: int = 1,
                     dtype: torch.dtype = torch.float32) -> int:
        """Bytes a :class:`KVCache` holds for this layer after ``context_len`` tokens, without
        eviction: entries (all of them, or the last ``window - 1`` for sliding windows) times
        :meth:`kv_bytes_per_token`, plus the recurrent state."""
        entries = context_len
        if self.kind in ("sliding", "based"):
            entries = min(context_len, self.window - 1)
        return batch * entries * self.kv_bytes_per_token(dtype) + self.state_nbytes(batch, dtype)

    def _feature(self, x: Tensor) -> Tensor:
        fmap = self.feature_map
        return (FEATURE_MAPS[fmap] if isinstance(fmap, str) else fmap)(x)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, cache: KVCache | None = None, *,
                key_padding_mask: Tensor | None = None, absorb: bool | None = None) -> Tensor:
        """Attend over ``x (batch, seq, dim)``; returns ``(batch, seq, dim)``.

        With ``cache``, ``x`` continues the sequence the cache holds (a prompt to prefill, or
        the next tokens): its tokens sit at positions ``cache.seen_tokens(layer_idx)`` onwards,
        attend to the cached entries and to each other (causally), and are written to the cache.

        Args:
            key_padding_mask: (batch, seq) bool, True = real token (``exact``, ``topk``, ``mla``;
                not with a cache).
            absorb: ``mla`` only: use the absorbed form (attend in latent space; W_UK applied to
                the queries, W_UV to the attention output) or the unabsorbed one (rebuild K and V
                from the latent). Default: absorbed with a cache, unabsorbed without.
        """
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            raise LeanError(f"Attention: x of shape {describe(getattr(x, 'shape', x))}; expected "
                            f"(batch, seq, dim={self.dim})")
        if absorb is not None and self.kind != "mla":
            raise LeanError(f"Attention: absorb={absorb} with kind={self.kind!r}; only 'mla' has "
                            "an absorbed form")
        if key_padding_mask is not None:
            if self.kind not in ("exact", "topk", "mla") or cache is not None:
                raise LeanError(f"Attention: key_padding_mask with kind={self.kind!r}"
                                f"{' and a cache' if cache is not None else ''}; supported by "
                                "kinds exact, topk and mla, without a cache")
            if key_padding_mask.dtype != torch.bool or key_padding_mask.shape != x.shape[:2]:
                raise LeanError(f"Attention: key_padding_mask of shape "
                                f"{tuple(key_padding_mask.shape)} ({key_padding_mask.dtype}); "
                                f"expected bool (batch, seq)={tuple(x.shape[:2])}")
        entry = None
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise LeanTypeError(f"Attention: cache={describe(cache)}; expected a KVCache")
            if not self.causal:
                raise LeanError("Attention: a cache with causal=False; decoding attends to the "
                                "past only, build the layer with causal=True")
            entry = cache.layer(self.layer_idx)
            if entry.kind is None:
                entry.kind = self.kind
            elif entry.kind != self.kind:
                raise LeanError(f"Attention: cache layer {self.layer_idx} holds kind "
                                f"{entry.kind!r}, this layer is {self.kind!r}; give each layer "
                                "its own layer_idx")
        batch, seq, _ = x.shape
        start = 0 if entry is None else entry.seen
        positions = torch.arange(start, start + seq, device=x.device)

        if self.kind in SOFTMAX_KV_KINDS:
            heads = self._softmax_heads(x, positions, cache, entry, key_padding_mask)
        elif self.kind == "mla":
            heads = self._mla_heads(x, positions, cache, entry, key_padding_mask, absorb)
        elif self.kind in LINEAR_KINDS:
            heads = self._linear_heads(x, positions, entry)
        else:
            heads = self._based_heads(x, positions, cache, entry)
        if entry is not None:
            entry.seen += seq
        out = heads.transpose(1, 2).reshape(batch, seq, self.num_heads * self.value_dim)
        return self.dropout(self.o_proj(out))

    def step(self, x_t: Tensor, cache: KVCache, *, absorb: bool | None = None) -> Tensor:
        """Decode one token: ``x_t (batch, dim)`` or ``(batch, 1, dim)`` -> the same shape."""
        if not isinstance(cache, KVCache):
            raise LeanTypeError(f"Attention.step: cache={describe(cache)}; expected a KVCache")
        if isinstance(x_t, Tensor) and x_t.dim() == 2:
            return self.forward(x_t.unsqueeze(1), cache, absorb=absorb).squeeze(1)
        if not isinstance(x_t, Tensor) or x_t.dim() != 3 or x_t.shape[1] != 1:
            raise LeanError(f"Attention.step: x_t of shape {describe(getattr(x_t, 'shape', x_t))}"
                            f"; expected (batch, dim) or (batch, 1, dim)")
        return self.forward(x_t, cache, absorb=absorb)

    # ------------------------------------------------------------------ softmax kinds
    def _rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        return x if self.rotary is None else self.rotary(x, positions)

    def _softmax_heads(self, x, positions, cache, entry, key_padding_mask) -> Tensor:
        q = self._rotate(_split_heads(self.q_proj(x), self.num_heads), positions)
        k = self._rotate(_split_heads(self.k_proj(x), self.num_kv_heads), positions)
        v = _split_heads(self.v_proj(x), self.num_kv_heads)
        if entry is None:
            return self._softmax_full(q, k, v, key_padding_mask)

        def attend(keys: Tensor, values: Tensor, key_positions: Tensor) -> Tensor:
            return self._softmax_cached(q, keys, values, positions, key_positions)

        return self._write_and_attend(cache, entry, k, v, positions, attend, q, self.scale)

    def _softmax_full(self, q, k, v, key_padding_mask) -> Tensor:
        """The kind's op over a whole sequence (queries and keys at positions 0..n-1)."""
        if self.kind == "exact":
            return attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask)
        if self.kind == "sliding":
            return sliding_window_attention(q, k, v, window=self.window, causal=self.causal)
        if self.kind == "topk":
            mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
            return topk_attention(q, k, v, topk=self.topk, causal=self.causal, mask=mask)
        blocks = math.ceil(q.shape[2] / self.block_size)
        mask = self._block_mask(blocks, blocks)
        return block_sparse_attention(q, k, v, mask, block_size=self.block_size,
                                          causal=self.causal)

    def _block_mask(self, q_blocks: int, k_blocks: int) -> Tensor:
        mask = self.block_mask(q_blocks, k_blocks) if callable(self.block_mask) \
            else self.block_mask
        if mask.shape[-2] < q_blocks or mask.shape[-1] < k_blocks:
            raise LeanError(f"Attention: block_mask of shape {tuple(mask.shape)} covers "
                            f"{mask.shape[-2]} x {mask.shape[-1]} blocks; the sequence needs "
                            f"{q_blocks} x {k_blocks} (block_size={self.block_size}); pass a "
                            "larger mask or a callable")
        return mask[..., :q_blocks, :k_blocks]

    def _softmax_cached(self, q, keys, values, positions, key_positions) -> Tensor:
        """New queries (at ``positions``) over cached-and-new keys; bottom-right causal."""
        if self.kind == "exact":
            return attention(q, keys, values, causal=True)
        if self.kind == "topk":
            return topk_attention(q, keys, values, topk=self.topk, causal=True)
        if self.kind == "sliding":
            return self._sliding_cached(q, keys, values)
        # block_sparse: expand the block mask at the absolute positions of queries and keys
        # (no eviction for this kind, so key positions are 0..L-1).
        key_blocks = key_positions[0, 0] // self.block_size
        query_blocks = positions // self.block_size
        mask = self._block_mask(int(query_blocks[-1]) + 1, int(key_blocks[-1]) + 1)
        allowed = mask[:, query_blocks][:, :, key_blocks].unsqueeze(0)
        return attention(q, keys, values, causal=True, mask=allowed)

    def _sliding_cached(self, q, keys, values) -> Tensor:
        if q.shape[2] == 1:  # the cache holds at most window - 1 keys: all are in the window
            return attention(q, keys, values)
        return sliding_window_attention(q, keys, values, window=self.window, causal=True)

    def _write_and_attend(self, cache: KVCache, entry: LayerCache, k: Tensor,
                          v: Tensor | None, positions: Tensor,
                          attend: Callable[[Tensor, Tensor | None, Tensor], Tensor],
                          votes_query: Tensor | Callable[[], Tensor], scale: float) -> Tensor:
        """Write the new keys/values to the layer's buffer and attend over everything kept.

        Unbounded layers append in place and attend over a view of the buffer. Bounded layers
        (sliding windows keep their last ``window - 1`` entries; evicting layers what the policy
        selects, from the attention of ``votes_query`` at softmax ``scale``) attend over cached
        and new entries, then drop the rest:

        * one new token (decoding): appended in place; when it pushes exactly one entry out of
          each row, the last entry moves into the freed slot, so a step copies O(1) entries,
          not the whole budget. Entries are then no longer in position order, which softmax
          attention over past keys does not need (keys carry their RoPE, and every cached entry
          is visible to every new query);
        * several new tokens (a prompt): attention over ``cached ++ new``, then the kept entries
          are gathered into the buffer.
        """
        sliding = self.kind in ("sliding", "based")
        policy = None if sliding else cache.policy
        if policy is not None and self.kind not in EVICTABLE_KINDS:
            raise LeanError(f"Attention: cache policy {policy!r} with kind={self.kind!r}; "
                            f"eviction applies to kinds {EVICTABLE_KINDS} (sliding, linear, gla "
                            "and based caches are bounded already and ignore the policy)")
        if entry.kv is None:
            bound = self.window - 1 if sliding else (
                policy.budget if policy is not None and policy.bounded else None)
            # room for one token beyond the bound: decoding appends before it evicts
            entry.kv = cache.new_buffer(None if bound is None else bound + 1)
        buffer = entry.kv
        num_new = k.shape[2]
        new_positions = positions.expand(k.shape[0], k.shape[1], num_new)
        if not sliding and policy is None:
            buffer.append(k, v, new_positions)
            keys, values, key_positions = buffer.view()
            return attend(keys, values, key_positions)

        in_place = num_new == 1 and (buffer.max_len is None
                                     or buffer.length + 1 <= buffer.max_len)
        if in_place:
            buffer.append(k, v, new_positions)
            keys, values, key_positions = buffer.view()
        else:
            cached_keys, cached_values, cached_positions = buffer.view()
            if cached_keys is None or cached_keys.shape[2] == 0:
                keys, values, key_positions = k, v, new_positions
            else:
                if sliding:  # the banded op needs the cached keys back in position order
                    order = cached_positions[0, 0].argsort()
                    cached_keys, cached_positions = (cached_keys[:, :, order],
                                                     cached_positions[:, :, order])
                    cached_values = cached_values[:, :, order]
                keys = torch.cat((cached_keys, k), dim=2)
                values = None if v is None else torch.cat((cached_values, v), dim=2)
                key_positions = torch.cat((cached_positions, new_positions), dim=2)
        out = attend(keys, values, key_positions)

        scores = None
        if sliding:
            newest = key_positions.amax(dim=-1, keepdim=True)
            keep = key_positions > newest - (self.window - 1)
        else:
            def votes(last: int) -> Tensor:
                query = votes_query() if callable(votes_query) else votes_query
                return attention_votes(query[:, :, -last:], keys, scale=scale)

            old_scores = buffer.valid_scores()
            if in_place and old_scores is not None:
                old_scores = old_scores[:, :, :-1]
            keep, scores = policy.select(key_positions, num_new, votes, old_scores)

        if in_place:
            if scores is not None:
                buffer.set_scores(scores)
            if keep is not None:
                dropped = (~keep).sum(dim=-1)
                if bool((dropped == 1).all()):
                    buffer.evict_one(keep.to(torch.uint8).argmin(dim=-1))
                elif bool(dropped.any()):
                    buffer.keep(keep)
            return out
        if keep is None:
            buffer.replace(keys, values, key_positions, scores)
            return out
        index = _kept_indices(keep)
        buffer.replace(_gather_entries(keys, index), _gather_entries(values, index),
                       _gather_entries(key_positions, index), _gather_entries(scores, index))
        return out

    # ------------------------------------------------------------------ MLA
    def _rotate_latent(self, latent: Tensor, positions: Tensor) -> Tensor:
        """Rotate the first ``latent_rope_dim`` channels of ``latent (batch, seq, d_c)`` in blocks
        of ``head_dim`` (each block is one GQA key head in a converted layer)."""
        if not self.latent_rope_dim:
            return latent
        batch, seq, _ = latent.shape
        blocks = self.latent_rope_dim // self.head_dim
        rotated = latent[..., : self.latent_rope_dim].reshape(batch, seq, blocks, self.head_dim)
        rotated = self.latent_rotary(rotated.transpose(1, 2), positions).transpose(1, 2)
        return torch.cat((rotated.reshape(batch, seq, -1), latent[..., self.latent_rope_dim:]),
                         dim=-1)

    def mla_latent(self, x: Tensor, positions: Tensor) -> Tensor:
        """What MLA caches per token: ``(batch, 1, seq, kv_lora_rank + rope_dim)``, the latent
        ``c = x W_DKV`` (its first ``latent_rope_dim`` channels rotated) followed by the shared
        rotated RoPE key ``RoPE(x W_KR)``."""
        latent = self._rotate_latent(self.kv_down(x), positions).unsqueeze(1)
        if self.rope_dim:
            rope_key = self.rope_rotary(self.k_rope_proj(x).unsqueeze(1), positions)
            latent = torch.cat((latent, rope_key), dim=-1)
        return latent

    def _mla_queries(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``(q_nope (batch, heads, seq, head_dim), q_rope (batch, heads, seq, rope_dim))``."""
        q = _split_heads(self.q_proj(x), self.num_heads)
        q_nope, q_rope = q.split((self.head_dim, self.rope_dim), dim=-1)
        if self.rope_dim:
            q_rope = self.rope_rotary(q_rope, positions)
        if self.latent_rope_dim:
            q_nope = self.latent_rotary(q_nope, positions)
        return q_nope, q_rope

    def _mla_absorbed_query(self, q_nope: Tensor, q_rope: Tensor) -> Tensor:
        """``[q_nope_h W_UK_h^T, q_rope_h]``: a query that scores the cached latent directly."""
        w_uk = self.k_up.weight.view(self.num_heads, self.head_dim, self.kv_lora_rank)
        return torch.cat((torch.einsum("bhnd,hdc->bhnc", q_nope, w_uk), q_rope), dim=-1)

    def _mla_unabsorbed(self, q_nope, q_rope, latent, causal, key_padding_mask) -> Tensor:
        """Rebuild per-head K = [c W_UK, k_rope] and V = c W_UV from the latent and attend."""
        c = latent[:, 0, :, : self.kv_lora_rank]
        keys = _split_heads(self.k_up(c), self.num_heads)
        if self.rope_dim:
            rope_key = latent[:, :, :, self.kv_lora_rank:]
            keys = torch.cat((keys, rope_key.expand(-1, self.num_heads, -1, -1)), dim=-1)
        values = _split_heads(self.v_up(c), self.num_heads)
        q = torch.cat((q_nope, q_rope), dim=-1)
        return attention(q, keys, values, causal=causal, key_padding_mask=key_padding_mask,
                             scale=self.scale)

    def _mla_absorbed(self, q_nope, q_rope, latent, causal, key_padding_mask) -> Tensor:
        """Attend in latent space: MQA with one KV head whose keys are ``[c, k_R]``; W_UV is
        applied to the (per-head) result.

        The values are the whole cached row ``[c, k_R]`` and the last ``rope_dim`` output
        channels are dropped: exactly ``softmax(.) c``, at ``rope_dim / kv_lora_rank`` extra AV
        work, but with keys and values of one size, so torch's fused SDPA kernel applies (a
        value size differing from the key size sends SDPA to its math path). When no causal
        mask is needed (one new token, or ``causal=False``) the heads are folded into the query
        axis, ``(batch, 1, heads * n, d_c + d_R)``: single-head attention over the latent, with
        no per-head copy of it.
        """
        q = self._mla_absorbed_query(q_nope, q_rope)
        batch, heads, n, width = q.shape
        if n == 1 or not causal:
            folded = attention(q.reshape(batch, 1, heads * n, width), latent, latent,
                                   key_padding_mask=key_padding_mask, scale=self.scale)
            out = folded.view(batch, heads, n, width)
        else:
            out = attention(q, latent, latent, causal=True,
                                key_padding_mask=key_padding_mask, scale=self.scale)
        w_uv = self.v_up.weight.view(self.num_heads, self.value_dim, self.kv_lora_rank)
        return torch.einsum("bhnc,hvc->bhnv", out[..., : self.kv_lora_rank], w_uv)

    def _mla_heads(self, x, positions, cache, entry, key_padding_mask, absorb) -> Tensor:
        q_nope, q_rope = self._mla_queries(x, positions)
        latent = self.mla_latent(x, positions)
        absorb = (entry is not None) if absorb is None else absorb
        run = self._mla_absorbed if absorb else self._mla_unabsorbed
        if entry is None:
            return run(q_nope, q_rope, latent, self.causal, key_padding_mask)

        def attend(keys: Tensor, values: Tensor | None, key_positions: Tensor) -> Tensor:
            return run(q_nope, q_rope, keys, True, None)

        def votes_query() -> Tensor:
            return self._mla_absorbed_query(q_nope, q_rope)

        return self._write_and_attend(cache, entry, latent, None, positions, attend,
                                      votes_query, self.scale)

    # ------------------------------------------------------------------ linear kinds
    def _linear_op(self, q, k, v, entry, feature_map, normalize) -> Tensor:
        if entry is None:
            return linear_attention(q, k, v, feature_map=feature_map, causal=self.causal,
                                        normalize=normalize, mode="chunk",
                                        chunk_size=self.chunk_size)
        if q.shape[2] == 1:
            out, entry.state = linear_attention_step(q, k, v, entry.state,
                                                         feature_map=feature_map,
                                                         normalize=normalize)
            return out
        out, entry.state = linear_attention(
            q, k, v, feature_map=feature_map, causal=True, normalize=normalize, mode="chunk",
            chunk_size=self.chunk_size, initial_state=entry.state, return_state=True)
        return out

    def log_decay(self, x: Tensor) -> Tensor:
        """GLA's per-step log decay ``(batch, heads, seq, head_dim)``:
        ``logsigmoid(x W_1 W_2 + b) / gate_normalizer`` (<= 0, so the decay is in (0, 1])."""
        logits = self.gate_proj(x)
        return _split_heads(F.logsigmoid(logits) / self.gate_normalizer, self.num_heads)

    def _linear_heads(self, x, positions, entry) -> Tensor:
        q = self._rotate(_split_heads(self.q_proj(x), self.num_heads), positions)
        k = self._rotate(_split_heads(self.k_proj(x), self.num_kv_heads), positions)
        v = _split_heads(self.v_proj(x), self.num_kv_heads)
        k, v = _repeat_kv(k, self.group), _repeat_kv(v, self.group)
        if self.kind == "linear":
            return self._linear_op(q, k, v, entry, self.feature_map, self.normalize)
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

    # ------------------------------------------------------------------ based
    def _based_heads(self, x, positions, cache, entry) -> Tensor:
        """The first ``num_kv_heads // 2`` KV heads (and their query groups) run Taylor linear
        attention on ``feature_dim``-sized queries/keys; the others run sliding-window softmax
        attention. Their per-head outputs are concatenated before the output projection."""
        v = _split_heads(self.v_proj(x), self.num_kv_heads)
        v_linear, v_window = v[:, : self.linear_kv_heads], v[:, self.linear_kv_heads:]
        qf = _split_heads(self.q_feat(x), self.linear_heads)
        kf = _split_heads(self.k_feat(x), self.linear_kv_heads)
        if self.feature_rotary is not None:
            qf, kf = self.feature_rotary(qf, positions), self.feature_rotary(kf, positions)
        linear_out = self._linear_op(qf, _repeat_kv(kf, self.group),
                                     _repeat_kv(v_linear, self.group), entry, self.feature_map,
                                     self.normalize)
        q = self._rotate(_split_heads(self.q_proj(x), self.num_heads - self.linear_heads),
                         positions)
        k = self._rotate(_split_heads(self.k_proj(x), self.num_kv_heads - self.linear_kv_heads),
                         positions)
        if entry is None:
            window_out = sliding_window_attention(q, k, v_window, window=self.window,
                                                      causal=True)
        else:
            def attend(keys: Tensor, values: Tensor, key_positions: Tensor) -> Tensor:
                return self._sliding_cached(q, keys, values)

            window_out = self._write_and_attend(cache, entry, k, v_window, positions, attend, q,
                                                self.scale)
        return torch.cat((linear_out, window_out), dim=1)
