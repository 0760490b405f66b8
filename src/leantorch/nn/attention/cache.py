"""The KV cache: what an :class:`~leantorch.nn.attention.Attention` layer keeps between decoding
steps, per layer.

* softmax kinds (``exact``, ``topk``, ``block_sparse``): keys and values ``(batch, kv_heads, L,
  head_dim)``, growing by one entry per token;
* ``sliding``: the last ``window - 1`` keys and values (all a new token can see besides itself);
* ``mla``: the latent ``c = x W_DKV`` and the decoupled RoPE key, one ``(batch, 1, L,
  kv_lora_rank + rope_dim)`` tensor shared by all heads;
* ``linear`` / ``gla``: the recurrent state, whose size does not depend on L;
* ``based``: the linear heads' state plus the window heads' last ``window - 1`` keys and values.

Keys are cached **after** the rotary embedding, so each entry keeps the position it was written
at; new tokens get position ``seen_tokens`` (tokens written so far), never the number of entries
held, so evicting entries never shifts the positions of later tokens.

A cache is *static* (``KVCache.static(max_len)``: each layer's buffers are allocated once, at
their first write, with room for ``max_len`` entries, and writing past it raises) or *dynamic*
(``KVCache.dynamic()``: buffers grow by doubling, so appending a token is amortised O(1)). An
optional eviction policy (:mod:`leantorch.nn.attention.eviction`) bounds the entries kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from leantorch.errors import LeanError, LeanTypeError, describe
from leantorch.nn.attention.eviction import EvictionPolicy, attention_votes
from leantorch.nn.attention.kv_quant import KVQuant

__all__ = ["KVBuffer", "KVCache", "LayerCache", "kv_bytes_per_token"]

#: per-entry tensors of a buffer: eviction moves all of them together (codes with their scales)
_ENTRY_FIELDS = ("keys", "values", "key_scales", "value_scales", "high_slot", "positions",
                 "scores")

#: ``attend(keys, values, key_positions) -> out``: a layer's attention over the entries it is given
Attend = Callable[[Tensor, "Tensor | None", Tensor], Tensor]


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


def kv_bytes_per_token(
    *,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    value_dim: int | None = None,
    latent_dim: int | None = None,
    rope_dim: int = 0,
    dtype: torch.dtype = torch.float32,
    quant: KVQuant | None = None,
) -> int:
    """Bytes of KV cache one token adds to one layer (batch 1).

    MHA / GQA / MQA (``num_kv_heads``, ``head_dim``, optional ``value_dim``):
    ``num_kv_heads * (head_dim + value_dim) * itemsize``, i.e. ``2 * kv_heads * head_dim *
    bytes`` when values are as wide as keys. MLA (``latent_dim``, ``rope_dim``):
    ``(latent_dim + rope_dim) * itemsize``. With ``quant`` (a :class:`KVQuant`, as
    ``cache.quant``) the codes and per-token scales instead (:meth:`KVQuant.entry_nbytes`;
    per-channel key scales are per sequence, see :meth:`KVQuant.fixed_nbytes`).
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    if latent_dim is not None:
        if num_kv_heads is not None or head_dim is not None:
            raise LeanError("kv_bytes_per_token: pass either latent_dim (MLA) or num_kv_heads and "
                            f"head_dim, not both (got latent_dim={latent_dim}, "
                            f"num_kv_heads={num_kv_heads}, head_dim={head_dim})")
        if quant is not None:  # one shared "head" holding the latent row, no separate values
            return quant.entry_nbytes(1, latent_dim + rope_dim, None)
        return (latent_dim + rope_dim) * itemsize
    if num_kv_heads is None or head_dim is None:
        raise LeanError(f"kv_bytes_per_token: num_kv_heads={num_kv_heads}, head_dim={head_dim}; "
                        "both are needed (or latent_dim for MLA)")
    value_dim = head_dim if value_dim is None else value_dim
    if quant is not None:
        return quant.entry_nbytes(num_kv_heads, head_dim, value_dim)
    return num_kv_heads * (head_dim + value_dim) * itemsize


