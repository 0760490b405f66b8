from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leantorch.errors import LeanError
from leantorch.ops.attention import attention, naive_attention, tiled_attention
from tests.conftest import count

from .helpers import grads, make_qkv, saved_bytes


class Call(torch.nn.Module):
    """Wraps a functional op so profile() can run it."""

    def __init__(self, fn, **kwargs):
        super().__init__()
        self.fn, self.kwargs = fn, kwargs

    def forward(self, q, k, v):
        return self.fn(q, k, v, **self.kwargs)


def assert_same(out, ref, inputs):
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads(out, *inputs), grads(ref, *inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(q_len=st.integers(1, 12), k_len=st.integers(1, 12), kv_heads=st.sampled_from([1, 2, 4]),
       value_dim=st.sampled_from([3, 8]), block_q=st.integers(1, 6), block_k=st.integers(1, 6),
       causal=st.booleans(), masking=st.sampled_from(["none", "bool", "additive", "padding"]))
def test_equals_naive_values_and_gradients(q_len, k_len, kv_heads, value_dim, block_q, block_k,
                                           causal, masking):
    q, k, v = make_qkv(q_len=q_len, k_len=k_len, kv_heads=kv_heads, value_dim=value_dim,
                       requires_grad=True)
    generator = torch.Generator().manual_seed(q_len * 13 + k_len)
    kwargs = {}
    if masking == "bool":  # some rows may end up fully masked: they must give 0
        kwargs["mask"] = torch.rand(2, 1, q_len, k_len, generator=generator) > 0.3
    elif masking == "additive":
        kwargs["mask"] = torch.randn(4, q_len, k_len, generator=generator, dtype=torch.float64)
    elif masking == "padding":
        kwargs["key_padding_mask"] = torch.rand(2, k_len, generator=generator) > 0.3
    out = tiled_attention(q, k, v, causal=causal, block_q=block_q, block_k=block_k, **kwargs)
    assert_same(out, naive_attention(q, k, v, causal=causal, **kwargs), (q, k, v))


def test_gradcheck_tiny():
    q, k, v = make_qkv(batch=1, q_heads=2, kv_heads=1, q_len=3, k_len=5, head_dim=3,
                       requires_grad=True)
    padding = torch.tensor([[True, True, False, True, True]])
    assert torch.autograd.gradcheck(
        lambda q, k, v: tiled_attention(q, k, v, causal=True, key_padding_mask=padding,
                                        block_q=2, block_k=2), (q, k, v))


def test_fully_masked_rows_give_zero_and_zero_gradient():
    q, k, v = make_qkv(requires_grad=True)
    mask = torch.ones(7, 7, dtype=torch.bool)
    mask[3] = False
    out = tiled_attention(q, k, v, mask=mask, block_q=2, block_k=3)
    assert (out[:, :, 3] == 0).all()
    dq, dk, dv = grads(out, q, k, v)
    assert (dq[:, :, 3] == 0).all() and all(torch.isfinite(g).all() for g in (dq, dk, dv))
    # bottom-right causal with q_len > k_len: the first queries see no key
    q, k, v = make_qkv(q_len=6, k_len=3, requires_grad=True)
    out = tiled_attention(q, k, v, causal=True, block_q=2, block_k=2)
    assert (out[:, :, :3] == 0).all()
    assert_same(out, naive_attention(q, k, v, causal=True), (q, k, v))


def test_large_score_jumps_between_tiles_are_exact_in_float32():
    # scores grow by 12 or 60 per key: later tiles exceed the lazily kept shift's limit (or
    # overflow float32) and are redone with a fresh max
    q = torch.ones(1, 1, 3, 1)
    v = torch.randn(1, 1, 12, 2, generator=torch.Generator().manual_seed(0))
    steps = [torch.arange(12.0).view(1, 1, 12, 1) * step for step in (12, 60)]
    for keys in [keys for k in steps for keys in (k, -k, k.flip(2))]:
        torch.testing.assert_close(tiled_attention(q, keys, v, scale=1.0, block_k=4),
                                   naive_attention(q, keys, v, scale=1.0))


def test_float32_matches_naive_to_tight_tolerance():
    q, k, v = make_qkv(batch=1, q_heads=4, kv_heads=2, q_len=300, head_dim=32,
                       dtype=torch.float32, requires_grad=True)
    out = tiled_attention(q, k, v, causal=True, block_q=64, block_k=96)
    ref = naive_attention(q, k, v, causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads(out, q, k, v), grads(ref, q, k, v), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_gqa_equals_mha_with_duplicated_kv_heads():
    q, k, v = make_qkv(q_heads=6, kv_heads=2, q_len=9, k_len=11)
    mha = tiled_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), causal=True,
                          block_q=4, block_k=4)
    torch.testing.assert_close(tiled_attention(q, k, v, causal=True, block_q=4, block_k=4), mha)


