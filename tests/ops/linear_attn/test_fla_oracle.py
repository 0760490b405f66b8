"""flash-linear-attention's reference implementations as an independent oracle.

fla comes with the ``oracle`` extra (``fla-core`` with triton, about 300 MB; its ``naive``
modules run on the CPU), which ``make test-slow`` installs. Elsewhere these tests skip when fla
is missing, unless ``LEANTORCH_REQUIRE_ORACLE=1`` (set by ``make test-slow``, so CI cannot pass
with the oracle silently skipped)."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
import torch

from leantorch.ops.linear_attn import gated_linear_attention, linear_attention
from tests.ops.linear_attn._helpers import gla_log_decay, qkv

pytestmark = pytest.mark.slow


def fla_module(name: str) -> ModuleType:
    """``fla.ops...`` imported, or the test skipped (failed under LEANTORCH_REQUIRE_ORACLE=1)."""
    if os.environ.get("LEANTORCH_REQUIRE_ORACLE") == "1":
        return importlib.import_module(name)
    return pytest.importorskip(name)


def bthd(x: torch.Tensor) -> torch.Tensor:
    """Our (batch, heads, seq, dim) to fla's (batch, seq, heads, dim)."""
    return x.transpose(1, 2).contiguous()


@pytest.mark.parametrize("mode", ["parallel", "recurrent", "chunk"])
def test_gla_equals_fla_naive_recurrent_gla(mode: str):
    naive = fla_module("fla.ops.gla.naive")
    q, k, v = qkv(2, 3, 100, 16, 8)
    log_decay = gla_log_decay(k) / 16
    state = torch.randn(2, 3, 16, 8, dtype=torch.float64)
    ours, ours_state = gated_linear_attention(q, k, v, log_decay, mode=mode, chunk_size=32,
                                              initial_state=state, return_state=True)
    # fla computes in float32 whatever the input dtype
    theirs, theirs_state = naive.naive_recurrent_gla(
        bthd(q), bthd(k), bthd(v), bthd(log_decay), initial_state=state,
        output_final_state=True)
    torch.testing.assert_close(ours, theirs.transpose(1, 2).double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_state, theirs_state.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_identity_linear_attention_equals_fla_naive(normalize: bool):
    naive = fla_module("fla.ops.linear_attn.naive")
    q, k, v = qkv(2, 3, 128, 16, 8)
    if normalize:  # a positive normaliser keeps the comparison well posed
        q, k = q.abs(), k.abs()
    ours = linear_attention(q * 16**-0.5, k, v, feature_map="identity", normalize=normalize,
                            eps=1e-10)
    recurrent, _ = naive.naive_recurrent_linear_attn(bthd(q), bthd(k), bthd(v),
                                                     normalize=normalize)
    torch.testing.assert_close(ours, recurrent.transpose(1, 2), rtol=1e-5, atol=1e-5)
    chunk = naive.naive_chunk_linear_attn(bthd(q), bthd(k), bthd(v), normalize=normalize)
    torch.testing.assert_close(ours, chunk.transpose(1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["parallel", "recurrent", "chunk"])
def test_taylor_linear_attention_equals_fla_based(mode: str):
    naive = fla_module("fla.ops.based.naive")
    q, k, v = qkv(2, 3, 64, 8, 8)
    ours = linear_attention(q, k, v, feature_map="taylor", mode=mode, chunk_size=16)
    torch.testing.assert_close(ours, naive.naive_parallel_based(q, k, v, use_norm=True),
                               rtol=1e-10, atol=1e-10)
    unnormalized = linear_attention(q, k, v, feature_map="taylor", normalize=False, mode=mode,
                                    chunk_size=16)
    torch.testing.assert_close(unnormalized, naive.naive_parallel_based(q, k, v, use_norm=False),
                               rtol=1e-10, atol=1e-10)
