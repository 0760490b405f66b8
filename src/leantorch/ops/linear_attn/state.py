"""Recurrent states of linear attention and gated linear attention."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["LinearAttentionState"]


class LinearAttentionState(NamedTuple):
    """What linear attention remembers of the keys and values seen so far.

    - ``kv: (batch, heads, feat_dim, value_dim)``: sum over seen positions of phi(k_s)^T v_s.
    - ``k_sum: (batch, heads, feat_dim)``: sum over seen positions of phi(k_s) (the normaliser's
      state; kept even when ``normalize=False`` so states always have the same shape).

    Its size does not depend on the sequence length. (Gated linear attention's state is a single
    tensor ``(batch, heads, key_dim, value_dim)``.)
    """

    kv: torch.Tensor
    k_sum: torch.Tensor

    @classmethod
    def zeros(
        cls,
        batch: int,
        heads: int,
        feat_dim: int,
        value_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> LinearAttentionState:
        """The empty state (nothing seen yet)."""
        return cls(
            torch.zeros(batch, heads, feat_dim, value_dim, dtype=dtype, device=device),
            torch.zeros(batch, heads, feat_dim, dtype=dtype, device=device),
        )
