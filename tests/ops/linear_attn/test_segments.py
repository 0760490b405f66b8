"""The chunk mode runs long sequences in cache-sized segments carrying the state: force many
small segments and check values and gradients, with and without autograd."""

from __future__ import annotations

import pytest
import torch

import leantorch.ops.linear_attn.chunk as chunk_module
from leantorch.ops.linear_attn import (
    gated_linear_attention,
    linear_attention,
    naive_gla,
    naive_linear_attention,
)
from tests.ops.linear_attn._helpers import gla_log_decay, qkv


@pytest.fixture
def tiny_segments(monkeypatch):
    # 2 KiB: with these shapes a segment holds one or two chunks, so a 100-position sequence
    # runs as many segments, the last one ragged.
    monkeypatch.setattr(chunk_module, "_SEGMENT_BYTES", 2048)


def grads(output: torch.Tensor, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    weights = torch.linspace(-1, 1, output.numel(), dtype=output.dtype).view_as(output)
    return torch.autograd.grad((output * weights).sum(), inputs)


@pytest.mark.usefixtures("tiny_segments")
@pytest.mark.parametrize("strength", [0.05, 60.0])
def test_gla_many_segments(strength: float):
    q, k, v = qkv(1, 2, 100, 4, 3)
    log_decay = gla_log_decay(k, strength=strength) - 0.01
    assert chunk_module._segment_len(k, 4 * 3 + 3, 8) < 100
    expected = naive_gla(q, k, v, log_decay)
    with torch.no_grad():
        torch.testing.assert_close(gated_linear_attention(q, k, v, log_decay, chunk_size=8),
                                   expected, rtol=1e-10, atol=1e-10)
    inputs = [x.requires_grad_() for x in (q, k, v, log_decay)]
    out = gated_linear_attention(*inputs, chunk_size=8)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    for actual, reference in zip(grads(out, inputs), grads(naive_gla(*inputs), inputs),
                                 strict=True):
        torch.testing.assert_close(actual, reference, rtol=1e-10, atol=1e-10)


@pytest.mark.usefixtures("tiny_segments")
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_many_segments(normalize: bool):
    q, k, v = qkv(1, 2, 100, 4, 3)
    expected = naive_linear_attention(q, k, v, normalize=normalize)
    with torch.no_grad():
        torch.testing.assert_close(linear_attention(q, k, v, normalize=normalize, chunk_size=8),
                                   expected, rtol=1e-10, atol=1e-10)
    inputs = [x.requires_grad_() for x in (q, k, v)]
    out = linear_attention(*inputs, normalize=normalize, chunk_size=8)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    reference = naive_linear_attention(*inputs, normalize=normalize)
    for actual, wanted in zip(grads(out, inputs), grads(reference, inputs), strict=True):
        torch.testing.assert_close(actual, wanted, rtol=1e-10, atol=1e-10)


@pytest.mark.usefixtures("tiny_segments")
def test_learnable_feature_map_gets_gradients_through_segments():
    q, k, v = qkv(1, 2, 100, 4, 3)
    weight = torch.eye(4, dtype=torch.float64, requires_grad=True)

    def learned(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.elu(x @ weight) + 1

    out = linear_attention(q, k, v, feature_map=learned, chunk_size=8)
    (gradient,) = torch.autograd.grad(out.sum(), [weight])
    (expected,) = torch.autograd.grad(
        naive_linear_attention(q, k, v, feature_map=learned).sum(), [weight])
    torch.testing.assert_close(gradient, expected, rtol=1e-10, atol=1e-10)
