from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leantorch.errors import LeanError, LeanTypeError
from leantorch.ops.attention import naive_attention

from .helpers import bottom_right_causal, grads, make_qkv, sdpa_oracle


def test_unmasked_equals_sdpa_and_rows_sum_to_one():
    q, k, v = make_qkv(q_heads=4, kv_heads=4, value_dim=5)
    out, weights = naive_attention(q, k, v, return_weights=True)
    torch.testing.assert_close(out, sdpa_oracle(q, k, v))
    assert weights.shape == (2, 4, 7, 7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 7, dtype=torch.float64))


def test_scale_is_applied():
    q, k, v = make_qkv()
    torch.testing.assert_close(naive_attention(q, k, v, scale=0.3),
                               sdpa_oracle(q, k, v, scale=0.3))


@settings(max_examples=25, deadline=None)
@given(q_len=st.integers(1, 9), extra=st.integers(0, 6), kv_heads=st.sampled_from([1, 2, 4]))
def test_causal_is_bottom_right_aligned(q_len, extra, kv_heads):
    k_len = q_len + extra
    q, k, v = make_qkv(q_len=q_len, k_len=k_len, kv_heads=kv_heads)
    expected = sdpa_oracle(q, k, v, mask=bottom_right_causal(q_len, k_len))
    torch.testing.assert_close(naive_attention(q, k, v, causal=True), expected)


def test_causal_square_is_the_lower_triangle():
    q, k, v = make_qkv(q_heads=2, kv_heads=2)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(naive_attention(q, k, v, causal=True), expected)


def test_boolean_additive_and_padding_masks():
    q, k, v = make_qkv(q_len=6, k_len=9)
    generator = torch.Generator().manual_seed(3)
    bool_mask = torch.rand(2, 1, 6, 9, generator=generator) > 0.4
    bool_mask[..., 0] = True  # keep every row non-empty: compared with the additive form below
    additive = torch.randn(1, 4, 6, 9, generator=generator, dtype=torch.float64)
    padding = torch.ones(2, 9, dtype=torch.bool)
    padding[1, 6:] = False

    torch.testing.assert_close(naive_attention(q, k, v, mask=bool_mask),
                               sdpa_oracle(q, k, v, mask=bool_mask))
    torch.testing.assert_close(naive_attention(q, k, v, mask=additive),
                               sdpa_oracle(q, k, v, mask=additive))
    as_additive = torch.zeros(bool_mask.shape, dtype=torch.float64).masked_fill(
        ~bool_mask, float("-inf"))
    torch.testing.assert_close(naive_attention(q, k, v, mask=bool_mask),
                               naive_attention(q, k, v, mask=as_additive))
    torch.testing.assert_close(naive_attention(q, k, v, key_padding_mask=padding),
                               sdpa_oracle(q, k, v, mask=padding[:, None, None, :]))
    combined = bool_mask & padding[:, None, None, :] & bottom_right_causal(6, 9)
    torch.testing.assert_close(
        naive_attention(q, k, v, mask=bool_mask, key_padding_mask=padding, causal=True),
        sdpa_oracle(q, k, v, mask=combined))


def test_fully_masked_rows_give_zero_and_zero_gradient():
    q, k, v = make_qkv(requires_grad=True)
    mask = torch.ones(7, 7, dtype=torch.bool)
    mask[2] = False
    padding = torch.ones(2, 7, dtype=torch.bool)
    padding[1] = False  # the second sequence is all padding
    out, weights = naive_attention(q, k, v, mask=mask, key_padding_mask=padding,
                                   return_weights=True)
    assert torch.isfinite(out).all()
    assert (out[:, :, 2] == 0).all() and (out[1] == 0).all()
    assert (weights[:, :, 2] == 0).all()
    dq, dk, dv = grads(out, q, k, v)
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert (dq[:, :, 2] == 0).all() and (dq[1] == 0).all()
    assert (dk[1] == 0).all() and (dv[1] == 0).all()
    additive = torch.zeros(7, 7, dtype=torch.float64)
    additive[4] = float("-inf")
    out = naive_attention(q, k, v, mask=additive)
    assert (out[:, :, 4] == 0).all() and torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() for g in grads(out, q, k, v))


def test_gqa_equals_mha_with_duplicated_kv_heads():
    q, k, v = make_qkv(q_heads=6, kv_heads=2, q_len=5, k_len=8)
    mha = naive_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), causal=True)
    torch.testing.assert_close(naive_attention(q, k, v, causal=True), mha)


def test_causality_future_tokens_do_not_change_the_past():
    q, k, v = make_qkv(q_len=8)
    out = naive_attention(q, k, v, causal=True)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[:, :, 5:] = torch.randn_like(t[:, :, 5:])
    out2 = naive_attention(q2, k2, v2, causal=True)
    torch.testing.assert_close(out[:, :, :5], out2[:, :, :5], rtol=0, atol=0)


def test_dropout_is_applied_to_the_returned_weights():
    q, k, v = make_qkv()
    torch.manual_seed(5)
    out, weights = naive_attention(q, k, v, dropout=0.5, return_weights=True)
    torch.testing.assert_close(out, weights @ v.repeat_interleave(2, 1))
    plain = naive_attention(q, k, v, return_weights=True)[1]
    kept = weights != 0
    assert 0.3 < kept.double().mean() < 0.7
    torch.testing.assert_close(weights[kept], 2 * plain[kept])


def test_gradcheck_tiny():
    q, k, v = make_qkv(batch=1, q_heads=2, kv_heads=1, q_len=3, k_len=4, head_dim=3,
                       requires_grad=True)
    mask = torch.tensor([[True, False, True, True]])
    assert torch.autograd.gradcheck(
        lambda q, k, v: naive_attention(q, k, v, causal=True, mask=mask), (q, k, v))


def test_bad_inputs_raise_lean_errors():
    q, k, v = make_qkv()
    with pytest.raises(LeanError, match="q_heads"):
        naive_attention(q, k[:, :1].expand(2, 3, 7, 8), v[:, :1].expand(2, 3, 7, 8))
    with pytest.raises(LeanError, match="4-D"):
        naive_attention(q[0], k, v)
    with pytest.raises(LeanTypeError, match="dtype"):
        naive_attention(q.float(), k, v)
    with pytest.raises(LeanError, match="broadcast"):
        naive_attention(q, k, v, mask=torch.ones(3, 7, 7, dtype=torch.bool))
    with pytest.raises(LeanTypeError, match="mask"):
        naive_attention(q, k, v, mask=torch.ones(7, 7, dtype=torch.int64))
    with pytest.raises(LeanError, match="key_padding_mask"):
        naive_attention(q, k, v, key_padding_mask=torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(LeanError, match="dropout"):
        naive_attention(q, k, v, dropout=1.0)
