"""KVCache: byte accounting matches the formulas, static buffers are preallocated once, dynamic
ones grow, positions continue across calls, recurrent states stay flat in length."""

from __future__ import annotations

import pytest
import torch

from leantorch.errors import LeanError, LeanTypeError
from leantorch.nn.attention import Attention, KVCache, kv_bytes_per_token
from tests.nn.attention._kinds import DIM, HEADS, make, tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kv_heads", [HEADS, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_kv_bytes_match_two_kv_heads_head_dim_bytes(kv_heads: int, dtype) -> None:
    layer = Attention(DIM, HEADS, kv_heads).to(dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_token = 2 * kv_heads * layer.head_dim * itemsize
    assert layer.kv_bytes_per_token(dtype) == per_token
    assert kv_bytes_per_token(num_kv_heads=kv_heads, head_dim=layer.head_dim,
                              dtype=dtype) == per_token
    cache = KVCache.dynamic()
    x = tokens(batch=3, n=7, dtype=dtype)
    layer(x, cache)
    layer.step(x[:, 0], cache)
    assert cache.nbytes() == 3 * 8 * per_token


@pytest.mark.parametrize("rope_dim", [0, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mla_bytes_match_latent_plus_rope_dim_bytes(rope_dim: int, dtype) -> None:
    layer = make("mla", dtype=dtype, kv_lora_rank=12, rope_dim=rope_dim)
    itemsize = torch.empty((), dtype=dtype).element_size()
    assert layer.kv_bytes_per_token(dtype) == (12 + rope_dim) * itemsize
    assert kv_bytes_per_token(latent_dim=12, rope_dim=rope_dim, dtype=dtype) \
        == (12 + rope_dim) * itemsize
    cache = KVCache.static(32)
    layer(tokens(batch=2, n=9, dtype=dtype), cache)
    assert cache.nbytes() == 2 * 9 * (12 + rope_dim) * itemsize


def test_kv_bytes_per_token_refuses_ambiguous_arguments() -> None:
    with pytest.raises(LeanError, match="latent_dim"):
        kv_bytes_per_token(latent_dim=8, num_kv_heads=2, head_dim=4)
    with pytest.raises(LeanError, match="num_kv_heads"):
        kv_bytes_per_token(head_dim=4)


def test_static_cache_preallocates_once_and_writes_in_place() -> None:
    layer, x = make("exact"), tokens(n=6)
    cache = KVCache.static(10)
    layer(x[:, :2], cache)
    allocated = cache.allocated_nbytes()
    assert allocated == 2 * 10 * layer.kv_bytes_per_token(torch.float64)
    storage = cache.layer(0).kv.keys.data_ptr()
    for t in range(2, 6):
        layer.step(x[:, t], cache)
    assert cache.allocated_nbytes() == allocated
    assert cache.layer(0).kv.keys.data_ptr() == storage  # written in place, never reallocated


def test_static_cache_overflow_raises() -> None:
    layer, x = make("exact"), tokens(n=6)
    cache = KVCache.static(10)
    layer(x, cache)
    with pytest.raises(LeanError, match="max_len=10"):
        layer(x, cache)


def test_dynamic_cache_grows_by_doubling() -> None:
    layer, x = make("exact"), tokens(n=40)
    cache = KVCache.dynamic()
    capacities = set()
    for t in range(40):
        layer.step(x[:, t], cache)
        capacities.add(cache.layer(0).kv.capacity)
    assert sorted(capacities) == [16, 32, 64]
    assert cache.length() == 40 and cache.nbytes() <= cache.allocated_nbytes()


def test_positions_continue_and_layers_are_separate() -> None:
    first, second = make("exact", layer_idx=0), make("gla", layer_idx=1)
    cache, x = KVCache.dynamic(), tokens(n=5)
    first(x, cache)
    second(x[:, :3], cache)
    first.step(x[:, 0], cache)
    assert cache.seen_tokens(0) == 6 and cache.seen_tokens(1) == 3
    assert cache.positions(0)[0, 0].tolist() == list(range(6))
    assert cache.length(1) == 0 and cache.positions(1) is None  # a recurrent layer has no KV
    assert list(cache) == [0, 1]
    cache.reset()
    assert cache.nbytes() == 0 and cache.seen_tokens(0) == 0


@pytest.mark.parametrize("kind", ["linear", "gla", "based", "sliding"])
def test_recurrent_and_window_caches_are_flat_in_length(kind: str) -> None:
    layer, x = make(kind), tokens(n=30)
    cache = KVCache.dynamic()
    sizes = []
    for t in range(30):
        layer.step(x[:, t], cache)
        sizes.append(cache.nbytes())
    assert len(set(sizes[10:])) == 1
    assert sizes[-1] == layer.cache_nbytes(30, batch=2, dtype=torch.float64)


def test_based_state_is_feature_state_plus_window() -> None:
    layer = make("based", window=6, feature_dim=4)
    features = 1 + 4 + 16  # Taylor map of a 4-dim feature vector
    linear_heads, window_kv_heads, hd = layer.linear_heads, layer.num_kv_heads // 2, 8
    expected = 8 * (linear_heads * features * (hd + 1) + 5 * 2 * window_kv_heads * hd)
    assert layer.cache_nbytes(100, dtype=torch.float64) == expected


def test_cache_arguments_are_checked() -> None:
    with pytest.raises(LeanError, match="max_len"):
        KVCache.static(0)
    with pytest.raises(LeanTypeError, match="policy"):
        KVCache(policy="streaming")
    layer = make("exact")
    cache = KVCache.dynamic()
    layer(tokens(batch=2, n=3), cache)
    with pytest.raises(LeanError, match="do not fit"):
        layer(tokens(batch=3, n=3), cache)
