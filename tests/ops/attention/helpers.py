"""Shared inputs and independent oracles for the attention op tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def make_qkv(batch=2, q_heads=4, kv_heads=2, q_len=7, k_len=None, head_dim=8, value_dim=None,
             dtype=torch.float64, requires_grad=False, seed=0):
    """Random q, k, v of the package's shapes."""
    k_len = q_len if k_len is None else k_len
    value_dim = head_dim if value_dim is None else value_dim
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        t = torch.randn(*shape, generator=generator, dtype=dtype)
        return t.requires_grad_(requires_grad)

    return (rand(batch, q_heads, q_len, head_dim), rand(batch, kv_heads, k_len, head_dim),
            rand(batch, kv_heads, k_len, value_dim))


def bottom_right_causal(q_len: int, k_len: int) -> Tensor:
    """Written independently of the package: query i may see key j iff j <= i + k_len - q_len."""
    mask = torch.zeros(q_len, k_len, dtype=torch.bool)
    for i in range(q_len):
        mask[i, : max(0, min(k_len, i + k_len - q_len + 1))] = True
    return mask


def sdpa_oracle(q, k, v, mask=None, scale=None):
    """torch's SDPA (math path) as an independent oracle; it repeats K/V heads for GQA."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def grads(out: Tensor, *inputs: Tensor, seed: int = 1) -> list[Tensor]:
    """Gradients of a fixed random projection of ``out`` w.r.t. ``inputs``."""
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed),
                         dtype=out.dtype)
    found = torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(found, inputs, strict=True)]


def saved_bytes(fn, *args, **kwargs) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn(*args, **kwargs)``
    runs (inputs included)."""
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args, **kwargs)
    return sum(storages.values())