def test_causality_future_tokens_do_not_change_the_past():
    q, k, v = make_qkv(q_len=10)
    out = tiled_attention(q, k, v, causal=True, block_q=3, block_k=4)
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[:, :, 6:] = torch.randn_like(t[:, :, 6:])
    out2 = tiled_attention(q2, k2, v2, causal=True, block_q=3, block_k=4)
    torch.testing.assert_close(out[:, :, :6], out2[:, :, :6], rtol=0, atol=0)


def test_saved_memory_is_linear_in_n_while_naive_is_quadratic():
    tiled, naive = [], []
    for n in (64, 128, 256):
        q, k, v = make_qkv(batch=1, q_heads=2, kv_heads=2, q_len=n, head_dim=16,
                           dtype=torch.float32, requires_grad=True)
        tiled.append(saved_bytes(tiled_attention, q, k, v, block_q=32, block_k=32))
        naive.append(saved_bytes(naive_attention, q, k, v))
    # tiled saves q, k, v, out (n * 16 floats per head each) and the logsumexp (n floats)
    assert tiled == [2 * n * (4 * 16 + 1) * 4 for n in (64, 128, 256)]
    assert naive[1] / naive[0] > 3.5 and naive[2] / naive[1] > 3.7  # quadratic
    # the same through leantorch.measure (inputs are non-leaf: see the note in the report)
    q, k, v = (t.clone() for t in make_qkv(batch=1, q_heads=2, kv_heads=2, q_len=128,
                                           head_dim=16, dtype=torch.float32,
                                           requires_grad=True))
    report = count(Call(tiled_attention, block_q=64, block_k=64), q, k, v, backward=True,
                   activations=True)
    assert report.memory.saved_activation_bytes == tiled[1]


def _tile_macs(tiles, heads, block_q, block_k, head_dim, value_dim):
    # each tile: [Q, -m] [K, 1]^T (the extra column carries the row shift) and P V
    return tiles * heads * block_q * block_k * ((head_dim + 1) + value_dim)


def test_counted_macs_are_the_tiles_computed_and_causal_skips_above_the_diagonal():
    n, block, d = 96, 16, 16
    q, k, v = make_qkv(batch=1, q_heads=2, kv_heads=2, q_len=n, head_dim=d, dtype=torch.float32)
    full = count(Call(tiled_attention, block_q=block, block_k=block), q, k, v)
    causal = count(Call(tiled_attention, causal=True, block_q=block, block_k=block), q, k, v)
    blocks = n // block
    assert full.macs == _tile_macs(blocks * blocks, 2, block, block, d, d)
    assert causal.macs == _tile_macs(blocks * (blocks + 1) // 2, 2, block, block, d, d)
    assert 0.5 < causal.macs / full.macs < 0.6
    assert not full.uncounted and not causal.uncounted
    # wide key tiles stop at each query block's last position instead of masking the rest
    wide = count(Call(tiled_attention, causal=True, block_q=block, block_k=4 * block), q, k, v)
    assert wide.macs == causal.macs


@pytest.mark.parametrize("backend", ["auto", "sdpa", "tiled", "naive"])
@pytest.mark.parametrize(("q_len", "k_len"), [(7, 7), (3, 9), (9, 3), (1, 6)])
def test_attention_backends_equal_naive(backend, q_len, k_len):
    q, k, v = make_qkv(q_len=q_len, k_len=k_len, requires_grad=True)
    generator = torch.Generator().manual_seed(1)
    for kwargs in ({}, {"mask": torch.rand(q_len, k_len, generator=generator) > 0.5},
                   {"mask": torch.randn(2, 4, q_len, k_len, dtype=torch.float64,
                                        generator=generator)},
                   {"key_padding_mask": torch.rand(2, k_len, generator=generator) > 0.4}):
        for causal in (False, True):
            ref = naive_attention(q, k, v, causal=causal, **kwargs)
            out, reason = attention(q, k, v, causal=causal, backend=backend, explain=True,
                                    **kwargs)
            assert_same(out, ref, (q, k, v))
            expected = "sdpa" if backend == "auto" else backend
            assert reason.startswith(f"backend={expected}:")


def test_auto_dispatch_is_visible_in_the_log(caplog):
    q, k, v = make_qkv()
    with caplog.at_level(logging.DEBUG, logger="leantorch.attention"):
        out = attention(q, k, v, causal=True)
    assert isinstance(out, torch.Tensor)
    assert any("backend=sdpa" in record.getMessage() for record in caplog.records)


def test_auto_avoids_sdpa_math_path_when_its_scores_would_be_huge(monkeypatch):
    from leantorch.ops.attention import tiled as tiled_module

    monkeypatch.setattr(tiled_module, "_SDPA_MATH_SCORE_BYTES", 100)
    q, k, v = make_qkv(value_dim=5)
    out, reason = attention(q, k, v, explain=True)
    assert reason.startswith("backend=tiled:") and "math path" in reason
    torch.testing.assert_close(out, naive_attention(q, k, v))


def test_bad_arguments():
    q, k, v = make_qkv()
    with pytest.raises(LeanError, match="backend"):
        attention(q, k, v, backend="flash")
    with pytest.raises(LeanError, match="block_q"):
        tiled_attention(q, k, v, block_q=0)
