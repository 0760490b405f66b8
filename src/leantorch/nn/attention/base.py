"""The base every attention kind shares: :class:`Attention`.

It holds what does not depend on the kind: the shared constructor arguments (``dim``,
``num_heads``, ``num_kv_heads``, ``head_dim``, ``causal``, ``rope``, ``rope_base``, ``qkv_bias``,
``proj_bias``, ``dropout``, ``layer_idx``), the rotary embedding, the GQA repeat, the output
projection and dropout, the ``forward`` / ``step`` skeleton (input checks, the layer's cache
entry, token positions) and the cache-size formulas of a plain KV layer. Each kind family lives
in its own module and overrides :meth:`Attention._heads` (``softmax.py``, ``mla.py``,
``linear.py``, ``based.py``); its arguments are a config dataclass (``SlidingConfig(window=64)``)
validated on construction.

``Attention(dim, num_heads, num_kv_heads, kind="sliding", window=64)`` is the factory:
``Attention.__new__`` picks the class registered for ``kind`` and the flat keyword arguments
become that class's config, so ``isinstance(layer, Attention)`` and ``layer.kind`` hold for every
kind. Each kind class is also built directly, from its config or from the same keywords:
``SlidingAttention(64, 8, 2, config=SlidingConfig(window=16))``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from leantorch.errors import LeanError, LeanTypeError, describe
from leantorch.nn.attention.cache import Attend, KVCache, LayerCache, kv_bytes_per_token
from leantorch.nn.attention.kv_quant import KVQuant
from leantorch.nn.attention.rotary import RotaryEmbedding
from leantorch.validate import positive_int, ratio

__all__ = [
    "EVICTABLE_KINDS", "KINDS", "Attention", "missing_hint", "repeat_kv", "split_heads",
]

KINDS = ("exact", "sliding", "block_sparse", "topk", "mla", "linear", "gla", "based")
#: kinds whose KV cache an eviction policy may shrink (per-head softmax over arbitrary keys)
EVICTABLE_KINDS = ("exact", "topk", "mla")

# What the hint says when a kind's required argument is missing (Attention: window=None with ...).
_MISSING_HINT = "missing_hint"


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(batch, seq, heads * d) -> (batch, heads, seq, d)."""
    batch, seq, _ = x.shape
    return x.view(batch, seq, heads, -1).transpose(1, 2)


def repeat_kv(x: Tensor, group: int) -> Tensor:
    """(batch, kv_heads, seq, d) -> (batch, kv_heads * group, seq, d): each KV head copied to
    its ``group`` consecutive query heads (for the linear ops, which take one K/V per head)."""
    return x if group == 1 else x.repeat_interleave(group, dim=1)


