"""Eviction: each policy keeps exactly what it specifies (hand-built examples), never exceeds its
budget, is a no-op when the budget covers the sequence, keeps token positions, and decoding runs
after it."""

from __future__ import annotations

import pytest
import torch

from leantorch.errors import LeanError
from leantorch.nn.attention import (
    Attention,
    HeavyHitters,
    KVCache,
    SnapKV,
    StreamingLLM,
    attention_votes,
    heavy_hitter_indices,
    snapkv_indices,
    streaming_indices,
)
from leantorch.ops.attention import naive_attention
from tests.nn.attention._kinds import make, tokens

TIGHT = {"atol": 1e-12, "rtol": 0}


# ----------------------------------------------------------------- selection rules, by hand
def test_streaming_keeps_sinks_and_recent() -> None:
    assert streaming_indices(10, sinks=2, recent=3).tolist() == [0, 1, 7, 8, 9]
    assert streaming_indices(5, sinks=2, recent=3).tolist() == [0, 1, 2, 3, 4]
    assert streaming_indices(6, sinks=0, recent=3).tolist() == [3, 4, 5]


def test_snapkv_keeps_top_pooled_prefix_votes_plus_window() -> None:
    prefix = [0.1, 0.0, 0.3, 0.9, 0.05, 0.0, 0.0, 0.5]
    votes = torch.tensor([[[*prefix, 7.0, 7.0]]])
    # kernel 1 (no pooling): the 3 largest prefix votes are at 3 (0.9), 7 (0.5), 2 (0.3)
    assert snapkv_indices(votes, budget=5, window=2, kernel_size=1).tolist() == [[[2, 3, 7, 8,
                                                                                   9]]]
    # max pool of width 3: [.1, .3, .9, .9, .9, .05, .5, .5] -> 2, 3, 4 (the needle's neighbours)
    assert snapkv_indices(votes, budget=5, window=2, kernel_size=3).tolist() == [[[2, 3, 4, 8,
                                                                                   9]]]
    # avg pool of width 3 (zero padding counted): 3 (.417), 2 (.4), 4 (.317)
    assert snapkv_indices(votes, budget=5, window=2, kernel_size=3,
                          pooling="avg").tolist() == [[[2, 3, 4, 8, 9]]]
    # budget covering the length keeps everything
    assert snapkv_indices(votes, budget=10, window=2).tolist() == [[list(range(10))]]


def test_snapkv_selects_per_head() -> None:
    votes = torch.tensor([[[0.0, 0.9, 0.0, 0.1, 0.0, 1.0],
                           [0.2, 0.0, 0.0, 0.0, 0.7, 1.0]]])
    assert snapkv_indices(votes, budget=2, window=1, kernel_size=1).tolist() == [[[1, 5],
                                                                                  [4, 5]]]


def test_heavy_hitters_keep_recent_plus_largest_accumulated() -> None:
    scores = torch.tensor([[[5.0, 1.0, 4.0, 0.0, 3.0, 2.0, 0.0, 0.0]]])
    assert heavy_hitter_indices(scores, budget=4, recent=2).tolist() == [[[0, 2, 6, 7]]]
    assert heavy_hitter_indices(scores, budget=4, recent=0).tolist() == [[[0, 2, 4, 5]]]
    assert heavy_hitter_indices(scores, budget=8, recent=2).tolist() == [[list(range(8))]]


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_votes_sum_softmax_weights_over_queries_and_group(kv_heads: int) -> None:
    q = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    k = torch.randn(2, kv_heads, 9, 8, dtype=torch.float64)
    v = torch.randn(2, kv_heads, 9, 8, dtype=torch.float64)
    _, weights = naive_attention(q, k, v, causal=True, return_weights=True)
    expected = weights.view(2, kv_heads, -1, 5, 9).sum(dim=(2, 3))
    torch.testing.assert_close(attention_votes(q, k, scale=8 ** -0.5, chunk=2), expected, **TIGHT)


