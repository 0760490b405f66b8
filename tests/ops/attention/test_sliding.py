from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leantorch.errors import LeanError
from leantorch.ops.attention import (
    naive_attention,
    neighborhood_attention_2d,
    sliding_window_attention,
)
from tests.conftest import count

from .helpers import grads, make_qkv


def causal_window_mask(q_len, k_len, window, dilation):
    """Dense oracle: query i (at p = k_len - q_len + i) sees p, p - dil, ..., p - (window-1) dil."""
    mask = torch.zeros(q_len, k_len, dtype=torch.bool)
    for i in range(q_len):
        p = k_len - q_len + i
        for t in range(window):
            if 0 <= p - t * dilation < k_len:
                mask[i, p - t * dilation] = True
    return mask


def centred_window_keys(p, length, window, dilation):
    """Neighbourhood rule, written out: the dilation group of p, a window around p's index in it,
    pushed back inside the group at either border."""
    group = list(range(p % dilation, length, dilation))
    c = group.index(p)
    if window >= len(group):
        return group
    start = c - window // 2
    if start < 0:
        start = 0
    if start + window > len(group):
        start = len(group) - window
    return group[start:start + window]


def centred_window_mask(n, window, dilation):
    mask = torch.zeros(n, n, dtype=torch.bool)
    for p in range(n):
        mask[p, centred_window_keys(p, n, window, dilation)] = True
    return mask


def assert_same(out, ref, inputs):
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads(out, *inputs), grads(ref, *inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(q_len=st.integers(1, 14), extra=st.integers(0, 5), window=st.integers(1, 9),
       dilation=st.integers(1, 3), block=st.sampled_from([None, 1, 3, 5]))
def test_causal_window_equals_naive_with_the_dense_mask(q_len, extra, window, dilation, block):
    k_len = q_len + extra
    q, k, v = make_qkv(q_len=q_len, k_len=k_len, requires_grad=True)
    out = sliding_window_attention(q, k, v, window=window, dilation=dilation, block=block)
    ref = naive_attention(q, k, v, mask=causal_window_mask(q_len, k_len, window, dilation))
    assert_same(out, ref, (q, k, v))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 15), half=st.integers(0, 4), dilation=st.integers(1, 3),
       block=st.sampled_from([None, 1, 4]))
def test_centred_window_equals_naive_with_the_dense_mask(n, half, dilation, block):
    window = 2 * half + 1
    q, k, v = make_qkv(q_len=n, requires_grad=True)
    out = sliding_window_attention(q, k, v, window=window, causal=False, dilation=dilation,
                                   block=block)
    ref = naive_attention(q, k, v, mask=centred_window_mask(n, window, dilation))
    assert_same(out, ref, (q, k, v))


def test_centred_window_shifts_inward_so_every_query_sees_window_keys():
    mask = centred_window_mask(20, 5, 2)
    assert (mask.sum(-1) == 5).all()
    assert mask[0].nonzero().flatten().tolist() == [0, 2, 4, 6, 8]  # shifted right at the start
    assert mask[19].nonzero().flatten().tolist() == [11, 13, 15, 17, 19]
    q, k, v = make_qkv(q_len=20)
    torch.testing.assert_close(
        sliding_window_attention(q, k, v, window=5, causal=False, dilation=2),
        naive_attention(q, k, v, mask=mask))


def test_window_at_least_n_is_full_attention_and_window_one_returns_v():
    q, k, v = make_qkv(q_len=9, k_len=12)
    torch.testing.assert_close(sliding_window_attention(q, k, v, window=12),
                               naive_attention(q, k, v, causal=True))
    torch.testing.assert_close(sliding_window_attention(q, k, v, window=50, block=4),
                               naive_attention(q, k, v, causal=True))
    q, k, v = make_qkv(q_len=9)
    torch.testing.assert_close(sliding_window_attention(q, k, v, window=9, causal=False),
                               naive_attention(q, k, v))
    own_value = v.repeat_interleave(2, 1)  # 4 query heads on 2 KV heads
    for causal in (True, False):
        torch.testing.assert_close(sliding_window_attention(q, k, v, window=1, causal=causal),
                                   own_value)


def test_gqa_causality_and_gradcheck():
    q, k, v = make_qkv(q_heads=6, kv_heads=3, q_len=12)
    out = sliding_window_attention(q, k, v, window=4, block=5)
    mha = sliding_window_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                   window=4, block=5)
    torch.testing.assert_close(out, mha)
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[:, :, 8:] = torch.randn_like(t[:, :, 8:])
    out2 = sliding_window_attention(q2, k2, v2, window=4, block=5)
    torch.testing.assert_close(out[:, :, :8], out2[:, :, :8], rtol=0, atol=0)
    q, k, v = make_qkv(batch=1, q_heads=2, kv_heads=1, q_len=6, head_dim=3, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: sliding_window_attention(q, k, v, window=3, dilation=2, block=2),
        (q, k, v))


