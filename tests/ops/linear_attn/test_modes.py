"""The three modes (parallel, recurrent, chunk) equal the references, chain through their state
and decode token by token."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leantorch.ops.linear_attn import (
    LinearAttentionState,
    gated_linear_attention,
    gla_step,
    linear_attention,
    linear_attention_step,
    naive_gla,
    naive_linear_attention,
)
from leantorch.ops.linear_attn.chunk import choose_sub_chunk, sub_chunk_candidates
from tests.ops.linear_attn._helpers import gla_log_decay, qkv

MODES = ["parallel", "recurrent", "chunk"]
LENGTH = 70  # not a multiple of 16 or 64: the last chunk is ragged
CHUNKS = [1, 16, 64, LENGTH, 23]  # 1, 16, 64 and n, plus one that divides nothing
TIGHT = {"rtol": 1e-10, "atol": 1e-10}


def close(actual: torch.Tensor, expected: torch.Tensor, **tolerance: float) -> None:
    torch.testing.assert_close(actual, expected, **(tolerance or TIGHT))


# --------------------------------------------------------------------------------------------
# values


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("mode", MODES)
def test_gla_modes_equal_naive(mode: str, chunk_size: int):
    q, k, v = qkv(2, 3, LENGTH, 8, 5)
    log_decay = gla_log_decay(k)
    expected = naive_gla(q, k, v, log_decay)
    close(gated_linear_attention(q, k, v, log_decay, mode=mode, chunk_size=chunk_size), expected)


@pytest.mark.parametrize("name", ["elu", "relu", "taylor", "identity"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_linear_modes_equal_naive(name: str, normalize: bool, causal: bool):
    q, k, v = qkv(2, 2, LENGTH, 4, 3)
    if name == "identity" and normalize:
        q, k = q.abs(), k.abs()  # a normaliser of arbitrary sign is ill-conditioned
    expected = naive_linear_attention(q, k, v, feature_map=name, causal=causal,
                                      normalize=normalize)
    for mode in MODES:
        for chunk_size in CHUNKS:
            out = linear_attention(q, k, v, feature_map=name, causal=causal, normalize=normalize,
                                   mode=mode, chunk_size=chunk_size)
            close(out, expected)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    length=st.integers(1, 40),
    q_len_cut=st.integers(0, 40),
    head_dim=st.integers(1, 6),
    value_dim=st.integers(1, 6),
    chunk_size=st.integers(1, 45),
    strength=st.sampled_from([0.0, 0.1, 1.0, 40.0]),
    seed=st.integers(0, 10_000),
)
def test_gla_any_shape(batch, heads, length, q_len_cut, head_dim, value_dim, chunk_size, strength,
                       seed):
    q_len = max(1, length - q_len_cut)
    q, k, v = qkv(batch, heads, length, head_dim, value_dim, q_len=q_len, seed=seed)
    log_decay = gla_log_decay(k, strength=strength, seed=seed + 1)
    expected = naive_gla(q, k, v, log_decay)
    for mode in MODES:
        close(gated_linear_attention(q, k, v, log_decay, mode=mode, chunk_size=chunk_size),
              expected)


@settings(max_examples=25, deadline=None)
@given(
    length=st.integers(1, 40),
    q_len_cut=st.integers(0, 40),
    head_dim=st.integers(1, 5),
    value_dim=st.integers(1, 5),
    chunk_size=st.integers(1, 45),
    name=st.sampled_from(["elu", "relu", "taylor"]),
    causal=st.booleans(),
    normalize=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_linear_any_shape(length, q_len_cut, head_dim, value_dim, chunk_size, name, causal,
                          normalize, seed):
    q_len = max(1, length - q_len_cut)
    q, k, v = qkv(2, 2, length, head_dim, value_dim, q_len=q_len, seed=seed)
    expected = naive_linear_attention(q, k, v, feature_map=name, causal=causal,
                                      normalize=normalize)
    for mode in MODES:
        out = linear_attention(q, k, v, feature_map=name, causal=causal, normalize=normalize,
                               mode=mode, chunk_size=chunk_size)
        close(out, expected)


def test_gate_one_is_plain_unnormalised_linear_attention():
    q, k, v = qkv(2, 2, LENGTH, 8, 5)
    for mode in MODES:
        out = gated_linear_attention(q, k, v, torch.zeros_like(k), scale=1.0, mode=mode)
        expected = linear_attention(q, k, v, feature_map="identity", normalize=False, mode=mode)
        close(out, expected)
        close(out, naive_linear_attention(q, k, v, feature_map="identity", normalize=False))


# --------------------------------------------------------------------------------------------
# the stable intra-chunk factorisation


@pytest.mark.parametrize("strength", [0.05, 3.0, 40.0, 400.0])
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_gla_chunk_is_exact_for_weak_and_extreme_decays(strength: float, chunk_size: int):
    # 400 per step in float64: a chunk decays by e^-25600, far past what any factor can hold,
    # so only sub-blocks of one position are safe; the result must still be exact.
    q, k, v = qkv(1, 2, LENGTH, 8, 5)
    log_decay = gla_log_decay(k, strength=strength)
    expected = naive_gla(q, k, v, log_decay)
    for mode in MODES:
        out = gated_linear_attention(q, k, v, log_decay, mode=mode, chunk_size=chunk_size)
        assert torch.isfinite(out).all()
        close(out, expected)


@pytest.mark.parametrize("sub_chunk_size", [1, 2, 4, 8, 16, 32, 64])
def test_every_forced_sub_chunk_size_is_exact(sub_chunk_size: int):
    q, k, v = qkv(1, 2, 128, 8, 5)
    log_decay = gla_log_decay(k, strength=0.5)
    expected = naive_gla(q, k, v, log_decay)
    out = gated_linear_attention(q, k, v, log_decay, chunk_size=64, sub_chunk_size=sub_chunk_size)
    close(out, expected)
    out = gated_linear_attention(q, k, v, log_decay, mode="parallel",
                                 sub_chunk_size=sub_chunk_size)
    close(out, expected)


def test_sub_chunk_choice_follows_the_decay():
    assert sub_chunk_candidates(64, None) == [64, 32, 16, 8, 4, 2, 1]
    assert sub_chunk_candidates(24, None) == [24, 8, 4, 2, 1]
    assert sub_chunk_candidates(64, 16) == [16, 1]
    candidates = sub_chunk_candidates(64, None)
    limit = torch.finfo(torch.float32).max
    spread = float(torch.tensor(limit).log()) / 4  # about 22 in float32
    within = lambda per_step: torch.full((64, 1), -per_step).cumsum(0)  # noqa: E731
    assert choose_sub_chunk(within(0.01), candidates) == 64  # GLA-like gates: one block
    assert choose_sub_chunk(within(spread / 63 * 1.01), candidates) == 32
    assert choose_sub_chunk(within(spread / 3 * 0.99), candidates) == 4  # 3 steps inside
    assert choose_sub_chunk(within(spread * 2), candidates) == 1


@pytest.mark.parametrize("strength", [0.05, 1.0, 5.0])
def test_gla_float32_is_as_accurate_as_the_float32_reference(strength: float):
    # In float32 the log-space decays carry a rounding error of about eps * |cumulative log
    # decay|; the reference accumulates over the whole sequence, the chunk mode only over one
    # chunk, so no mode may be less accurate than the reference computed in float32 (up to 2x:
    # at weak decays both are plain rounding noise, summed in different orders).
    q, k, v = qkv(1, 2, 256, 16, 8)
    log_decay = gla_log_decay(k, strength=strength)  # 5.0: a 64-chunk decays by about e^-250
    exact = naive_gla(q, k, v, log_decay)
    single = [x.float() for x in (q, k, v, log_decay)]
    reference_error = (naive_gla(*single).double() - exact).abs().max()
    for mode in MODES:
        out = gated_linear_attention(*single, mode=mode)
        assert torch.isfinite(out).all()
        assert (out.double() - exact).abs().max() <= 2 * reference_error


# --------------------------------------------------------------------------------------------
# causality, state chaining, decoding


@pytest.mark.parametrize("mode", MODES)
def test_causality(mode: str):
    q, k, v = qkv(1, 2, 40, 4, 3)
    log_decay = gla_log_decay(k)
    changed = [x.clone() for x in (q, k, v, log_decay)]
    for x in changed:
        x[:, :, 25:] = x[:, :, 25:] * 3 - 1
    changed[3] = changed[3].clamp_max(0)
    before = gated_linear_attention(q, k, v, log_decay, mode=mode, chunk_size=16)
    after = gated_linear_attention(*changed, mode=mode, chunk_size=16)
    close(after[:, :, :25], before[:, :, :25])
    assert not torch.allclose(after[:, :, 25:], before[:, :, 25:])
    before = linear_attention(q, k, v, mode=mode, chunk_size=16)
    after = linear_attention(*changed[:3], mode=mode, chunk_size=16)
    close(after[:, :, :25], before[:, :, :25])
    assert not torch.allclose(after[:, :, 25:], before[:, :, 25:])


@pytest.mark.parametrize("first_mode", MODES)
@pytest.mark.parametrize("second_mode", MODES)
def test_gla_state_chaining(first_mode: str, second_mode: str):
    q, k, v = qkv(2, 2, LENGTH, 8, 5)
    log_decay = gla_log_decay(k)
    whole, whole_state = gated_linear_attention(q, k, v, log_decay, return_state=True)
    cut = 29
    first, state = gated_linear_attention(
        q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], log_decay[:, :, :cut], mode=first_mode,
        chunk_size=16, return_state=True)
    second, final = gated_linear_attention(
        q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], log_decay[:, :, cut:], mode=second_mode,
        chunk_size=16, initial_state=state, return_state=True)
    close(torch.cat([first, second], dim=2), whole)
    close(final, whole_state)


@pytest.mark.parametrize("first_mode", MODES)
@pytest.mark.parametrize("second_mode", MODES)
@pytest.mark.parametrize("causal", [True, False])
def test_linear_state_chaining(first_mode: str, second_mode: str, causal: bool):
    q, k, v = qkv(2, 2, LENGTH, 4, 3)
    cut = 29
    first, state = linear_attention(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], causal=causal,
                                    mode=first_mode, chunk_size=16, return_state=True)
    assert isinstance(state, LinearAttentionState)
    second, final = linear_attention(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], causal=causal,
                                     mode=second_mode, chunk_size=16, initial_state=state,
                                     return_state=True)
    whole, whole_state = linear_attention(q, k, v, causal=causal, return_state=True)
    if causal:  # the first half's queries cannot see the second half's keys
        close(torch.cat([first, second], dim=2), whole)
    else:  # the second half's queries see everything
        close(second, whole[:, :, cut:])
    close(final.kv, whole_state.kv)
    close(final.k_sum, whole_state.k_sum)
    # The state is what it says: sum phi(k)^T v and sum phi(k).
    fk = torch.nn.functional.elu(k) + 1
    close(final.kv, fk.transpose(-1, -2) @ v)
    close(final.k_sum, fk.sum(dim=2))


def test_state_carried_without_normaliser_keeps_the_key_sum():
    q, k, v = qkv(1, 2, 20, 4, 3)
    _, state = linear_attention(q, k, v, normalize=False, return_state=True)
    _, normalized_state = linear_attention(q, k, v, normalize=True, return_state=True)
    close(state.kv, normalized_state.kv)
    close(state.k_sum, normalized_state.k_sum)


@pytest.mark.parametrize("name", ["elu", "taylor"])
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_step_by_step_equals_full_forward(name: str, normalize: bool):
    q, k, v = qkv(2, 2, 20, 4, 3)
    expected, expected_state = linear_attention(q, k, v, feature_map=name, normalize=normalize,
                                                return_state=True)
    state = None
    outputs = []
    for t in range(20):
        out, state = linear_attention_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                                           state, feature_map=name, normalize=normalize)
        outputs.append(out)
    close(torch.cat(outputs, dim=2), expected)
    close(state.kv, expected_state.kv)
    close(state.k_sum, expected_state.k_sum)


def test_linear_prefill_then_step():
    q, k, v = qkv(2, 2, 20, 4, 3)
    expected = linear_attention(q, k, v)
    _, state = linear_attention(q[:, :, :15], k[:, :, :15], v[:, :, :15], return_state=True)
    for t in range(15, 20):
        out, state = linear_attention_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                                           state)
        close(out, expected[:, :, t:t + 1])


def test_gla_step_by_step_equals_full_forward():
    q, k, v = qkv(2, 2, 20, 8, 5)
    log_decay = gla_log_decay(k)
    expected, expected_state = gated_linear_attention(q, k, v, log_decay, return_state=True)
    _, state = gated_linear_attention(q[:, :, :7], k[:, :, :7], v[:, :, :7],
                                      log_decay[:, :, :7], return_state=True)
    outputs = [expected[:, :, :7]]
    for t in range(7, 20):
        step = slice(t, t + 1)
        out, state = gla_step(q[:, :, step], k[:, :, step], v[:, :, step],
                              log_decay[:, :, step], state)
        outputs.append(out)
    close(torch.cat(outputs, dim=2), expected)
    close(state, expected_state)
    out, state = gla_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], log_decay[:, :, :1], None,
                          scale=1.0)
    close(out, naive_gla(q[:, :, :1], k[:, :, :1], v[:, :, :1], log_decay[:, :, :1], scale=1.0))


def test_fewer_queries_than_keys_is_bottom_right_aligned():
    q, k, v = qkv(2, 2, 30, 4, 3)
    log_decay = gla_log_decay(k)
    for mode in MODES:
        close(gated_linear_attention(q[:, :, -5:], k, v, log_decay, mode=mode, chunk_size=8),
              naive_gla(q, k, v, log_decay)[:, :, -5:])
        close(linear_attention(q[:, :, -5:], k, v, mode=mode, chunk_size=8),
              naive_linear_attention(q, k, v)[:, :, -5:])


def test_empty_sequence():
    q, k, v = qkv(1, 2, 0, 4, 3)
    for mode in MODES:
        out, state = gated_linear_attention(q, k, v, torch.zeros_like(k), mode=mode,
                                            return_state=True)
        assert out.shape == (1, 2, 0, 3) and not state.any()
        out, state = linear_attention(q, k, v, mode=mode, return_state=True)
        assert out.shape == (1, 2, 0, 3) and not state.kv.any()
