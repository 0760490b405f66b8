"""Gradients of every mode: gradcheck on tiny float64 shapes, and equal to the references'."""

from __future__ import annotations

import pytest
import torch

from leantorch.ops.linear_attn import (
    LinearAttentionState,
    gated_linear_attention,
    gla_step,
    linear_attention,
    linear_attention_step,
    naive_gla,
    naive_linear_attention,
)
from tests.ops.linear_attn._helpers import gla_log_decay, qkv

MODES = ["parallel", "recurrent", "chunk"]


def gates(k: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    # Kept below -0.01 so gradcheck's finite differences never step above 0 (a decay > 1).
    return (gla_log_decay(k, strength=strength) - 0.01).requires_grad_()


def grads(output: torch.Tensor, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    weights = torch.linspace(-1, 1, output.numel(), dtype=output.dtype).view_as(output)
    return torch.autograd.grad((output * weights).sum(), inputs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("strength", [1.0, 60.0])  # 60: sub-blocks of one position
def test_gla_gradcheck(mode: str, strength: float):
    q, k, v = (x.requires_grad_() for x in qkv(1, 2, 7, 3, 2))
    log_decay = gates(k, strength)
    state = torch.randn(1, 2, 3, 2, dtype=torch.float64, requires_grad=True)

    def run(q, k, v, log_decay, state):
        out, final = gated_linear_attention(q, k, v, log_decay, mode=mode, chunk_size=3,
                                            initial_state=state, return_state=True)
        return out, final

    assert torch.autograd.gradcheck(run, (q, k, v, log_decay, state), fast_mode=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["elu", "relu", "taylor"])
@pytest.mark.parametrize("causal", [True, False])
def test_linear_gradcheck(mode: str, name: str, causal: bool):
    q, k, v = (x.requires_grad_() for x in qkv(1, 1, 5, 2, 2))
    kv = torch.randn(1, 1, 7 if name == "taylor" else 2, 2, dtype=torch.float64)
    k_sum = kv[..., 0].abs() + 1  # a positive key sum, as phi >= 0 would leave
    kv.requires_grad_()
    k_sum.requires_grad_()

    def run(q, k, v, kv, k_sum):
        out, final = linear_attention(q, k, v, feature_map=name, causal=causal, mode=mode,
                                      chunk_size=2, initial_state=LinearAttentionState(kv, k_sum),
                                      return_state=True)
        return out, final.kv, final.k_sum

    assert torch.autograd.gradcheck(run, (q, k, v, kv, k_sum), fast_mode=True)


def test_step_gradcheck():
    q, k, v = (x.requires_grad_() for x in qkv(1, 2, 1, 3, 2))
    log_decay = gates(k)
    state = torch.randn(1, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: gla_step(*a), (q, k, v, log_decay, state))
    kv = torch.randn(1, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    k_sum = torch.rand(1, 2, 3, dtype=torch.float64, requires_grad=True)

    def linear_step(q, k, v, kv, k_sum):
        out, state = linear_attention_step(q, k, v, LinearAttentionState(kv, k_sum))
        return out, state.kv, state.k_sum

    assert torch.autograd.gradcheck(linear_step, (q, k, v, kv, k_sum))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("strength", [0.05, 1.0, 60.0])
def test_gla_gradients_equal_naive(mode: str, strength: float):
    q, k, v = (x.requires_grad_() for x in qkv(2, 2, 45, 8, 5))
    log_decay = gates(k, strength)
    inputs = [q, k, v, log_decay]
    expected = grads(naive_gla(*inputs), inputs)
    actual = grads(gated_linear_attention(*inputs, mode=mode, chunk_size=16), inputs)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["elu", "taylor"])
@pytest.mark.parametrize("causal", [True, False])
def test_linear_gradients_equal_naive(mode: str, name: str, causal: bool):
    q, k, v = (x.requires_grad_() for x in qkv(2, 2, 45, 4, 3))
    inputs = [q, k, v]
    expected = grads(naive_linear_attention(*inputs, feature_map=name, causal=causal), inputs)
    actual = grads(linear_attention(*inputs, feature_map=name, causal=causal, mode=mode,
                                    chunk_size=16), inputs)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