class Call(torch.nn.Module):
    def __init__(self, fn, **kwargs):
        super().__init__()
        self.fn, self.kwargs = fn, kwargs

    def forward(self, q, k, v):
        return self.fn(q, k, v, **self.kwargs)


def test_counted_flops_scale_with_n_times_window_not_n_squared():
    heads, d = 2, 16
    macs = {}
    for n in (128, 256, 512):
        for window in (16, 32):
            q, k, v = make_qkv(batch=1, q_heads=heads, kv_heads=heads, q_len=n, head_dim=d,
                               dtype=torch.float32)
            report = count(Call(sliding_window_attention, window=window), q, k, v)
            assert not report.uncounted
            macs[n, window] = report.macs
            # the default block is the window: each query is scored against at most
            # 2 * window - 1 keys, and needs `window` of them (the first block fewer)
            needed = heads * n * window * 2 * d
            assert 0.9 * needed < report.macs < 2 * needed
    for window in (16, 32):  # affine in n: every block after the first costs the same
        assert macs[512, window] - macs[256, window] == 2 * (macs[256, window]
                                                             - macs[128, window])
    # a dense causal attention at n = 512 would score 512 * 513 / 2 pairs per head
    assert macs[512, 16] < 0.13 * heads * 512 * 513 // 2 * 2 * d


def neighborhood_mask(height, width, kernel, dilation):
    rows = [centred_window_keys(y, height, kernel, dilation) for y in range(height)]
    cols = [centred_window_keys(x, width, kernel, dilation) for x in range(width)]
    mask = torch.zeros(height * width, height * width, dtype=torch.bool)
    for y in range(height):
        for x in range(width):
            for ky in rows[y]:
                for kx in cols[x]:
                    mask[y * width + x, ky * width + kx] = True
    return mask


@pytest.mark.parametrize(("height", "width", "kernel", "dilation", "block"), [
    (5, 7, 3, 1, None), (6, 6, 5, 1, 2), (9, 8, 3, 2, 3), (7, 11, 3, 3, None), (4, 5, 7, 1, 2),
    (8, 8, 1, 1, None), (10, 9, 5, 2, 4)])
def test_neighborhood_2d_equals_naive_with_the_dense_mask(height, width, kernel, dilation, block):
    q, k, v = make_qkv(q_len=height * width, value_dim=5, requires_grad=True)
    out = neighborhood_attention_2d(q, k, v, height=height, width=width, kernel_size=kernel,
                                    dilation=dilation, block=block)
    ref = naive_attention(q, k, v, mask=neighborhood_mask(height, width, kernel, dilation))
    assert_same(out, ref, (q, k, v))


def test_neighborhood_2d_boundary_cases():
    mask = neighborhood_mask(9, 10, 3, 2)
    assert (mask.sum(-1) == 9).all()  # every query sees k * k keys, borders included
    q, k, v = make_qkv(q_len=30)
    torch.testing.assert_close(
        neighborhood_attention_2d(q, k, v, height=5, width=6, kernel_size=7),
        naive_attention(q, k, v))  # kernel >= both sides: full attention
    torch.testing.assert_close(
        neighborhood_attention_2d(q, k, v, height=5, width=6, kernel_size=1),
        v.repeat_interleave(2, 1))
    q, k, v = make_qkv(batch=1, q_heads=1, kv_heads=1, q_len=12, head_dim=2,
                       requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: neighborhood_attention_2d(q, k, v, height=3, width=4, kernel_size=3,
                                                  block=2), (q, k, v))


def test_neighborhood_2d_flops_scale_with_pixels_times_kernel_area():
    macs = {}
    for side in (16, 32):
        q, k, v = make_qkv(batch=1, q_heads=1, kv_heads=1, q_len=side * side, head_dim=8,
                           dtype=torch.float32)
        for kernel in (3, 7):
            report = count(Call(neighborhood_attention_2d, height=side, width=side,
                                kernel_size=kernel), q, k, v)
            macs[side, kernel] = report.macs
            needed = side * side * kernel * kernel * 16
            assert needed <= report.macs < 4 * needed
    # per pixel the cost stays within [1, 4) x kernel^2 at every size, while a dense attention
    # over the 32 x 32 grid would score 1024 keys per pixel
    assert macs[32, 3] < 0.05 * (32 * 32) ** 2 * 16


def test_bad_arguments():
    q, k, v = make_qkv(q_len=12)
    with pytest.raises(LeanError, match="odd"):
        sliding_window_attention(q, k, v, window=4, causal=False)
    with pytest.raises(LeanError, match="window"):
        sliding_window_attention(q, k, v, window=0)
    with pytest.raises(LeanError, match="height"):
        neighborhood_attention_2d(q, k, v, height=5, width=3, kernel_size=3)
    with pytest.raises(LeanError, match="kernel_size"):
        neighborhood_attention_2d(q, k, v, height=3, width=4, kernel_size=2)
