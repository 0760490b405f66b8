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
    The angles are computed in ``x``'s dtype (float64 inputs get float64 angles), identically for
    a full sequence and for one token at a time, so cached decoding reproduces the full forward
    bit for bit.
    """

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim <= 0 or dim % 2:
            raise LeanError(f"RotaryEmbedding: dim={describe(dim)}; expected a positive even int")
        if not base > 0:
            raise LeanError(f"RotaryEmbedding: base={describe(base)}; expected a positive float")
        self.dim = dim
        self.base = float(base)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}"

    def angles(self, positions: Tensor, dtype: torch.dtype) -> Tensor:
        """``positions (...,)`` -> angles ``(..., dim/2)`` in ``dtype``."""
        exponents = torch.arange(0, self.dim, 2, dtype=dtype, device=positions.device) / self.dim
        inv_freq = self.base ** -exponents
        return positions.to(dtype).unsqueeze(-1) * inv_freq

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        if x.shape[-1] != self.dim:
            raise LeanError(
                f"RotaryEmbedding: x.shape[-1]={x.shape[-1]}; expected dim={self.dim}")
        if positions.dtype.is_floating_point or positions.dtype == torch.bool:
            raise LeanTypeError(
                f"RotaryEmbedding: positions.dtype={positions.dtype}; expected an integer dtype")
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        theta = self.angles(positions, dtype)
        if theta.dim() == 3:  # (batch, seq, dim/2) -> (batch, 1, seq, dim/2): broadcast over heads
            theta = theta.unsqueeze(1)
        cos = torch.cat((theta.cos(), theta.cos()), dim=-1).to(x.dtype)
        sin = torch.cat((theta.sin(), theta.sin()), dim=-1).to(x.dtype)
        return x * cos + rotate_half(x) * sin
