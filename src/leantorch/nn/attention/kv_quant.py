"""Quantized KV-cache storage: the codes and scales a :class:`~leantorch.nn.attention.KVBuffer`
keeps instead of float keys and values, when the cache is built with ``quant=``.

Symmetric grids as in :mod:`leantorch.ops.quant.naive` (``qmax = 2**(bits-1) - 1``, ``q =
clamp(round(x / scale), -qmax, qmax)``, ``x_hat = q * scale``, an all-zero group gets scale 1):

* ``granularity="token"``: one float32 scale per cached entry and head, ``absmax / qmax`` over
  the entry's ``head_dim`` features, for keys and values alike. The scale is the entry's own, so
  every element dequantizes within ``scale / 2``, whatever came before or after.
* ``granularity="channel"`` (KIVI: keys have outlier *channels*): keys get one scale per
  ``(batch, head, channel)``, fixed from the **first write** to the layer (the prompt, at
  prefill) as the channel's absmax over those tokens / qmax; values stay per token. A later
  key whose channel exceeds the prompt's range is **clamped** to ``+-qmax * scale`` there (its
  error is then ``|x| - qmax * scale`` instead of at most ``scale / 2``); prefill with a
  representative prompt, or use ``"token"`` when decoded keys may outgrow the prompt's.
* ``residual=R`` (KIVI's full-precision residual; a recency-based mixed precision): the ``R``
  most recent entries of each layer (by position) are also kept in float, in ring slots, and
  read from there; an entry falls back to its codes when ``R`` newer ones have arrived. The
  codes are written with every entry, so the window costs ``R`` float entries on top.
* ``bits=4`` packs two codes per byte (:func:`~leantorch.ops.quant.naive.pack_int4`), so the
  cached feature size must be even.

Bytes per cached entry and KV head: ``key_dim * bits / 8`` (+ 4 for a per-token key scale) and
``value_dim * bits / 8 + 4``; a per-channel key scale adds ``4 * key_dim`` per head and
sequence once, not per token. :meth:`KVQuant.entry_nbytes` / :meth:`KVQuant.fixed_nbytes` give
these counts; the buffer's ``nbytes()`` counts its actual tensors, and the tests hold the two
equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from leantorch.errors import LeanError
from leantorch.ops.quant.naive import (
    pack_int4,
    quantize_per_token,
    symmetric_qmax,
    unpack_int4,
    working_precision,
)
from leantorch.validate import one_of, positive_int

__all__ = ["GRANULARITIES", "QUANT_BITS", "KVQuant"]

#: accepted ``quant=`` names and their bit widths
QUANT_BITS = {"int8": 8, "int4": 4}
GRANULARITIES = ("token", "channel")
SCALE_DTYPE = torch.float32
SCALE_BYTES = 4


@dataclass(frozen=True)
class KVQuant:
    """How a KV buffer stores entries: ``bits`` (8 or 4), ``granularity`` of the key scales
    (``"token"`` or ``"channel"``; values are always per token) and ``residual``, the most
    recent entries kept in float as well (0: none)."""

    bits: int = 8
    granularity: str = "token"
    residual: int = 0

    @classmethod
    def parse(cls, owner: str, quant: str | None, granularity: str = "token",
              residual: int = 0) -> KVQuant | None:
        """``quant`` ("int8", "int4" or None for float storage), ``granularity`` and
        ``residual`` checked, as given to :meth:`KVCache.dynamic` / :meth:`KVCache.static`."""
        one_of(owner, "granularity", granularity, GRANULARITIES)
        positive_int(owner, "residual", residual, minimum=0)
        if quant is None:
            if residual:
                raise LeanError(f"{owner}: residual={residual} with quant=None; the residual "
                                "window keeps recent entries in float beside quantized ones: "
                                "pass quant='int8' or 'int4', or residual=0")
            return None
        one_of(owner, "quant", quant, (*QUANT_BITS, None))
        return cls(bits=QUANT_BITS[quant], granularity=granularity, residual=residual)

    @property
    def name(self) -> str:
        """The ``quant=`` name: ``"int8"`` or ``"int4"``."""
        return f"int{self.bits}"

    @property
    def qmax(self) -> int:
        """Largest code magnitude: 127 for 8 bits, 7 for 4."""
        return symmetric_qmax(self.bits)

    @property
    def per_channel_keys(self) -> bool:
        """Whether keys have one fixed scale per (batch, head, channel)."""
        return self.granularity == "channel"

    def code_width(self, dim: int) -> int:
        """Stored bytes per entry for ``dim`` features (``dim // 2`` when packed)."""
        return dim // 2 if self.bits == 4 else dim

    @property
    def code_dtype(self) -> torch.dtype:
        """Stored code dtype: int8, or uint8 holding two packed int4 codes."""
        return torch.uint8 if self.bits == 4 else torch.int8

    def check_dim(self, name: str, dim: int) -> None:
        """Refuse an odd feature size ``dim`` for packed int4 codes (LeanError)."""
        if self.bits == 4 and dim % 2:
            raise LeanError(f"KVCache: quant='int4' packs two codes per byte; the cached {name} "
                            f"have {dim} features (odd); use quant='int8' or an even "
                            "head_dim / latent size")

    # ------------------------------------------------------------------ codes
    def _pack(self, q: Tensor) -> Tensor:
        """int8 codes (..., dim) -> stored codes (..., code_width(dim))."""
        if self.bits != 4:
            return q
        return pack_int4(q.reshape(-1, q.shape[-1]), symmetric=True).reshape(
            *q.shape[:-1], q.shape[-1] // 2)

    def _unpack(self, codes: Tensor) -> Tensor:
        if self.bits != 4:
            return codes
        return unpack_int4(codes.reshape(-1, codes.shape[-1]), symmetric=True).reshape(
            *codes.shape[:-1], 2 * codes.shape[-1])

    def encode_per_token(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (batch, heads, n, dim) float -> (codes (batch, heads, n, code_width),
        scale (batch, heads, n, 1) float32): one absmax scale per entry."""
        _, scale = quantize_per_token(x.reshape(-1, x.shape[-1]), self.bits)
        # the codes are taken on the scale as stored (float32), so decoding them stays within
        # scale / 2 of x even for float64 x
        scale = scale.to(SCALE_DTYPE).reshape(*x.shape[:-1], 1)
        return self.encode_with_scale(x, scale), scale

    def channel_scale(self, x: Tensor) -> Tensor:
        """x: (batch, heads, n, dim) -> (batch, heads, 1, dim) float32: each channel's absmax
        over the n entries / qmax (1 for an all-zero channel)."""
        channels = x.transpose(2, 3).reshape(-1, x.shape[2])  # a row per (batch, head, channel)
        _, scale = quantize_per_token(channels, self.bits)
        return scale.to(SCALE_DTYPE).reshape(*x.shape[:2], 1, x.shape[-1])

    def encode_with_scale(self, x: Tensor, scale: Tensor) -> Tensor:
        """Codes of ``x (batch, heads, n, dim)`` on a given ``scale`` broadcastable to it;
        values beyond ``qmax * scale`` are clamped."""
        ratio = working_precision(x) / scale
        q = torch.clamp(torch.round(ratio), -self.qmax, self.qmax).to(torch.int8)
        return self._pack(q)

    def decode(self, codes: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
        """``codes * scale`` in ``dtype``: (batch, heads, n, code_width) codes with a scale
        broadcastable to (batch, heads, n, dim). The product is taken in float32, or in float64
        for float64 (so it is exact there)."""
        wide = torch.promote_types(scale.dtype, dtype)
        return (self._unpack(codes).to(wide) * scale.to(wide)).to(dtype)

    # ------------------------------------------------------------------ bytes
    def entry_nbytes(self, heads: int, key_dim: int, value_dim: int | None) -> int:
        """Bytes one cached entry takes over ``heads`` heads: codes, plus per-token scales
        (keys unless per channel; values always). ``value_dim`` None: no separate values."""
        total = heads * (self.code_width(key_dim)
                         + (0 if self.per_channel_keys else SCALE_BYTES))
        if value_dim is not None:
            total += heads * (self.code_width(value_dim) + SCALE_BYTES)
        return total

    def window_nbytes(self, entries: int, heads: int, key_dim: int, value_dim: int | None,
                      dtype: torch.dtype) -> int:
        """Bytes of the residual window's float copies once ``entries`` entries were written:
        ``min(residual, entries) * heads * (key_dim + value_dim) * itemsize``."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return min(self.residual, entries) * heads * (key_dim + (value_dim or 0)) * itemsize

    def fixed_nbytes(self, heads: int, key_dim: int) -> int:
        """Bytes per sequence that do not grow with the entries: the per-channel key scales."""
        return heads * key_dim * SCALE_BYTES if self.per_channel_keys else 0
