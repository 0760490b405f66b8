"""Bad input raises LeanError / LeanTypeError naming the argument, the value and what is
accepted."""

from __future__ import annotations

import pytest
import torch

from leantorch.errors import LeanError, LeanTypeError
from leantorch.ops.linear_attn import (
    LinearAttentionState,
    feature_map,
    gated_linear_attention,
    gla_step,
    linear_attention,
    linear_attention_step,
    naive_gla,
)
from tests.ops.linear_attn._helpers import qkv


def test_bad_tensors():
    q, k, v = qkv(1, 2, 6, 4, 3)
    with pytest.raises(LeanTypeError, match=r"q=.*must be a torch.Tensor"):
        linear_attention(q.tolist(), k, v)
    with pytest.raises(LeanError, match=r"q has shape \(2, 6, 4\); expected 4 dims"):
        linear_attention(q[0], k, v)
    with pytest.raises(LeanError, match=r"heads of q, k, v are 2, 1, 1.*repeat the K/V heads"):
        linear_attention(q, k[:, :1], v[:, :1])
    with pytest.raises(LeanError, match=r"head_dim of q is 3 and of k is 4"):
        linear_attention(q[..., :3], k, v)
    with pytest.raises(LeanError, match=r"k has k_len=6 but v has 5"):
        linear_attention(q, k, v[:, :, :5])
    with pytest.raises(LeanTypeError, match=r"dtypes torch.float32, torch.float64"):
        linear_attention(q.float(), k, v)
    with pytest.raises(LeanError, match=r"q_len=6 > k_len=5 with causal=True"):
        linear_attention(q, k[:, :, :5], v[:, :, :5])
    linear_attention(q, k[:, :, :5], v[:, :, :5], causal=False)  # fine without causality


def test_bad_options():
    q, k, v = qkv(1, 2, 6, 4, 3)
    with pytest.raises(LeanError, match=r"mode='fast' is not one of 'parallel', 'recurrent'"):
        linear_attention(q, k, v, mode="fast")
    with pytest.raises(LeanError, match=r"chunk_size=0; expected an int >= 1"):
        linear_attention(q, k, v, chunk_size=0)
    with pytest.raises(LeanError, match=r"eps=-1 must be a float >= 0"):
        linear_attention(q, k, v, eps=-1)
    with pytest.raises(LeanError, match=r"feature_map='softmax' is not a known feature map"):
        linear_attention(q, k, v, feature_map="softmax")
    with pytest.raises(LeanTypeError, match=r"feature_map=3 must be a name"):
        feature_map(3)
    with pytest.raises(LeanTypeError, match=r"initial_state=.* must be a LinearAttentionState"):
        linear_attention(q, k, v, initial_state=torch.zeros(1, 2, 4, 3, dtype=q.dtype))
    bad = LinearAttentionState(torch.zeros(1, 2, 4, 2, dtype=q.dtype),
                               torch.zeros(1, 2, 4, dtype=q.dtype))
    with pytest.raises(LeanError, match=r"initial_state.kv has shape \(1, 2, 4, 2\); expected"):
        linear_attention(q, k, v, initial_state=bad)


def test_bad_gla_inputs():
    q, k, v = qkv(1, 2, 6, 4, 3)
    with pytest.raises(LeanError, match=r"log_decay has shape \(1, 2, 5, 4\); expected k's"):
        gated_linear_attention(q, k, v, torch.zeros(1, 2, 5, 4, dtype=q.dtype))
    with pytest.raises(LeanError, match=r"log_decay has values in \[-1, 0.5\]; expected finite"):
        gated_linear_attention(q, k, v, torch.linspace(-1, 0.5, 48, dtype=q.dtype).view(k.shape))
    nan = torch.zeros_like(k)
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(LeanError, match=r"expected finite values <= 0"):
        naive_gla(q, k, v, nan)
    with pytest.raises(LeanError, match=r"expected finite values <= 0"):
        gated_linear_attention(q, k, v, torch.full_like(k, float("-inf")))
    with pytest.raises(LeanError, match=r"sub_chunk_size=5 does not divide chunk_size 64"):
        gated_linear_attention(q, k, v, torch.zeros_like(k), sub_chunk_size=5)
    with pytest.raises(LeanError, match=r"initial_state has shape \(1, 2, 3, 3\); expected"):
        gated_linear_attention(q, k, v, torch.zeros_like(k),
                               initial_state=torch.zeros(1, 2, 3, 3, dtype=q.dtype))
    with pytest.raises(LeanError, match=r"scale=nan must be a finite float"):
        gated_linear_attention(q, k, v, torch.zeros_like(k), scale=float("nan"))


def test_bad_steps():
    q, k, v = qkv(1, 2, 6, 4, 3)
    with pytest.raises(LeanError, match=r"q_len=6, k_len=6; a step takes one token"):
        linear_attention_step(q, k, v, None)
    with pytest.raises(LeanError, match=r"q_len=6, k_len=6; a step takes one token"):
        gla_step(q, k, v, torch.zeros_like(k), None)
    with pytest.raises(LeanTypeError, match=r"state=.* must be a LinearAttentionState"):
        linear_attention_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], (1, 2))
    with pytest.raises(LeanError, match=r"state has shape \(1, 2, 4, 4\); expected \(1, 2, 4, 3\)"):
        gla_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], torch.zeros_like(k[:, :, :1]),
                 torch.zeros(1, 2, 4, 4, dtype=q.dtype))
