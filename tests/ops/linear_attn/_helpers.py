"""Input makers shared by the linear-attention tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def qkv(
    batch: int = 2,
    heads: int = 2,
    length: int = 37,
    head_dim: int = 8,
    value_dim: int = 5,
    *,
    q_len: int | None = None,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    q_len = length if q_len is None else q_len

    def make(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype)

    return (make(batch, heads, q_len, head_dim), make(batch, heads, length, head_dim),
            make(batch, heads, length, value_dim))


def gla_log_decay(
    like: torch.Tensor, *, strength: float = 1.0, seed: int = 1
) -> torch.Tensor:
    """GLA-style gates: log(sigmoid(x)) scaled by ``strength`` (1: mean about -0.8 per step)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(like.shape, generator=generator, dtype=like.dtype)
    return F.logsigmoid(x) * strength