@dataclass
class KVBuffer:
    """Cached entries of one layer: ``keys (batch, heads, L, key_dim)``, ``values (batch, heads,
    L, value_dim)`` (None when values are a slice of the keys, as MLA's latent), the absolute
    ``positions (batch, heads, L)`` of the entries and, for heavy-hitter eviction, their
    accumulated attention ``scores (batch, heads, L)``. Storage may be longer than ``length``
    (preallocated or grown by doubling); only the first ``length`` entries are valid.

    This class is the one place that stores and returns cached keys and values: the attention
    layers and :meth:`KVCache.write_and_attend` write through :meth:`append` / :meth:`replace`,
    reorder through :meth:`evict_one` / :meth:`keep` and read through :meth:`view`, never
    touching ``keys`` / ``values`` directly.

    With ``quant`` (:class:`~leantorch.nn.attention.kv_quant.KVQuant`) ``keys`` / ``values``
    hold int8 (or packed int4) codes, ``key_scales`` / ``value_scales (batch, heads, L, 1)`` the
    per-token scales and ``key_channel_scale (batch, heads, 1, key_dim)`` the per-channel key
    scales (fixed at the first write); :meth:`_write` quantizes, :meth:`view` dequantizes to
    ``dtype`` (the dtype written), and eviction moves codes and per-token scales together."""

    max_len: int | None  # None: grows; an int: fixed capacity
    length: int = 0
    keys: Tensor | None = None
    values: Tensor | None = None
    positions: Tensor | None = None
    scores: Tensor | None = None
    quant: KVQuant | None = None
    dtype: torch.dtype | None = None  # dtype of the keys written (and returned by view)
    key_shape: tuple[int, ...] | None = None  # (batch, heads, key_dim) of the keys written
    key_scales: Tensor | None = None
    value_scales: Tensor | None = None
    key_channel_scale: Tensor | None = None
    # residual window (quant.residual > 0): the most recent entries' float keys/values in
    # ring slots (batch, heads, residual, dim), the position each slot holds (-1: empty) and,
    # per entry, the slot holding its float copy (-1: none; moved with the entry on eviction)
    ring_keys: Tensor | None = None
    ring_values: Tensor | None = None
    ring_positions: Tensor | None = None
    high_slot: Tensor | None = None

    @property
    def capacity(self) -> int:
        """Entries the storage has room for (0 before the first write)."""
        return 0 if self.keys is None else self.keys.shape[2]

    def _reserve(self, needed: int, keys: Tensor, values: Tensor | None) -> None:
        """Make room for ``needed`` entries, keeping the valid ones."""
        if needed <= self.capacity:
            return
        if self.max_len is not None:
            if self.keys is not None or needed > self.max_len:
                raise LeanError(f"KVCache: {needed} entries needed in a layer; the static cache "
                                f"holds max_len={self.max_len}; use a larger max_len, "
                                "KVCache.dynamic() or an eviction policy")
            capacity = self.max_len
        else:
            capacity = max(needed, 2 * self.capacity, 16)

        def grown(old: Tensor | None, like: Tensor, width: int, dtype: torch.dtype) -> Tensor:
            new = like.new_empty((*like.shape[:2], capacity, width), dtype=dtype)
            if old is not None and self.length:
                new[:, :, : self.length] = old[:, :, : self.length]
            return new

        quant = self.quant
        if quant is None:
            self.keys = grown(self.keys, keys, keys.shape[-1], keys.dtype)
            if values is not None:
                self.values = grown(self.values, values, values.shape[-1], values.dtype)
        else:
            quant.check_dim("keys", keys.shape[-1])
            self.keys = grown(self.keys, keys, quant.code_width(keys.shape[-1]),
                              quant.code_dtype)
            if not quant.per_channel_keys:
                self.key_scales = grown(self.key_scales, keys, 1, torch.float32)
            if values is not None:
                quant.check_dim("values", values.shape[-1])
                self.values = grown(self.values, values, quant.code_width(values.shape[-1]),
                                    quant.code_dtype)
                self.value_scales = grown(self.value_scales, values, 1, torch.float32)
            if quant.residual:
                index_dtype = torch.int16 if quant.residual < 2**15 else torch.int32
                slots = grown(self.high_slot[..., None] if self.high_slot is not None
                              else None, keys, 1, index_dtype)
                self.high_slot = slots[..., 0]
                if self.ring_keys is None:
                    shape = (*keys.shape[:2], quant.residual)
                    self.ring_keys = keys.new_zeros((*shape, keys.shape[-1]))
                    if values is not None:
                        self.ring_values = values.new_zeros((*shape, values.shape[-1]))
                    self.ring_positions = torch.full(shape, -1, dtype=torch.long,
                                                     device=keys.device)
        self.positions = self._grown_index(capacity, keys)
        if self.scores is not None:
            old = self.scores
            self.scores = keys.new_zeros((*keys.shape[:2], capacity), dtype=old.dtype)
            self.scores[:, :, : self.length] = old[:, :, : self.length]

    def _grown_index(self, capacity: int, keys: Tensor) -> Tensor:
        new = torch.empty((*keys.shape[:2], capacity), dtype=torch.long, device=keys.device)
        if self.positions is not None and self.length:
            new[:, :, : self.length] = self.positions[:, :, : self.length]
        return new

    def _check(self, keys: Tensor) -> None:
        shape = (*keys.shape[:2], *keys.shape[3:])
        if self.key_shape is None:
            self.key_shape, self.dtype = shape, keys.dtype
        elif shape != self.key_shape or keys.dtype != self.dtype:
            raise LeanError(f"KVCache: new keys of shape {tuple(keys.shape)} ({keys.dtype}) do "
                            f"not fit the cached (batch, heads, dim) {self.key_shape} "
                            f"({self.dtype}); use one cache per model and batch (cache.reset() "
                            "to start over)")

    def _write(self, start: int, keys: Tensor, values: Tensor | None) -> None:
        """Store ``keys`` (and ``values``) at entries ``start..start + n`` of the reserved
        storage: the one place new keys and values enter it (a quantized store converts them
        to codes and scales here, and back in :meth:`view`)."""
        end = start + keys.shape[2]
        quant = self.quant
        if quant is None:
            self.keys[:, :, start:end] = keys
            if values is not None:
                self.values[:, :, start:end] = values
            return
        if quant.per_channel_keys:
            if self.key_channel_scale is None:  # fixed from the first write (the prompt)
                self.key_channel_scale = quant.channel_scale(keys)
            self.keys[:, :, start:end] = quant.encode_with_scale(keys, self.key_channel_scale)
        else:
            self.keys[:, :, start:end], self.key_scales[:, :, start:end] = \
                quant.encode_per_token(keys)
        if values is not None:
            self.values[:, :, start:end], self.value_scales[:, :, start:end] = \
                quant.encode_per_token(values)

    def _keep_recent(self, start: int, keys: Tensor, values: Tensor | None) -> None:
        """Residual window: give the most recent of the entries just written at ``start..start
        + n`` (at most ``residual`` of them, by position) a ring slot holding their float keys
        and values, taking the slots of the oldest (or empty) ones; the entries that held those
        slots fall back to their codes, which were written with them."""
        if self.quant is None or not self.quant.residual:
            return
        n = keys.shape[2]
        count = min(n, self.quant.residual)
        written = self.positions[:, :, start:start + n]
        recent = written.topk(count, dim=-1).indices               # (batch, heads, count)
        slots = self.ring_positions.topk(count, dim=-1, largest=False).indices
        older = self.high_slot[:, :, :start]
        older.masked_fill_((older.unsqueeze(-1) == slots.unsqueeze(-2)).any(-1), -1)
        new = self.high_slot[:, :, start:start + n]
        new.fill_(-1)
        new.scatter_(2, recent, slots.to(new.dtype))

        def put(ring: Tensor, x: Tensor) -> None:
            width = x.shape[-1]
            ring.scatter_(2, slots.unsqueeze(-1).expand(*slots.shape, width),
                          x.gather(2, recent.unsqueeze(-1).expand(*recent.shape, width)))

        put(self.ring_keys, keys)
        if values is not None:
            put(self.ring_values, values)
        self.ring_positions.scatter_(2, slots, written.gather(2, recent))

    def append(self, keys: Tensor, values: Tensor | None, positions: Tensor) -> None:
        """Write ``keys (batch, heads, n, key_dim)`` (and values) after the valid entries;
        ``positions`` broadcastable to ``(batch, heads, n)``."""
        self._check(keys)
        n = keys.shape[2]
        self._reserve(self.length + n, keys, values)
        end = self.length + n
        self._write(self.length, keys, values)
        self.positions[:, :, self.length:end] = positions
        if self.scores is not None:
            self.scores[:, :, self.length:end] = 0
        self._keep_recent(self.length, keys, values)
        self.length = end

    def replace(self, keys: Tensor, values: Tensor | None, positions: Tensor,
                scores: Tensor | None = None) -> None:
        """Make ``keys`` (and values, positions, scores) the whole content."""
        self._check(keys)
        n = keys.shape[2]
        self.length = 0  # nothing to keep while reserving
        if self.ring_positions is not None:
            self.ring_positions.fill_(-1)  # the old entries are gone; keys hold their floats
        if n == 0:  # e.g. a window of 1 keeps no past entry
            return
        self._reserve(n, keys, values)
        self._write(0, keys, values)
        self.positions[:, :, :n] = positions
        self._keep_recent(0, keys, values)
        if scores is not None:
            if self.scores is None or self.scores.shape[2] < self.capacity:
                self.scores = scores.new_zeros((*keys.shape[:2], self.capacity))
            self.scores[:, :, :n] = scores
        self.length = n

    def set_scores(self, scores: Tensor) -> None:
        """Set the accumulated scores ``(batch, heads, length)`` of the valid entries."""
        if self.scores is None or self.scores.shape[2] < self.capacity:
            old = self.scores
            self.scores = scores.new_zeros((*scores.shape[:2], self.capacity))
            if old is not None:
                self.scores[:, :, : old.shape[2]] = old
        self.scores[:, :, : self.length] = scores

    def evict_one(self, slot: Tensor) -> None:
        """Drop entry ``slot[b, h]`` of every row ``(b, h)`` by moving the row's last entry into
        it (a no-op move when the last entry is the one dropped): O(1) entries copied."""
        last = self.length - 1
        index = slot.unsqueeze(-1)  # (batch, heads, 1)
        for name in _ENTRY_FIELDS:
            tensor = getattr(self, name)
            if tensor is None:
                continue
            tail = tensor[:, :, last:last + 1].clone()  # clone: source and target may alias
            where = index if tensor.dim() == 3 else \
                index.unsqueeze(-1).expand(*index.shape, tensor.shape[-1])
            tensor.scatter_(2, where, tail)
        self.length = last

    def keep(self, mask: Tensor) -> None:
        """Keep the valid entries where ``mask (batch, heads, length)`` is True (the same count
        in every row), in their current order."""
        index = _kept_indices(mask)
        count = index.shape[-1]
        for name in _ENTRY_FIELDS:
            tensor = getattr(self, name)
            if tensor is None:
                continue
            valid = tensor[:, :, : self.length]
            where = index if tensor.dim() == 3 else \
                index.unsqueeze(-1).expand(*index.shape, tensor.shape[-1])
            tensor[:, :, :count] = valid.gather(2, where)
        self.length = count

    def view(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``(keys, values, positions)`` of the valid entries: views, no copy, for a float
        store; dequantized copies in :attr:`dtype` for a quantized one."""
        if self.keys is None:
            return None, None, None
        end = self.length
        keys = self.keys[:, :, :end]
        values = None if self.values is None else self.values[:, :, :end]
        quant = self.quant
        if quant is not None:
            key_scale = self.key_channel_scale if quant.per_channel_keys \
                else self.key_scales[:, :, :end]
            keys = quant.decode(keys, key_scale, self.dtype)
            if values is not None:
                values = quant.decode(values, self.value_scales[:, :, :end], self.dtype)
            if quant.residual:  # entries of the residual window: their float copies
                slot = self.high_slot[:, :, :end].long()
                high = (slot >= 0).unsqueeze(-1)
                index = slot.clamp(min=0).unsqueeze(-1)

                def recent(ring: Tensor, coded: Tensor) -> Tensor:
                    kept = ring.gather(2, index.expand(*slot.shape, ring.shape[-1]))
                    return torch.where(high, kept, coded)

                keys = recent(self.ring_keys, keys)
                if values is not None:
                    values = recent(self.ring_values, values)
        return keys, values, self.positions[:, :, :end]

    def view_with_new(self, keys: Tensor, values: Tensor | None
                      ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """:meth:`view` after :meth:`append` of ``keys (batch, heads, n, key_dim)`` (and
        values), with those last ``n`` entries as given rather than as stored: the tokens being
        written attend to their own keys and values unrounded (they are at hand in float, as in
        KIVI's prefill); only earlier entries come back dequantized. A float store's view."""
        all_keys, all_values, positions = self.view()
        if self.quant is not None:  # view() made fresh copies: safe to overwrite
            n = keys.shape[2]
            all_keys[:, :, -n:] = keys
            if values is not None:
                all_values[:, :, -n:] = values
        return all_keys, all_values, positions

    def valid_scores(self) -> Tensor | None:
        """Accumulated eviction scores ``(batch, heads, length)`` of the valid entries, or None."""
        return None if self.scores is None else self.scores[:, :, : self.length]

    def nbytes(self) -> int:
        """Bytes of the valid keys and values as stored: float entries, or codes plus their
        scales (per-token scales of the valid entries, per-channel key scales whole); positions
        and eviction scores are bookkeeping, see :meth:`metadata_nbytes`."""
        if self.keys is None:
            return 0
        total = 0
        for name in ("keys", "values", "key_scales", "value_scales"):
            tensor = getattr(self, name)
            if tensor is not None:
                valid = tensor[:, :, : self.length]
                total += valid.numel() * valid.element_size()
        if self.key_channel_scale is not None:
            total += self.key_channel_scale.numel() * self.key_channel_scale.element_size()
        if self.ring_positions is not None:  # filled ring slots (the window's float copies)
            filled = int((self.ring_positions[(0,) * (self.ring_positions.dim() - 1)] >= 0).sum())
            for ring in (self.ring_keys, self.ring_values):
                if ring is not None:
                    total += ring[:, :, :filled].numel() * ring.element_size()
        return total

    def metadata_nbytes(self) -> int:
        """Bytes of the bookkeeping: positions, eviction scores and the residual window's
        slot indices."""
        positions = None if self.positions is None else self.positions[:, :, : self.length]
        total = 0 if positions is None else positions.numel() * positions.element_size()
        if self.high_slot is not None:  # the residual window's slot index per entry
            slots = self.high_slot[:, :, : self.length]
            total += slots.numel() * slots.element_size()
        if self.ring_positions is not None:
            total += self.ring_positions.numel() * self.ring_positions.element_size()
        scores = self.valid_scores()
        return total + (0 if scores is None else scores.numel() * scores.element_size())

    def allocated_nbytes(self) -> int:
        """Bytes of the key/value storage (codes and scales when quantized), including
        preallocated room not yet used."""
        total = 0
        for tensor in (self.keys, self.values, self.key_scales, self.value_scales,
                       self.key_channel_scale, self.ring_keys, self.ring_values):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
        return total


@dataclass
class LayerCache:
    """One layer's cache: ``kv`` (KV or latent entries, or None), ``state`` (the recurrent state of
    linear kinds, or None) and ``seen`` (tokens written so far: the next token's position)."""

    kv: KVBuffer | None = None
    state: Any = None
    seen: int = 0
    kind: str | None = None

    def state_nbytes(self) -> int:
        """Bytes of the recurrent state (linear / GLA / Based layers: the running sums)."""
        tensors = [self.state] if isinstance(self.state, Tensor) else list(self.state or ())
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))

    def nbytes(self) -> int:
        """Bytes this layer holds: its key/value buffer (codes and scales when quantized) plus
        its recurrent state."""
        return (0 if self.kv is None else self.kv.nbytes()) + self.state_nbytes()


