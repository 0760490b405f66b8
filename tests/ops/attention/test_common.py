"""The fast paths' own softmax (``_common.masked_softmax``, ``_common.dense_attention``) equals
the reference's, values and gradients, fully masked rows included; and the fast paths no longer
compute through ``naive.py``."""

from __future__ import annotations

import math

import torch

from leantorch.ops.attention import _common, block_sparse, sliding, topk
from leantorch.ops.attention.naive import naive_attention, softmax_or_zero
from tests.ops.attention.helpers import make_qkv


def _scores_with_an_empty_row() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 3, 5, 6, generator=generator, dtype=torch.float64)
    scores[0, 1, 2] = -math.inf             # a row with no allowed key
    scores[1, 0, 4, :3] = -math.inf         # a partly masked row
    return scores


def test_masked_softmax_equals_the_reference_softmax_with_empty_rows_zero() -> None:
    scores = _scores_with_an_empty_row()
    weights = _common.masked_softmax(scores)
    torch.testing.assert_close(weights, softmax_or_zero(scores), atol=1e-15, rtol=0)
    assert torch.equal(weights[0, 1, 2], torch.zeros(6, dtype=torch.float64))
    rows = weights.sum(-1)
    rows[0, 1, 2] = 1.0
    torch.testing.assert_close(rows, torch.ones_like(rows), atol=1e-15, rtol=0)


def test_masked_softmax_gradient_matches_and_is_zero_on_empty_rows() -> None:
    scores = _scores_with_an_empty_row()
    finite = scores.isfinite()
    base = scores.masked_fill(~finite, 0.0).requires_grad_(True)

    def fn(softmax):
        return lambda t: softmax(t.masked_fill(~finite, -math.inf))

    upstream = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    (ours,) = torch.autograd.grad((fn(_common.masked_softmax)(base) * upstream).sum(), base)
    (ref,) = torch.autograd.grad((fn(softmax_or_zero)(base) * upstream).sum(), base)
    torch.testing.assert_close(ours, ref, atol=1e-14, rtol=0)
    assert torch.equal(ours[0, 1, 2], torch.zeros(6, dtype=torch.float64))
    small = base[:1, :1, :3, :4].detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(_common.masked_softmax, (small,))


def test_dense_attention_equals_the_reference_with_gqa_and_a_mask() -> None:
    q, k, v = make_qkv(q_heads=6, kv_heads=2, q_len=5, k_len=9, value_dim=3,
                       requires_grad=True)
    allowed = torch.rand(5, 9, generator=torch.Generator().manual_seed(1)) > 0.5
    allowed[2] = False  # a query that sees nothing gives 0
    ours = _common.dense_attention(q, k, v, allowed, 0.3)
    ref = naive_attention(q, k, v, mask=allowed, scale=0.3)
    torch.testing.assert_close(ours, ref, atol=1e-14, rtol=0)
    assert torch.equal(ours[:, :, 2], torch.zeros_like(ours[:, :, 2]))
    grads = torch.autograd.grad(ours.sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-13, rtol=0)


def test_fast_paths_do_not_import_the_reference() -> None:
    for module in (sliding, topk, block_sparse):
        assert not hasattr(module, "naive_attention"), module.__name__
        assert not hasattr(module, "softmax_or_zero"), module.__name__
