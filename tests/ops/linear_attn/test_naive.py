"""The references against the definitions, written as literally as possible."""

from __future__ import annotations

import math

import pytest
import torch

from leantorch.ops.linear_attn import (
    FEATURE_MAPS,
    feature_dim,
    feature_map,
    naive_gla,
    naive_linear_attention,
    taylor_feature_map,
)
from tests.ops.linear_attn._helpers import gla_log_decay, qkv


@pytest.mark.parametrize("name", list(FEATURE_MAPS))
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_naive_linear_attention_is_the_per_query_sum(name: str, causal: bool, normalize: bool):
    q, k, v = qkv(1, 1, 6, 3, 2, q_len=4)
    phi = FEATURE_MAPS[name]
    out = naive_linear_attention(q, k, v, feature_map=name, causal=causal, normalize=normalize,
                                 eps=1e-6)
    expected = torch.empty_like(out)
    for i in range(4):
        seen = range(2 + i + 1) if causal else range(6)  # bottom-right aligned: offset 6 - 4
        weights = [float(phi(q[0, 0, i]) @ phi(k[0, 0, j])) for j in seen]
        numerator = sum(w * v[0, 0, j] for w, j in zip(weights, seen, strict=True))
        expected[0, 0, i] = numerator / (sum(weights) + 1e-6) if normalize else numerator
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_taylor_feature_map_is_second_order_exp_of_the_scaled_dot_product():
    q, k, _ = qkv(2, 3, 11, 7, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(7)
    kernel = taylor_feature_map(q) @ taylor_feature_map(k).transpose(-1, -2)
    torch.testing.assert_close(kernel, 1 + s + s**2 / 2, rtol=1e-13, atol=1e-13)
    assert taylor_feature_map(q).shape[-1] == feature_dim("taylor", 7) == 1 + 7 + 49
    assert float(kernel.min()) >= 0.5 - 1e-12  # 1 + s + s^2/2 >= 1/2: a positive normaliser


def test_feature_maps_and_dims():
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(FEATURE_MAPS["elu"](x), torch.nn.functional.elu(x) + 1)
    assert bool((FEATURE_MAPS["elu"](x) > 0).all())
    torch.testing.assert_close(FEATURE_MAPS["relu"](x), x.clamp_min(0))
    assert FEATURE_MAPS["identity"](x) is x
    for name in FEATURE_MAPS:
        assert feature_dim(name, 5) == FEATURE_MAPS[name](x).shape[-1]

    def doubled(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t], dim=-1)

    assert feature_map(doubled) is doubled
    assert feature_dim(doubled, 5) == 10


def literal_gla(q, k, v, log_decay, scale):
    """S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t ; o_t = scale q_t S_t, one position at a time."""
    batch, heads, length, key_dim = k.shape
    state = torch.zeros(batch, heads, key_dim, v.shape[-1], dtype=v.dtype)
    outputs = []
    for t in range(length):
        state = torch.diag_embed(log_decay[:, :, t].exp()) @ state + torch.einsum(
            "bhi,bhj->bhij", k[:, :, t], v[:, :, t])
        outputs.append(torch.einsum("bhi,bhij->bhj", scale * q[:, :, t], state))
    return torch.stack(outputs, dim=2)


def test_naive_gla_is_the_recurrence():
    q, k, v = qkv(2, 2, 13, 4, 3)
    log_decay = gla_log_decay(k)
    torch.testing.assert_close(naive_gla(q, k, v, log_decay), literal_gla(q, k, v, log_decay, 0.5),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(naive_gla(q, k, v, log_decay, scale=1.3),
                               literal_gla(q, k, v, log_decay, 1.3), rtol=1e-12, atol=1e-12)


def test_naive_gla_with_fewer_queries_is_bottom_right_aligned():
    q, k, v = qkv(1, 2, 10, 4, 3)
    log_decay = gla_log_decay(k)
    full = naive_gla(q, k, v, log_decay)
    torch.testing.assert_close(naive_gla(q[:, :, -3:], k, v, log_decay), full[:, :, -3:])


def test_gate_one_is_unnormalised_linear_attention():
    q, k, v = qkv(2, 2, 9, 4, 3)
    out = naive_gla(q, k, v, torch.zeros_like(k), scale=1.0)
    expected = naive_linear_attention(q, k, v, feature_map="identity", normalize=False)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_constant_gate_is_retnet_decay():
    q, k, v = qkv(1, 2, 9, 4, 3)
    gamma = 0.8
    out = naive_gla(q, k, v, torch.full_like(k, math.log(gamma)), scale=1.0)
    t = torch.arange(9, dtype=torch.float64)
    decay = (gamma ** (t[:, None] - t[None, :])).tril()
    expected = ((q @ k.transpose(-1, -2)) * decay) @ v
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