# ----------------------------------------------------------------- policies in a layer
POLICIES = {
    "streaming": lambda budget: StreamingLLM(sinks=2, recent=budget - 2),
    "snapkv": lambda budget: SnapKV(budget, window=3, kernel_size=3),
    "h2o": lambda budget: HeavyHitters(budget, recent=budget // 2),
}
EVICTABLE = ["exact", "topk", "mla"]


def decode(layer, x, cache, prompt):
    outputs = [layer(x[:, :prompt], cache)]
    for t in range(prompt, x.shape[1]):
        outputs.append(layer.step(x[:, t], cache).unsqueeze(1))
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("kind", EVICTABLE)
@pytest.mark.parametrize("policy", POLICIES)
def test_budget_covering_the_sequence_is_no_eviction(kind: str, policy: str) -> None:
    layer, x = make(kind), tokens(n=13)
    cache = KVCache.dynamic(POLICIES[policy](13))
    torch.testing.assert_close(decode(layer, x, cache, 6), layer(x), **TIGHT)
    assert cache.length() == 13


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("kind", EVICTABLE)
@pytest.mark.parametrize("policy", POLICIES)
def test_cache_stays_within_budget_and_decoding_runs(kind: str, policy: str,
                                                     static: bool) -> None:
    layer, x = make(kind), tokens(n=20)
    budget = 6
    chosen = POLICIES[policy](budget)
    cache = KVCache(max_len=32 if static else None, policy=chosen)
    layer(x[:, :12], cache)
    assert cache.length() == budget
    for t in range(12, 20):
        y = layer.step(x[:, t], cache)
        assert torch.isfinite(y).all()
        expected = budget + (t - 11) if policy == "snapkv" else budget  # SnapKV: prompt only
        assert cache.length() == expected
        positions = cache.positions().sort(dim=-1).values  # storage order is free
        assert (positions.diff(dim=-1) > 0).all()  # no duplicates
        assert (positions[..., -1] == t).all()     # the newest token is always kept
        if policy == "streaming":
            assert positions[0, 0].tolist() == [0, 1, *range(t - 3, t + 1)]
    assert cache.seen_tokens() == 20
    if chosen.bounded and static:
        # preallocated once: the budget plus the slot a decoded token is appended to
        per_token = layer.kv_bytes_per_token(torch.float64)
        assert cache.allocated_nbytes() == 2 * (budget + 1) * per_token


def _reference_outputs(layer: Attention, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """An exact layer's outputs with an explicit (n, n) mask of visible keys."""
    positions = torch.arange(x.shape[1])
    q = layer.rotary(layer.q_proj(x).unflatten(-1, (layer.num_heads, -1)).transpose(1, 2),
                     positions)
    k = layer.rotary(layer.k_proj(x).unflatten(-1, (layer.num_kv_heads, -1)).transpose(1, 2),
                     positions)
    v = layer.v_proj(x).unflatten(-1, (layer.num_kv_heads, -1)).transpose(1, 2)
    out = naive_attention(q, k, v, mask=allowed)
    return layer.o_proj(out.transpose(1, 2).flatten(2))


def test_streaming_decoding_attends_to_sinks_and_recent_at_their_positions() -> None:
    """After eviction, token t sees keys j < sinks or t - recent <= j <= t, at their original
    positions (RoPE is applied before caching and new tokens continue from seen_tokens)."""
    layer, x = make("exact"), tokens(n=20)
    sinks, recent, prompt = 2, 4, 8
    cache = KVCache.dynamic(StreamingLLM(sinks=sinks, recent=recent))
    decoded = decode(layer, x, cache, prompt)
    i = torch.arange(20)[:, None]
    j = torch.arange(20)[None, :]
    allowed = (j <= i) & ((i < prompt) | (j < sinks) | (j >= i - recent))
    torch.testing.assert_close(decoded, _reference_outputs(layer, x, allowed), **TIGHT)
    assert cache.positions()[0, 0].sort().values.tolist() == [0, 1, 16, 17, 18, 19]


def test_h2o_prefill_keeps_recent_plus_heaviest_by_accumulated_attention() -> None:
    layer, x = make("exact"), tokens(n=12)
    cache = KVCache.dynamic(HeavyHitters(budget=5, recent=2))
    layer(x, cache)
    positions = torch.arange(12)
    q = layer.rotary(layer.q_proj(x).unflatten(-1, (4, -1)).transpose(1, 2), positions)
    k = layer.rotary(layer.k_proj(x).unflatten(-1, (2, -1)).transpose(1, 2), positions)
    _, weights = naive_attention(q, k, k, causal=True, return_weights=True)
    received = weights.view(2, 2, 2, 12, 12).sum(dim=(2, 3))  # over group heads and queries
    heavy = received[..., :10].topk(3, dim=-1).indices.sort(dim=-1).values
    expected = torch.cat((heavy, torch.tensor([10, 11]).expand(2, 2, 2)), dim=-1)
    assert torch.equal(cache.positions(), expected)
    kept_scores = cache.layer(0).kv.valid_scores()
    torch.testing.assert_close(kept_scores, received.gather(-1, expected), **TIGHT)
    # A decoding step adds its own attention to the kept scores.
    before = kept_scores.clone()
    layer.step(x[:, 0], cache)
    after = cache.layer(0).kv.valid_scores()
    assert after.shape[-1] == 5 and (after.sum(-1) > before.sum(-1) - 1e-9).all()


def test_snapkv_keeps_a_needle_the_observation_window_asks_about() -> None:
    """Identity projections and no RoPE: the last 3 tokens equal a far 'needle' token, so the
    observation window's attention points at it and SnapKV keeps it (and, with a pool of
    width 3, its neighbours)."""
    dim, window = 16, 3
    layer = Attention(dim, 2, kind="exact", rope=False).double()
    with torch.no_grad():
        for proj in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj):
            proj.weight.copy_(torch.eye(dim))
    generator = torch.Generator().manual_seed(3)
    x = 0.1 * torch.randn(1, 30, dim, generator=generator, dtype=torch.float64)
    needle = 3.0 * torch.randn(dim, generator=generator, dtype=torch.float64)
    x[0, 11] = needle
    x[0, -window:] = needle
    cache = KVCache.dynamic(SnapKV(budget=window + 1, window=window, kernel_size=1))
    layer(x, cache)
    assert cache.positions()[0].tolist() == [[11, 27, 28, 29]] * 2
    cache = KVCache.dynamic(SnapKV(budget=window + 3, window=window, kernel_size=3))
    layer(x, cache)
    assert cache.positions()[0].tolist() == [[10, 11, 12, 27, 28, 29]] * 2


def test_snapkv_under_gqa_pools_votes_over_the_group() -> None:
    layer, x = make("exact", num_kv_heads=1), tokens(n=14)
    cache = KVCache.dynamic(SnapKV(budget=6, window=3, kernel_size=1))
    layer(x, cache)
    positions = torch.arange(14)
    q = layer.rotary(layer.q_proj(x).unflatten(-1, (4, -1)).transpose(1, 2), positions)
    k = layer.rotary(layer.k_proj(x).unflatten(-1, (1, -1)).transpose(1, 2), positions)
    _, weights = naive_attention(q, k, k, causal=True, return_weights=True)
    votes = weights[:, :, -3:].sum(dim=(1, 2))[:, :11]   # window queries of all 4 heads
    top = votes.topk(3, dim=-1).indices.sort(dim=-1).values
    expected = torch.cat((top, torch.tensor([11, 12, 13]).expand(2, 3)), dim=-1)
    assert torch.equal(cache.positions()[:, 0], expected)


def test_policies_refuse_bad_budgets_and_unsupported_kinds() -> None:
    with pytest.raises(LeanError, match="window"):
        SnapKV(budget=4, window=8)
    with pytest.raises(LeanError, match="kernel_size"):
        SnapKV(budget=8, window=2, kernel_size=4)
    with pytest.raises(LeanError, match="pooling"):
        SnapKV(budget=8, window=2, pooling="median")
    with pytest.raises(LeanError, match="recent"):
        HeavyHitters(budget=4, recent=5)
    with pytest.raises(LeanError, match="recent"):
        StreamingLLM(sinks=2, recent=0)
    with pytest.raises(LeanError, match="eviction applies"):
        make("block_sparse")(tokens(n=5), KVCache.dynamic(StreamingLLM(1, 2)))


@pytest.mark.parametrize("kind", ["sliding", "linear", "gla", "based"])
def test_policies_leave_already_bounded_caches_alone(kind: str) -> None:
    layer, x = make(kind), tokens(n=13)
    cache = KVCache.dynamic(StreamingLLM(sinks=1, recent=2))
    torch.testing.assert_close(decode(layer, x, cache, 5), layer(x), **TIGHT)


def test_h2o_decoding_matches_a_plain_simulation_by_position_sets() -> None:
    """An independent H2O: per KV head a set of kept positions and a dict of accumulated
    attention, recomputed from the full-sequence keys; the layer's outputs and kept sets must
    equal it at every step, whatever order the cache stores its entries in."""
    layer, x = make("exact", num_kv_heads=2), tokens(batch=1, n=22)
    budget, recent, prompt = 7, 3, 10
    cache = KVCache.dynamic(HeavyHitters(budget, recent=recent))
    positions = torch.arange(22)
    q = layer.rotary(layer.q_proj(x).unflatten(-1, (4, -1)).transpose(1, 2), positions)[0]
    k = layer.rotary(layer.k_proj(x).unflatten(-1, (2, -1)).transpose(1, 2), positions)[0]
    v = layer.v_proj(x).unflatten(-1, (2, -1)).transpose(1, 2)[0]
    scores = [dict.fromkeys(range(prompt), 0.0) for _ in range(2)]

    def attend(head: int, t: int, keys: list[int]) -> torch.Tensor:
        weights = torch.softmax(q[head, t] @ k[head // 2, keys].T * layer.scale, dim=-1)
        for position, weight in zip(keys, weights.tolist(), strict=True):
            scores[head // 2][position] += weight
        return weights @ v[head // 2, keys]

    def evict(kv_head: int) -> None:
        kept = sorted(scores[kv_head])
        if len(kept) > budget:
            older = kept[:-recent]
            heavy = sorted(older, key=lambda p: -scores[kv_head][p])[: budget - recent]
            scores[kv_head] = {p: scores[kv_head][p] for p in heavy + kept[-recent:]}

    layer(x[:, :prompt], cache)
    for head in range(4):
        for t in range(prompt):
            attend(head, t, list(range(t + 1)))
    for kv_head in range(2):
        evict(kv_head)
    for t in range(prompt, 22):
        y = layer.step(x[:, t], cache)
        heads = []
        for head in range(4):
            scores[head // 2].setdefault(t, 0.0)
            heads.append(attend(head, t, sorted(scores[head // 2])))
        torch.testing.assert_close(y[0], layer.o_proj(torch.cat(heads)), **TIGHT)
        for kv_head in range(2):
            evict(kv_head)
            stored = cache.positions()[0, kv_head]
            assert sorted(stored.tolist()) == sorted(scores[kv_head])
            kept = cache.layer(0).kv.valid_scores()[0, kv_head]
            expected = torch.tensor([scores[kv_head][p] for p in stored.tolist()],
                                    dtype=torch.float64)
            torch.testing.assert_close(kept, expected, **TIGHT)


def test_buffer_evict_one_and_keep() -> None:
    from leantorch.nn.attention import KVBuffer

    buffer = KVBuffer(max_len=None)
    keys = torch.arange(2 * 5, dtype=torch.float64).view(1, 2, 5, 1)
    buffer.append(keys, keys + 100, torch.arange(5).expand(1, 2, 5))
    buffer.evict_one(torch.tensor([[1, 4]]))  # row 0 drops slot 1, row 1 drops its last slot
    assert buffer.view()[2].tolist() == [[[0, 4, 2, 3], [0, 1, 2, 3]]]
    assert buffer.view()[1][..., 0].tolist() == [[[100, 104, 102, 103], [105, 106, 107, 108]]]
    buffer.keep(torch.tensor([[[True, False, True, False], [False, True, True, False]]]))
    assert buffer.view()[2].tolist() == [[[0, 2], [1, 2]]]
    assert buffer.view()[0][..., 0].tolist() == [[[0, 2], [6, 7]]]
