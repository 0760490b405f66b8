"""Rotary position embedding (RoPE, Su et al. 2021), "rotate half" layout.

Channel ``j`` of the first half and channel ``j + dim/2`` of the second half form one pair that is
rotated by the angle ``position * base ** (-2j / dim)``. A query at position ``m`` and a key at
position ``n`` rotated this way have a dot product that depends on ``m - n`` only, which is why
keys can be cached *after* rotation: their positions are fixed when they are written, and evicting
other entries of the cache never moves them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from leantorch.errors import LeanError, LeanTypeError, describe

__all__ = ["RotaryEmbedding", "rotate_half"]


def rotate_half(x: Tensor) -> Tensor:
    """``(x1, x2) -> (-x2, x1)`` on the two halves of the last dimension."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotates the last dimension of queries or keys by their absolute positions.

    Args:
        dim: size of the rotated (last) dimension; even.
        base: the wavelength base (10000 in the RoPE paper and Llama).

    ``forward(x, positions)``: ``x (..., seq, dim)``; ``positions (seq,)`` or ``(batch, seq)``
    integers (broadcast against the leading dimensions of ``x`` as ``(batch, 1, seq)``).

    The cosines and sines come from a table computed in float64 (then cast to ``x``'s dtype) and
    grown by doubling as positions grow; every position's rotation is therefore the same
    bits whether it is applied to a whole sequence or to one decoded token, and decoding does
    not recompute the trigonometry at every step.
    """

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0 or dim % 2:
            raise LeanError(f"RotaryEmbedding: dim={describe(dim)}; expected a positive even int")
        if not base > 0:
            raise LeanError(f"RotaryEmbedding: base={describe(base)}; expected a positive float")
        self.dim = dim
        self.base = float(base)
        # (dtype, device) -> (cos, sin), each (max_position, dim); not state: rebuilt on demand
        self._tables: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}"

    def angles(self, positions: Tensor) -> Tensor:
        """``positions (...,)`` -> float64 angles ``(..., dim/2)``: ``position * base **
        (-2j / dim)``."""
        exponents = torch.arange(0, self.dim, 2, dtype=torch.float64,
                                 device=positions.device) / self.dim
        return positions.to(torch.float64).unsqueeze(-1) * self.base ** -exponents

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(cos, sin)`` of shape ``positions.shape + (dim,)`` in ``dtype``, from the table."""
        key = (dtype, positions.device)
        needed = int(positions.max()) + 1 if positions.numel() else 0
        table = self._tables.get(key)
        if table is None or table[0].shape[0] < needed:
            size = max(needed, 2 * (0 if table is None else table[0].shape[0]), 256)
            theta = self.angles(torch.arange(size, device=positions.device))
            theta = torch.cat((theta, theta), dim=-1)
            table = (theta.cos().to(dtype), theta.sin().to(dtype))
            self._tables[key] = table
        return table[0][positions], table[1][positions]

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """``x (..., seq, dim)`` rotated by ``positions (seq,)`` or ``(batch, seq)`` (integers
        >= 0) -> the same shape and dtype as ``x``."""
        if x.shape[-1] != self.dim:
            raise LeanError(
                f"RotaryEmbedding: x.shape[-1]={x.shape[-1]}; expected dim={self.dim}")
        if positions.dtype.is_floating_point or positions.dtype == torch.bool:
            raise LeanTypeError(
                f"RotaryEmbedding: positions.dtype={positions.dtype}; expected an integer dtype")
        if positions.numel() and int(positions.min()) < 0:
            raise LeanError("RotaryEmbedding: negative positions; expected positions >= 0")
        cos, sin = self.cos_sin(positions, x.dtype)
        if cos.dim() == 3:  # (batch, seq, dim) -> (batch, 1, seq, dim): broadcast over heads
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return x * cos + rotate_half(x) * sin
