from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leantorch.errors import LeanError, LeanTypeError
from leantorch.ops.attention import (
    AttentionPartial,
    finalize,
    merge_partials,
    naive_attention,
    partial_attention,
    split_kv_attention,
)

from .helpers import grads, make_qkv


def random_tree_merge(partials, rng):
    """Merge a list of partials by repeatedly merging two random members (any order, any tree)."""
    pool = list(partials)
    while len(pool) > 1:
        i, j = rng.sample(range(len(pool)), 2)
        merged = merge_partials(pool[i], pool[j]) if rng.random() < 0.5 else merge_partials(
            pool[j], pool[i])
        pool = [p for index, p in enumerate(pool) if index not in (i, j)] + [merged]
    return pool[0]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), k_len=st.integers(1, 20), parts=st.integers(1, 8))
def test_any_partition_and_merge_tree_equals_full_attention(seed, k_len, parts):
    rng = random.Random(seed)
    q, k, v = make_qkv(q_len=5, k_len=k_len, seed=seed)
    mask = torch.rand(2, 4, 5, k_len, generator=torch.Generator().manual_seed(seed)) > 0.3
    labels = torch.tensor([rng.randrange(parts) for _ in range(k_len)])
    partials = []
    for part in range(parts):
        keys = (labels == part).nonzero().flatten()  # any subset, not only contiguous chunks
        partials.append(partial_attention(q, k[:, :, keys], v[:, :, keys],
                                          mask=mask[..., keys]))
    out = finalize(random_tree_merge(partials, rng))
    torch.testing.assert_close(out, naive_attention(q, k, v, mask=mask), rtol=0, atol=1e-6)
    torch.testing.assert_close(out, naive_attention(q, k, v, mask=mask), rtol=1e-12,
                               atol=1e-12)


def test_minus_infinity_partial_is_the_identity():
    q, k, v = make_qkv()
    p = partial_attention(q, k, v)
    identity = AttentionPartial.identity(2, 4, 7, 8, dtype=torch.float64)
    for merged in (merge_partials(p, identity), merge_partials(identity, p)):
        for got, want in zip(merged, p, strict=True):
            assert torch.equal(got, want)
    empty = merge_partials(identity, identity)
    assert (finalize(empty) == 0).all()
    # a fully masked chunk is an identity as well
    masked = partial_attention(q, k, v, mask=torch.zeros(7, 7, dtype=torch.bool))
    assert (masked.m == float("-inf")).all() and (masked.l == 0).all()
    for got, want in zip(merge_partials(p, masked), p, strict=True):
        assert torch.equal(got, want)


def test_merge_is_associative_and_commutative():
    q, k, v = make_qkv(k_len=12)
    a, b, c = (partial_attention(q, k[:, :, s], v[:, :, s])
               for s in (slice(0, 3), slice(3, 9), slice(9, 12)))
    left = merge_partials(merge_partials(a, b), c)
    right = merge_partials(a, merge_partials(b, c))
    swapped = merge_partials(c, merge_partials(b, a))
    for x, y, z in zip(left, right, swapped, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(x, z, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("num_splits", [1, 3, 20])
@pytest.mark.parametrize(("q_len", "k_len"), [(1, 13), (6, 13), (13, 13), (9, 4)])
def test_split_kv_attention_equals_naive_with_gradients(num_splits, q_len, k_len):
    q, k, v = make_qkv(q_heads=6, kv_heads=2, q_len=q_len, k_len=k_len, value_dim=5,
                       requires_grad=True)
    generator = torch.Generator().manual_seed(2)
    padding = torch.rand(2, k_len, generator=generator) > 0.3
    additive = torch.randn(q_len, k_len, generator=generator, dtype=torch.float64)
    for kwargs in ({}, {"causal": True}, {"causal": True, "key_padding_mask": padding},
                   {"mask": additive, "causal": True}):
        out = split_kv_attention(q, k, v, num_splits=num_splits, **kwargs)
        ref = naive_attention(q, k, v, **kwargs)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        for got, want in zip(grads(out, q, k, v), grads(ref, q, k, v), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_gradcheck_tiny():
    q, k, v = make_qkv(batch=1, q_heads=2, kv_heads=1, q_len=2, k_len=5, head_dim=3,
                       requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: split_kv_attention(q, k, v, num_splits=3, causal=True), (q, k, v))


def test_bad_arguments():
    q, k, v = make_qkv()
    with pytest.raises(LeanError, match="num_splits"):
        split_kv_attention(q, k, v, num_splits=0)
    with pytest.raises(LeanTypeError, match="AttentionPartial"):
        merge_partials(partial_attention(q, k, v), (1, 2, 3))
    with pytest.raises(LeanError, match="same queries"):
        merge_partials(partial_attention(q, k, v), partial_attention(q[:, :, :3], k, v))
