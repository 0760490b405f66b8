"""RotaryEmbedding: a rotation (norms kept), identity at position 0, scores depend only on the
relative position, and the same bits for a position however the table was grown."""

from __future__ import annotations

import pytest
import torch

from leantorch.errors import LeanError, LeanTypeError
from leantorch.nn.attention import RotaryEmbedding


def test_rotation_keeps_norms_and_is_identity_at_zero() -> None:
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    rotated = rope(x, torch.arange(5))
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1), atol=1e-12, rtol=0)
    assert torch.equal(rotated[:, :, 0], x[:, :, 0])


def test_scores_depend_on_relative_position_only() -> None:
    rope = RotaryEmbedding(16, base=500.0)
    q, k = torch.randn(2, 16, dtype=torch.float64)
    def score(m: int, n: int) -> torch.Tensor:
        return rope(q[None], torch.tensor([m])) @ rope(k[None], torch.tensor([n])).T
    for shift in (1, 17, 1000):
        torch.testing.assert_close(score(5 + shift, 2 + shift), score(5, 2), atol=1e-10, rtol=0)


def test_a_position_gets_the_same_bits_whatever_the_table_size() -> None:
    x = torch.randn(1, 2, 1, 8)
    small, large = RotaryEmbedding(8), RotaryEmbedding(8)
    large(torch.randn(1, 2, 1, 8), torch.tensor([5000]))  # grows the table first
    for position in (0, 7, 300):
        assert torch.equal(small(x, torch.tensor([position])), large(x, torch.tensor([position])))
    batched = small(x.expand(3, 2, 1, 8), torch.tensor([[1], [2], [300]]))
    assert torch.equal(batched[2], small(x, torch.tensor([300]))[0])


def test_errors() -> None:
    with pytest.raises(LeanError, match="dim"):
        RotaryEmbedding(7)
    with pytest.raises(LeanError, match="dim=8"):
        RotaryEmbedding(8)(torch.randn(2, 6), torch.arange(2))
    with pytest.raises(LeanTypeError, match="positions"):
        RotaryEmbedding(8)(torch.randn(2, 8), torch.arange(2.0))
    with pytest.raises(LeanError, match="negative"):
        RotaryEmbedding(8)(torch.randn(2, 8), torch.tensor([-1, 0]))
