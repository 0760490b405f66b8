"""Small pieces shared by the linear-attention modes."""

from __future__ import annotations

import torch


def with_ones(v: torch.Tensor) -> torch.Tensor:
    """[v, 1]: (..., value_dim) -> (..., value_dim + 1).

    The normaliser rides along as an extra value column of ones: phi(k)^T [v, 1] holds both
    sum phi(k)^T v and sum phi(k), so every mode computes numerator and denominator together.
    """
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def finish(out: torch.Tensor, value_dim: int, normalize: bool, eps: float) -> torch.Tensor:
    """Numerator / (denominator + eps) from an output computed with :func:`with_ones`; drops the
    extra column when not normalising; ``out`` without the extra column is returned as is."""
    if out.shape[-1] == value_dim:
        return out
    if normalize:
        return out[..., :value_dim] / (out[..., value_dim:] + eps)
    return out[..., :value_dim]