class Attention(nn.Module):
    """Multi-head attention of a chosen ``kind`` with RoPE, GQA and a KV-cache decode path.

    ``Attention(dim, num_heads, num_kv_heads=None, kind="exact", **kind_args)`` returns the
    module of that kind (:class:`~leantorch.nn.attention.softmax.ExactAttention`,
    ``SlidingAttention``, ``BlockSparseAttention``, ``TopKAttention``, ``LatentAttention``,
    ``LinearAttention``, ``GatedLinearAttention``, ``BasedAttention``: all subclasses of this
    one). ``kind_args`` are the fields of that kind's config (``SlidingConfig``, ``MLAConfig``,
    ...); an argument another kind uses is refused, naming the kinds it applies to. Pass
    ``config=`` instead of the flat keywords to give the config itself.

    Args:
        dim: model width (input and output features).
        num_heads: query heads.
        num_kv_heads: key/value heads (GQA; default ``num_heads``; 1 is MQA). Must divide
            ``num_heads``. Not used by ``"mla"`` (its keys/values come from the latent).
        kind: one of :data:`KINDS` (see :mod:`leantorch.nn.attention.attention`).
        config: the kind's config dataclass (instead of ``kind_args``).
        head_dim: per-head size (default ``dim // num_heads``).
        causal: causal attention (bottom-right aligned). ``gla`` and ``based`` are causal only.
            Decoding with a cache needs ``causal=True``.
        rope, rope_base: rotary embedding on queries and keys, and its base.
        qkv_bias, proj_bias: biases of the input projections and of the output projection.
        dropout: dropout on the output (after the output projection), in training mode.
        layer_idx: which entry of a :class:`KVCache` this layer uses.
    """

    #: the kind a subclass implements (``m.kind``); set on every concrete subclass
    kind: ClassVar[str]
    #: the config dataclass of the kind (None: the kind takes no arguments of its own)
    config_class: ClassVar[type | None] = None
    #: kinds that accept ``key_padding_mask`` (without a cache)
    supports_key_padding_mask: ClassVar[bool] = False
    #: kinds with an absorbed form (``absorb=``)
    has_absorbed_form: ClassVar[bool] = False
    #: kinds that may only be causal
    causal_only: ClassVar[bool] = False
    #: kinds whose queries/keys all go through ``self.rotary`` (MLA rotates its own parts)
    uses_head_rotary: ClassVar[bool] = True
    #: kinds whose keys/values come from one shared latent (MLA): num_kv_heads must stay None
    shares_one_latent: ClassVar[bool] = False
    _by_kind: ClassVar[dict[str, type[Attention]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if isinstance(kind, str):
            Attention._by_kind[kind] = cls

    def __new__(cls, *args: Any, **kwargs: Any) -> Attention:
        if cls is Attention:  # the factory: build the class registered for `kind`
            kind = args[3] if len(args) > 3 else kwargs.get("kind", "exact")
            if kind not in KINDS or kind not in Attention._by_kind:
                raise LeanError(f"Attention: kind={describe(kind)}; expected one of {KINDS}")
            cls = Attention._by_kind[kind]
        return super().__new__(cls)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        kind: str | None = None,
        *,
        config: Any = None,
        head_dim: int | None = None,
        causal: bool = True,
        rope: bool = True,
        rope_base: float = 10000.0,
        qkv_bias: bool = False,
        proj_bias: bool = False,
        dropout: float = 0.0,
        layer_idx: int = 0,
        **kind_args: Any,
    ) -> None:
        super().__init__()
        own = getattr(type(self), "kind", None)  # a subclass of a kind class keeps its kind
        if not isinstance(own, str):
            raise LeanTypeError(f"{type(self).__name__}: not an attention kind; build "
                                "Attention(..., kind=...) or one of its kind classes")
        if kind is not None and kind != own:
            raise LeanError(f"{type(self).__name__}: kind={describe(kind)}; this class is "
                            f"kind={own!r} (build Attention(..., kind={kind!r}) instead)")
        self.dim = positive_int("Attention", "dim", dim)
        self.num_heads = positive_int("Attention", "num_heads", num_heads)
        self.config = self._make_config(config, kind_args)
        if self.shares_one_latent and num_kv_heads not in (None, num_heads):
            raise LeanError(f"Attention: num_kv_heads={describe(num_kv_heads)} with kind={own!r}; "
                            "MLA rebuilds per-head keys/values from one latent, leave it None")
        self.num_kv_heads = num_heads if num_kv_heads is None else positive_int(
            "Attention", "num_kv_heads", num_kv_heads)
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
        self.head_dim = positive_int("Attention", "head_dim", head_dim)
        if not isinstance(causal, bool):
            raise LeanTypeError(f"Attention: causal={describe(causal)}; expected a bool")
        if self.causal_only and not causal:
            raise LeanError(f"Attention: causal=False with kind={own!r}; {own} is causal only")
        self.causal = causal
        ratio("Attention", "dropout", dropout)
        self.layer_idx = positive_int("Attention", "layer_idx", layer_idx, minimum=0)
        self.rope = bool(rope)
        self.rope_base = float(rope_base)
        self.value_dim = self.head_dim
        self.rotary: RotaryEmbedding | None = None
        if self.rope and self.uses_head_rotary:
            if self.head_dim % 2:
                raise LeanError(f"Attention: head_dim={self.head_dim} with rope=True; RoPE "
                                "rotates channel pairs, so head_dim must be even (or rope=False)")
            self.rotary = RotaryEmbedding(self.head_dim, rope_base)
        self._build(qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.value_dim, self.dim, bias=proj_bias)
        self.dropout = nn.Dropout(dropout)

    # ------------------------------------------------------------------ construction
    @classmethod
    def _make_config(cls, config: Any, kind_args: dict[str, Any]) -> Any:
        """The kind's config: ``config`` as given, or built from the flat keyword arguments
        (None values mean "not given", as they always have)."""
        given = {name: value for name, value in kind_args.items() if value is not None}
        fields = {} if cls.config_class is None else {
            f.name: f for f in dataclasses.fields(cls.config_class)}
        for name, value in given.items():
            if name in fields:
                continue
            users = tuple(k for k in KINDS if name in _config_fields(Attention._by_kind.get(k)))
            if users:
                raise LeanError(f"Attention: {name}={describe(value)} is not used by "
                                f"kind={cls.kind!r}; it applies to kinds {users}")
            raise LeanTypeError(f"Attention: unexpected argument {name}={describe(value)}; "
                                f"kind={cls.kind!r} takes {tuple(fields) or 'no arguments'} "
                                "besides the shared ones")
        if config is not None:
            if given:
                raise LeanError(f"{cls.__name__}: config={describe(config)} and "
                                f"{', '.join(given)}; pass the kind's arguments one way")
            if cls.config_class is None or not isinstance(config, cls.config_class):
                expected = "None" if cls.config_class is None else cls.config_class.__name__
                raise LeanTypeError(f"{cls.__name__}: config={describe(config)}; expected "
                                    f"{expected}")
            return config
        if cls.config_class is None:
            return None
        for name, f in fields.items():
            if name not in given and f.default is dataclasses.MISSING \
                    and f.default_factory is dataclasses.MISSING:
                raise LeanError(f"Attention: {name}=None with kind={cls.kind!r}; pass "
                                f"{f.metadata.get(_MISSING_HINT, name)}")
        return cls.config_class(**given)

    def _build(self, qkv_bias: bool) -> None:
        """Create the input projections (and anything else the kind owns): q/k/v by default."""
        dim, hd = self.dim, self.head_dim
        self.q_proj = nn.Linear(dim, self.num_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, self.num_kv_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, self.num_kv_heads * hd, bias=qkv_bias)

    def extra_repr(self) -> str:
        parts = [f"kind={self.kind!r}", f"dim={self.dim}", f"num_heads={self.num_heads}",
                 f"num_kv_heads={self.num_kv_heads}", f"head_dim={self.head_dim}",
                 f"causal={self.causal}", f"rope={self.rope}"]
        if self.config is not None:
            for f in dataclasses.fields(self.config):
                value = getattr(self.config, f.name)
                if isinstance(value, str) or (isinstance(value, int | float) and value):
                    parts.append(f"{f.name}={value!r}")  # masks and callables are left out
        return ", ".join(parts)

    @property
    def scale(self) -> float:
        """The softmax scale: ``1 / sqrt(query-key dot size)``."""
        return self.head_dim ** -0.5

    # ------------------------------------------------------------------ cache sizes
    def cached_kv_layout(self) -> tuple[int, int, int | None] | None:
        """``(heads, key_dim, value_dim)`` of one entry of this layer's KV buffer (value_dim
        None: no separate values, as MLA's latent), or None when the layer has no KV buffer.
        ``(num_kv_heads, head_dim, head_dim)`` here; MLA, linear kinds and Based override it."""
        return self.num_kv_heads, self.head_dim, self.head_dim

    def kv_bytes_per_token(self, dtype: torch.dtype = torch.float32,
                           quant: KVQuant | None = None) -> int:
        """Bytes one cached token takes in this layer (batch 1): ``2 * num_kv_heads * head_dim *
        itemsize`` for the KV kinds, from :meth:`cached_kv_layout`; with ``quant`` (a cache's
        :attr:`KVCache.kv_quant`) the codes and per-token scales instead."""
        layout = self.cached_kv_layout()
        if layout is None:
            return 0
        heads, key_dim, value_dim = layout
        if value_dim is None:
            return kv_bytes_per_token(latent_dim=key_dim, dtype=dtype, quant=quant)
        return kv_bytes_per_token(num_kv_heads=heads, head_dim=key_dim, value_dim=value_dim,
                                  dtype=dtype, quant=quant)

    def state_nbytes(self, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the recurrent state (``linear``, ``gla``, the linear heads of ``based``)."""
        return 0

    def cached_entries(self, context_len: int) -> int:
        """Entries (per KV head) the cache holds after ``context_len`` tokens, no eviction."""
        return context_len

    def cache_nbytes(self, context_len: int, batch: int = 1,
                     dtype: torch.dtype = torch.float32, quant: KVQuant | None = None) -> int:
        """Bytes a :class:`KVCache` holds for this layer after ``context_len`` tokens, without
        eviction: entries (all of them, or the last ``window - 1`` for sliding windows) times
        :meth:`kv_bytes_per_token`, plus the recurrent state; with a per-channel ``quant``,
        plus the key scales (``4 * heads * key_dim`` bytes per sequence); with a ``residual``
        window, plus its float copies (:meth:`KVQuant.window_nbytes`)."""
        entries = self.cached_entries(context_len)
        total = batch * entries * self.kv_bytes_per_token(dtype, quant) \
            + self.state_nbytes(batch, dtype)
        layout = self.cached_kv_layout()
        if quant is not None and layout is not None and entries:
            total += batch * (quant.fixed_nbytes(layout[0], layout[1])
                              + quant.window_nbytes(entries, *layout, dtype))
        return total

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
        if absorb is not None and not self.has_absorbed_form:
            raise LeanError(f"Attention: absorb={absorb} with kind={self.kind!r}; only 'mla' has "
                            "an absorbed form")
        if key_padding_mask is not None:
            if not self.supports_key_padding_mask or cache is not None:
                raise LeanError(f"Attention: key_padding_mask with kind={self.kind!r}"
                                f"{' and a cache' if cache is not None else ''}; supported by "
                                "kinds exact, topk and mla, without a cache")
            if key_padding_mask.dtype != torch.bool or key_padding_mask.shape != x.shape[:2]:
                raise LeanError(f"Attention: key_padding_mask of shape "
                                f"{tuple(key_padding_mask.shape)} ({key_padding_mask.dtype}); "
                                f"expected bool (batch, seq)={tuple(x.shape[:2])}")
        entry = None if cache is None else self._cache_entry(cache)
        batch, seq, _ = x.shape
        start = 0 if entry is None else entry.seen
        positions = torch.arange(start, start + seq, device=x.device)
        heads = self._heads(x, positions, cache, entry, key_padding_mask, absorb)
        if entry is not None:
            entry.seen += seq
        out = heads.transpose(1, 2).reshape(batch, seq, self.num_heads * self.value_dim)
        return self.dropout(self.o_proj(out))

    def _cache_entry(self, cache: KVCache) -> LayerCache:
        """This layer's entry of ``cache``, checked: a causal layer, one kind per entry, and an
        eviction policy only on the kinds it applies to."""
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
        return entry

    def _write_and_attend(self, cache: KVCache, entry: LayerCache, k: Tensor, v: Tensor | None,
                          positions: Tensor, attend: Attend,
                          votes_query: Tensor | Callable[[], Tensor] | None = None,
                          window: int | None = None) -> Tensor:
        """Hand the new keys/values to the cache (:meth:`KVCache.write_and_attend`, which keeps
        what the window or the cache's eviction policy selects) and attend over what it gives
        back. A policy on a kind it may not shrink is refused here."""
        if window is None and cache.policy is not None and self.kind not in EVICTABLE_KINDS:
            raise LeanError(f"Attention: cache policy {cache.policy!r} with kind={self.kind!r}; "
                            f"eviction applies to kinds {EVICTABLE_KINDS} (sliding, linear, gla "
                            "and based caches are bounded already and ignore the policy)")
        return cache.write_and_attend(entry, k, v, positions, attend, window=window,
                                      votes_query=votes_query, scale=self.scale)

    def _heads(self, x: Tensor, positions: Tensor, cache: KVCache | None,
               entry: LayerCache | None, key_padding_mask: Tensor | None,
               absorb: bool | None) -> Tensor:
        """The kind's per-head outputs ``(batch, num_heads, seq, value_dim)`` for ``x (batch,
        seq, dim)`` at ``positions (seq,)``; with a cache entry, reading and writing it."""
        raise NotImplementedError

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

    # ------------------------------------------------------------------ shared pieces
    def _rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        """RoPE on ``x (batch, heads, seq, head_dim)`` at ``positions`` (identity without)."""
        return x if self.rotary is None else self.rotary(x, positions)

    def _qkv(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated ``q (batch, heads, seq, d)``, ``k (batch, kv_heads, seq, d)`` and ``v``."""
        q = self._rotate(split_heads(self.q_proj(x), self.num_heads), positions)
        k = self._rotate(split_heads(self.k_proj(x), self.num_kv_heads), positions)
        return q, k, split_heads(self.v_proj(x), self.num_kv_heads)


def _config_fields(cls: type[Attention] | None) -> tuple[str, ...]:
    if cls is None or cls.config_class is None:
        return ()
    return tuple(f.name for f in dataclasses.fields(cls.config_class))


def missing_hint(hint: str) -> dict[str, str]:
    """Metadata of a required config field (``field(metadata=missing_hint(...))``): what the
    factory tells a caller who left it out."""
    return {_MISSING_HINT: hint}


BlockMask = Tensor | Callable[[int, int], Tensor]
