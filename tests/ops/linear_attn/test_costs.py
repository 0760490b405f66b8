"""leantorch.measure counts what each mode computes: exact matmul MACs, linear growth in n for the
chunk and recurrent modes, quadratic for the parallel mode."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from leantorch.ops.linear_attn import gated_linear_attention, linear_attention
from tests.conftest import count
from tests.ops.linear_attn._helpers import gla_log_decay, qkv

BATCH, HEADS, KEY_DIM, VALUE_DIM, CHUNK = 1, 2, 8, 4, 16


class Call(torch.nn.Module):
    """profile() takes a module: wrap a function."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.fn(*inputs)


def gla_cost(mode: str, length: int):
    q, k, v = qkv(BATCH, HEADS, length, KEY_DIM, VALUE_DIM)
    log_decay = gla_log_decay(k, strength=0.01)
    report = count(Call(lambda *x: gated_linear_attention(*x, mode=mode, chunk_size=CHUNK)),
                   q, k, v, log_decay)
    assert not report.uncounted
    return report.forward


def linear_cost(mode: str, length: int, **options):
    q, k, v = qkv(BATCH, HEADS, length, KEY_DIM, VALUE_DIM)
    report = count(Call(lambda *x: linear_attention(*x, mode=mode, chunk_size=CHUNK, **options)),
                   q, k, v)
    assert not report.uncounted
    return report.forward


def test_gla_matmul_macs_are_exact():
    n, c, dk, dv = 128, CHUNK, KEY_DIM, VALUE_DIM
    heads = BATCH * HEADS
    chunks = n // c
    # per chunk: scores (c x c x dk), scores @ v (c x c x dv), read state (c x dk x dv), write it
    assert gla_cost("chunk", n).macs == heads * chunks * (c * c * (dk + dv) + 2 * c * dk * dv)
    # the n x n matrix, plus reading the initial state and writing the final one
    assert gla_cost("parallel", n).macs == heads * (n * n * (dk + dv) + 2 * n * dk * dv)
    # one state read per position (the state update is an elementwise outer product)
    assert gla_cost("recurrent", n).macs == heads * n * dk * dv


def test_linear_matmul_macs_are_exact():
    n, c, f = 128, CHUNK, KEY_DIM
    e = VALUE_DIM + 1  # the normaliser rides along as a column of ones
    heads = BATCH * HEADS
    assert linear_cost("chunk", n).macs == heads * (n // c) * (c * c * (f + e) + 2 * c * f * e)
    assert linear_cost("parallel", n).macs == heads * (n * n * (f + e) + 2 * n * f * e)
    assert linear_cost("recurrent", n).macs == heads * n * f * e
    # without the normaliser and without returning a state there is no extra column
    e = VALUE_DIM
    assert linear_cost("chunk", n, normalize=False).macs == heads * (n // c) * (
        c * c * (f + e) + 2 * c * f * e)


@pytest.mark.parametrize("op", [gla_cost, linear_cost])
def test_flops_scale_linearly_for_chunk_and_recurrent_and_quadratically_for_parallel(op):
    for mode in ("chunk", "recurrent"):
        ratio = op(mode, 256).flops / op(mode, 128).flops
        assert ratio == pytest.approx(2.0, rel=1e-3), mode
    ratio = op("parallel", 256).flops / op("parallel", 128).flops
    # n^2 (f + e) dominates, plus terms linear in n: between 3.5x and 4x for doubling n
    assert 3.5 < ratio <= 4.0
    ratio = op("parallel", 512).flops / op("parallel", 256).flops
    assert 3.7 < ratio <= 4.0