@dataclass
class KVCache:
    """Per-layer caches for decoding, keyed by each layer's ``layer_idx``.

    Args:
        max_len: None for a dynamic cache (grows), or the entries each layer may hold (static:
            preallocated at the first write of each layer).
        policy: an eviction policy (``StreamingLLM``, ``SnapKV``, ``HeavyHitters``) applied to
            the layers of kinds ``exact``, ``topk`` and ``mla``, or None. Layers whose cache is
            bounded already (``sliding``, ``linear``, ``gla``, ``based``) ignore it;
            ``block_sparse`` layers refuse it (their block pattern needs every position).
        quant: None (float entries, in the dtype written) or ``"int8"`` / ``"int4"``: every KV
            buffer (keys and values, MLA's latent, the window heads of ``based``) stores codes
            and float32 scales (:mod:`leantorch.nn.attention.kv_quant`) and attention runs on
            the dequantized entries. Recurrent states stay float.
        granularity: ``"token"`` (a scale per entry and head) or ``"channel"`` (keys: a scale
            per head and channel, fixed from the layer's first write, later keys clamped to it;
            values per token). Only used with ``quant``.
        residual: keep the last ``residual`` entries of each layer in float as well (KIVI's
            residual window; a recency-based mixed precision: recent tokens exact, older ones
            quantized). 0: none. Needs ``quant``.

    Use one cache per sequence batch; ``Attention.forward(x, cache=cache)`` prefills it and
    ``Attention.step(x_t, cache)`` decodes one token. The cache is meant for inference (run it
    under ``torch.no_grad()``); backpropagating through cached decoding is not supported.
    """

    max_len: int | None = None
    policy: EvictionPolicy | None = None
    layers: dict[int, LayerCache] = field(default_factory=dict)
    quant: str | None = None
    granularity: str = "token"
    residual: int = 0

    def __post_init__(self) -> None:
        if self.max_len is not None and (
                isinstance(self.max_len, bool) or not isinstance(self.max_len, int)
                or self.max_len <= 0):
            raise LeanError(f"KVCache: max_len={describe(self.max_len)}; expected a positive int "
                            "(static) or None (dynamic)")
        if self.policy is not None and not isinstance(self.policy, EvictionPolicy):
            raise LeanTypeError(f"KVCache: policy={describe(self.policy)}; expected an "
                                "EvictionPolicy (StreamingLLM, SnapKV, HeavyHitters) or None")
        self._kv_quant = KVQuant.parse("KVCache", self.quant, self.granularity, self.residual)

    @classmethod
    def static(cls, max_len: int, policy: EvictionPolicy | None = None, *,
               quant: str | None = None, granularity: str = "token",
               residual: int = 0) -> KVCache:
        """A cache whose layers preallocate ``max_len`` entries (``quant``: see the class)."""
        return cls(max_len=max_len, policy=policy, quant=quant, granularity=granularity,
                   residual=residual)

    @classmethod
    def dynamic(cls, policy: EvictionPolicy | None = None, *, quant: str | None = None,
                granularity: str = "token", residual: int = 0) -> KVCache:
        """A cache whose layers grow as tokens arrive (``quant``: see the class)."""
        return cls(max_len=None, policy=policy, quant=quant, granularity=granularity,
                   residual=residual)

    @property
    def kv_quant(self) -> KVQuant | None:
        """The storage format of the KV buffers (None: float), for byte formulas such as
        ``layer.cache_nbytes(n, quant=cache.kv_quant)``."""
        return self._kv_quant

    @property
    def is_static(self) -> bool:
        """Whether layers preallocate ``max_len`` entries (else buffers grow)."""
        return self.max_len is not None

    def layer(self, layer_idx: int) -> LayerCache:
        """The cache of layer ``layer_idx`` (created empty on first use)."""
        if layer_idx not in self.layers:
            self.layers[layer_idx] = LayerCache()
        return self.layers[layer_idx]

    def new_buffer(self, bound: int | None = None) -> KVBuffer:
        """A KV buffer for one layer; ``bound`` caps a static buffer's room (sliding windows,
        bounded eviction) below ``max_len``."""
        max_len = self.max_len
        if max_len is not None and bound is not None:
            max_len = max(1, min(max_len, bound))
        return KVBuffer(max_len=max_len, quant=self._kv_quant)

    def write_and_attend(self, entry: LayerCache, keys: Tensor, values: Tensor | None,
                         positions: Tensor, attend: Attend, *, window: int | None = None,
                         votes_query: Tensor | Callable[[], Tensor] | None = None,
                         scale: float = 1.0) -> Tensor:
        """Write new ``keys (batch, heads, n, key_dim)`` / ``values`` at ``positions (n,)`` to
        the layer ``entry``'s buffer and return ``attend(keys, values, key_positions)`` over
        everything the layer sees: the kept entries and the new ones.

        What is kept: everything (no policy, no ``window``); the last ``window - 1`` entries (a
        sliding window: all the next token can see besides itself; the policy is ignored); or
        what :attr:`policy` selects, from the attention of ``votes_query (batch, q_heads, n,
        key_dim)`` (or a callable giving it) over the keys at softmax ``scale``.

        Unbounded layers append in place and attend over a view of the buffer. Bounded layers
        attend over cached and new entries, then drop the rest:

        * one new token (decoding): appended in place; when it pushes exactly one entry out of
          each row, the last entry moves into the freed slot, so a step copies O(1) entries,
          not the whole budget. Entries are then no longer in position order, which softmax
          attention over past keys does not need (keys carry their RoPE, and every cached entry
          is visible to every new query);
        * several new tokens (a prompt): attention over ``cached ++ new``, then the kept entries
          are gathered into the buffer.
        """
        sliding = window is not None
        policy = None if sliding else self.policy
        if entry.kv is None:
            bound = window - 1 if sliding else (
                policy.budget if policy is not None and policy.bounded else None)
            # room for one token beyond the bound: decoding appends before it evicts
            entry.kv = self.new_buffer(None if bound is None else bound + 1)
        buffer = entry.kv
        num_new = keys.shape[2]
        new_positions = positions.expand(keys.shape[0], keys.shape[1], num_new)
        if not sliding and policy is None:
            buffer.append(keys, values, new_positions)
            return attend(*buffer.view_with_new(keys, values))

        in_place = num_new == 1 and (buffer.max_len is None
                                     or buffer.length + 1 <= buffer.max_len)
        if in_place:
            buffer.append(keys, values, new_positions)
            all_keys, all_values, key_positions = buffer.view_with_new(keys, values)
        else:
            cached_keys, cached_values, cached_positions = buffer.view()
            if cached_keys is None or cached_keys.shape[2] == 0:
                all_keys, all_values, key_positions = keys, values, new_positions
            else:
                if sliding:  # the banded op needs the cached keys back in position order
                    order = cached_positions[0, 0].argsort()
                    cached_keys, cached_positions = (cached_keys[:, :, order],
                                                     cached_positions[:, :, order])
                    cached_values = _gather_entries(cached_values, order)
                all_keys = torch.cat((cached_keys, keys), dim=2)
                all_values = None if values is None else torch.cat((cached_values, values), dim=2)
                key_positions = torch.cat((cached_positions, new_positions), dim=2)
        out = attend(all_keys, all_values, key_positions)

        scores = None
        if sliding:
            newest = key_positions.amax(dim=-1, keepdim=True)
            keep = key_positions > newest - (window - 1)
        else:
            def votes(last: int) -> Tensor:
                query = votes_query() if callable(votes_query) else votes_query
                return attention_votes(query[:, :, -last:], all_keys, scale=scale)

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
            buffer.replace(all_keys, all_values, key_positions, scores)
            return out
        index = _kept_indices(keep)
        buffer.replace(_gather_entries(all_keys, index), _gather_entries(all_values, index),
                       _gather_entries(key_positions, index), _gather_entries(scores, index))
        return out

    def seen_tokens(self, layer_idx: int = 0) -> int:
        """Tokens written to layer ``layer_idx`` so far (the position of the next one)."""
        return self.layers[layer_idx].seen if layer_idx in self.layers else 0

    def length(self, layer_idx: int = 0) -> int:
        """Entries (per head) that layer ``layer_idx`` holds; 0 for a purely recurrent layer."""
        entry = self.layers.get(layer_idx)
        return 0 if entry is None or entry.kv is None else entry.kv.length

    def positions(self, layer_idx: int = 0) -> Tensor | None:
        """``(batch, heads, length)`` absolute positions of the entries of layer ``layer_idx``,
        in storage order (decoding under eviction moves entries into freed slots, so this order
        need not be sorted)."""
        entry = self.layers.get(layer_idx)
        return None if entry is None or entry.kv is None else entry.kv.view()[2]

    def nbytes(self) -> int:
        """Bytes of cached keys, values, latents and recurrent states, all layers."""
        return sum(entry.nbytes() for entry in self.layers.values())

    def allocated_nbytes(self) -> int:
        """Bytes allocated, including the unused room of static or grown buffers."""
        return sum((0 if e.kv is None else e.kv.allocated_nbytes()) + e.state_nbytes()
                   for e in self.layers.values())

    def reset(self) -> None:
        """Forget every layer (start a new sequence)."""
        self.layers.clear()

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self.layers))
