from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leantorch.errors import LeanError, LeanTypeError
from leantorch.ops.attention import (
    block_sparse_attention,
    expand_block_mask,
    global_block_mask,
    local_block_mask,
    naive_attention,
    random_block_mask,
)
from tests.conftest import count

from .helpers import grads, make_qkv


def dense_mask(block_mask, block_size, q_len, k_len):
    """Oracle, written out: element (i, j) is on iff its tile is on."""
    lead = block_mask.shape[:-2]
    mask = torch.zeros(*lead, q_len, k_len, dtype=torch.bool)
    for i in range(q_len):
        for j in range(k_len):
            mask[..., i, j] = block_mask[..., i // block_size, j // block_size]
    return mask


@settings(max_examples=40, deadline=None)
@given(q_len=st.integers(1, 13), k_len=st.integers(1, 13), block_size=st.integers(1, 5),
       kv_heads=st.sampled_from([1, 2, 4]), per_head=st.booleans(), batched=st.booleans(),
       causal=st.booleans(), seed=st.integers(0, 1000))
def test_equals_naive_under_the_expanded_mask(q_len, k_len, block_size, kv_heads, per_head,
                                              batched, causal, seed):
    q, k, v = make_qkv(q_len=q_len, k_len=k_len, kv_heads=kv_heads, value_dim=3,
                       requires_grad=True, seed=seed)
    q_blocks, k_blocks = -(-q_len // block_size), -(-k_len // block_size)
    shape = ((2,) if batched else ()) + ((4 if per_head else 1), q_blocks, k_blocks)
    block_mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.5
    out = block_sparse_attention(q, k, v, block_mask, block_size=block_size, causal=causal)
    element_mask = dense_mask(block_mask, block_size, q_len, k_len)
    assert torch.equal(element_mask, expand_block_mask(block_mask, block_size, q_len, k_len))
    ref = naive_attention(q, k, v, mask=element_mask, causal=causal)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads(out, q, k, v), grads(ref, q, k, v), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_all_blocks_on_is_dense_attention_and_none_on_is_zero():
    q, k, v = make_qkv(q_len=10, k_len=14)
    on = torch.ones(1, 4, 5, dtype=torch.bool)
    for causal in (False, True):
        torch.testing.assert_close(
            block_sparse_attention(q, k, v, on, block_size=3, causal=causal),
            naive_attention(q, k, v, causal=causal))
    off = block_sparse_attention(q, k, v, ~on, block_size=3)
    assert (off == 0).all()


def test_helpers_combine_with_or():
    local = local_block_mask(6, 6, 2)
    assert local.shape == (1, 6, 6)
    assert local[0].sum(-1).tolist() == [2, 3, 3, 3, 3, 2]
    glob = global_block_mask(6, 6, 1)
    assert glob[0, 0].all() and glob[0, :, 0].all() and glob.sum() == 11
    rand = random_block_mask(6, 6, 0.5, seed=3, num_heads=4)
    assert rand.shape == (4, 6, 6) and (rand.sum(-1) == 3).all()
    assert torch.equal(rand, random_block_mask(6, 6, 0.5, seed=3, num_heads=4))
    combined = local | glob | rand
    assert combined.shape == (4, 6, 6)
    q, k, v = make_qkv(q_len=24)
    out = block_sparse_attention(q, k, v, combined, block_size=4, causal=True)
    ref = naive_attention(q, k, v, causal=True, mask=expand_block_mask(combined, 4, 24, 24))
    torch.testing.assert_close(out, ref)


def test_gqa_causality_and_gradcheck():
    q, k, v = make_qkv(q_heads=6, kv_heads=2, q_len=12)
    block_mask = local_block_mask(4, 4, 2) | global_block_mask(4, 4, 1)
    out = block_sparse_attention(q, k, v, block_mask, block_size=3, causal=True)
    mha = block_sparse_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                 block_mask, block_size=3, causal=True)
    torch.testing.assert_close(out, mha)
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[:, :, 7:] = torch.randn_like(t[:, :, 7:])
    out2 = block_sparse_attention(q2, k2, v2, block_mask, block_size=3, causal=True)
    torch.testing.assert_close(out[:, :, :7], out2[:, :, :7], rtol=0, atol=0)
    q, k, v = make_qkv(batch=1, q_heads=2, kv_heads=1, q_len=5, head_dim=3, requires_grad=True)
    mask = torch.tensor([[[True, False, True], [False, True, True], [True, True, False]]])
    assert torch.autograd.gradcheck(
        lambda q, k, v: block_sparse_attention(q, k, v, mask, block_size=2, causal=True),
        (q, k, v))


class Call(torch.nn.Module):
    def __init__(self, block_mask, block_size):
        super().__init__()
        self.block_mask, self.block_size = block_mask, block_size

    def forward(self, q, k, v):
        return block_sparse_attention(q, k, v, self.block_mask, block_size=self.block_size)


def test_skipped_blocks_cost_nothing():
    n, block, heads, d = 128, 16, 2, 16
    q, k, v = make_qkv(batch=1, q_heads=heads, kv_heads=heads, q_len=n, head_dim=d,
                       dtype=torch.float32)
    blocks = n // block
    macs = {}
    for density in (0.25, 0.5, 1.0):
        block_mask = random_block_mask(blocks, blocks, density, seed=0, num_heads=heads)
        report = count(Call(block_mask, block), q, k, v)
        assert not report.uncounted
        macs[density] = report.macs
        # QK^T and PV over exactly the active tiles
        assert report.macs == int(block_mask.sum()) * block * block * (d + d)
    assert macs[0.25] * 4 == macs[0.5] * 2 == macs[1.0]


def test_bad_arguments():
    q, k, v = make_qkv(q_len=8)
    with pytest.raises(LeanError, match="block_mask"):
        block_sparse_attention(q, k, v, torch.ones(1, 3, 3, dtype=torch.bool), block_size=4)
    with pytest.raises(LeanTypeError, match="block_mask"):
        block_sparse_attention(q, k, v, torch.ones(1, 2, 2), block_size=4)
    with pytest.raises(LeanError, match="density"):
        random_block_mask(2, 2, 1.5, seed=0)
