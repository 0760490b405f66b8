from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leantorch.errors import LeanError
from leantorch.ops.attention import naive_attention, topk_attention
from tests.conftest import count

from .helpers import bottom_right_causal, grads, make_qkv


def topk_mask(q, k, topk, allowed, scale=None):
    """Oracle: the allowed entries at or above each row's topk-th largest allowed score."""
    groups = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.repeat_interleave(groups, 1).transpose(-1, -2) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    kth = scores.topk(min(topk, scores.shape[-1]), -1).values[..., -1:]
    return allowed & (scores >= kth)


@settings(max_examples=40, deadline=None)
@given(q_len=st.integers(1, 10), k_len=st.integers(1, 12), topk=st.integers(1, 13),
       kv_heads=st.sampled_from([1, 2, 4]), causal=st.booleans(), masked=st.booleans(),
       block_q=st.sampled_from([2, 256]), seed=st.integers(0, 1000))
def test_equals_naive_with_the_topk_mask(q_len, k_len, topk, kv_heads, causal, masked, block_q,
                                         seed):
    q, k, v = make_qkv(q_len=q_len, k_len=k_len, kv_heads=kv_heads, requires_grad=True,
                       seed=seed)
    allowed = torch.ones(2, 4, q_len, k_len, dtype=torch.bool)
    kwargs = {}
    if masked:
        kwargs["mask"] = torch.rand(2, 1, q_len, k_len,
                                    generator=torch.Generator().manual_seed(seed)) > 0.3
        allowed = allowed & kwargs["mask"]
    if causal:
        allowed = allowed & bottom_right_causal(q_len, k_len)
    out = topk_attention(q, k, v, topk=topk, causal=causal, block_q=block_q, **kwargs)
    ref = naive_attention(q, k, v, mask=topk_mask(q.detach(), k.detach(), topk, allowed))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads(out, q, k, v), grads(ref, q, k, v), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_topk_n_is_dense_attention():
    q, k, v = make_qkv(q_len=6, k_len=9)
    padding = torch.ones(2, 9, dtype=torch.bool)
    padding[0, 7:] = False
    additive = torch.randn(6, 9, dtype=torch.float64)
    for kwargs in ({}, {"causal": True}, {"mask": additive}):
        for topk in (9, 100):
            torch.testing.assert_close(topk_attention(q, k, v, topk=topk, **kwargs),
                                       naive_attention(q, k, v, **kwargs))
    torch.testing.assert_close(topk_attention(q, k, v, topk=9, key_padding_mask=padding),
                               naive_attention(q, k, v, key_padding_mask=padding))


def test_weights_keep_at_most_k_per_row_sum_to_one_and_never_look_ahead():
    # with V = identity, the output rows are the attention weights
    n, topk = 10, 3
    q, k, _ = make_qkv(q_heads=2, kv_heads=2, q_len=n)
    identity = torch.eye(n, dtype=torch.float64).expand(2, 2, n, n)
    weights = topk_attention(q, k, identity, topk=topk, causal=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, n, dtype=torch.float64))
    assert ((weights > 0).sum(-1) <= topk).all()
    assert ((weights > 0).sum(-1)[..., topk:] == topk).all()
    assert (weights.masked_select(~bottom_right_causal(n, n)) == 0).all()


def test_gradients_reach_only_kept_entries():
    q, k, v = make_qkv(q_len=5, k_len=8, requires_grad=True)
    with torch.no_grad():  # key 3 gets the lowest score of every query: never kept
        q[..., 0] = q[..., 0].abs() + 1
        k[:, :, 3] = 0
        k[:, :, 3, 0] = -100
    out = topk_attention(q, k, v, topk=4)
    _, dk, dv = grads(out, q, k, v)
    assert (dk[:, :, 3] == 0).all() and (dv[:, :, 3] == 0).all()
    assert (dv.abs().sum(-1) > 0).sum() > 0


def test_gqa_and_gradcheck():
    q, k, v = make_qkv(q_heads=6, kv_heads=2, q_len=7)
    torch.testing.assert_close(
        topk_attention(q, k, v, topk=3, causal=True),
        topk_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), topk=3,
                       causal=True))
    q, k, v = make_qkv(batch=1, q_heads=2, kv_heads=1, q_len=4, k_len=6, head_dim=3,
                       requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: topk_attention(q, k, v, topk=2, causal=True), (q, k, v))


class Call(torch.nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, q, k, v):
        return topk_attention(q, k, v, **self.kwargs)


def test_counted_macs_are_all_scores_plus_k_values_per_query():
    b, h, n, d, dv = 1, 2, 128, 16, 8
    q, k, v = make_qkv(batch=b, q_heads=h, kv_heads=h, q_len=n, head_dim=d, value_dim=dv,
                       dtype=torch.float32)
    for topk in (4, 32):
        report = count(Call(topk=topk, block_q=32), q, k, v)
        assert not report.uncounted
        assert report.macs == b * h * n * n * d + b * h * n * topk * dv
        assert report.ops["aten.topk"]["calls"] == n // 32
    # causal: blocks of 32 queries score keys up to their last query only
    report = count(Call(topk=4, block_q=32, causal=True), q, k, v)
    scored = sum(32 * min(n, q1) for q1 in range(32, n + 1, 32))
    assert report.macs == b * h * scored * d + b * h * n * 4 * dv


def test_bad_arguments():
    q, k, v = make_qkv()
    with pytest.raises(LeanError, match="topk"):
        topk_attention(q, k, v, topk=0)
