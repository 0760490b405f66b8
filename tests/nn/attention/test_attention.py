"""Attention: every kind equals its naive reference, decodes with a cache exactly as it runs
on the whole sequence, is causal, handles GQA as duplicated MHA, and reduces to exact attention
(or plain linear attention) at its boundary case."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leantorch.errors import LeanError, LeanTypeError
from leantorch.nn.attention import KINDS, Attention, KVCache
from leantorch.nn.attention.naive import naive_attention_forward
from leantorch.ops.attention import naive_attention
from tests.nn.attention._kinds import DIM, HEADS, make, tokens

TIGHT = {"atol": 1e-12, "rtol": 0}
NON_CAUSAL_KINDS = ("exact", "sliding", "block_sparse", "topk", "mla", "linear")


@pytest.mark.parametrize("kind", KINDS)
def test_forward_equals_the_naive_reference(kind: str) -> None:
    layer, x = make(kind), tokens()
    torch.testing.assert_close(layer(x), naive_attention_forward(layer, x), **TIGHT)


@pytest.mark.parametrize("kind", NON_CAUSAL_KINDS)
def test_non_causal_forward_equals_the_naive_reference(kind: str) -> None:
    layer, x = make(kind, causal=False), tokens()
    torch.testing.assert_close(layer(x), naive_attention_forward(layer, x), **TIGHT)


def decode(layer: Attention, x: torch.Tensor, cache: KVCache, prompt: int) -> torch.Tensor:
    """Prefill ``prompt`` tokens in one forward, then step through the rest one at a time."""
    outputs = [layer(x[:, :prompt], cache)] if prompt else []
    for t in range(prompt, x.shape[1]):
        outputs.append(layer.step(x[:, t], cache).unsqueeze(1))
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("prompt", [0, 1, 6, 13])
@pytest.mark.parametrize("kind", KINDS)
def test_cached_decoding_equals_the_full_forward(kind: str, prompt: int, static: bool) -> None:
    layer, x = make(kind), tokens()
    cache = KVCache.static(16) if static else KVCache.dynamic()
    torch.testing.assert_close(decode(layer, x, cache, prompt), layer(x), **TIGHT)
    assert cache.seen_tokens(layer.layer_idx) == x.shape[1]
    assert cache.nbytes() == layer.cache_nbytes(x.shape[1], batch=2, dtype=torch.float64)


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_in_chunks_equals_the_full_forward(kind: str) -> None:
    layer, x = make(kind), tokens()
    cache = KVCache.dynamic()
    chunks = [layer(x[:, a:b], cache) for a, b in ((0, 4), (4, 9), (9, 10), (10, 13))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), layer(x), **TIGHT)


@settings(max_examples=15, deadline=None)
@given(kind=st.sampled_from(["exact", "gla", "mla", "sliding"]),
       kv_heads=st.sampled_from([1, 2, 4]), n=st.integers(1, 12), data=st.data())
def test_cached_decoding_property(kind: str, kv_heads: int, n: int, data) -> None:
    prompt = data.draw(st.integers(0, n))
    layer, x = make(kind, num_kv_heads=kv_heads), tokens(batch=1, n=n)
    torch.testing.assert_close(decode(layer, x, KVCache.dynamic(), prompt), layer(x), **TIGHT)


@pytest.mark.parametrize("kind", KINDS)
def test_changing_a_future_token_leaves_past_outputs_unchanged(kind: str) -> None:
    layer, x = make(kind), tokens()
    changed = x.clone()
    changed[:, 9:] = torch.randn_like(changed[:, 9:])
    assert torch.equal(layer(x)[:, :9], layer(changed)[:, :9])


def _duplicate_kv_rows(weight: torch.Tensor, kv_heads: int, group: int) -> torch.Tensor:
    """Rows of a per-KV-head projection, each head's block repeated for its ``group``."""
    return weight.view(kv_heads, -1, weight.shape[-1]).repeat_interleave(group, 0).flatten(0, 1)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "mla"])
def test_gqa_equals_mha_with_kv_weights_duplicated_within_groups(kind: str) -> None:
    gqa = make(kind, num_kv_heads=2)
    mha = make(kind, num_kv_heads=HEADS, seed=5)
    state = dict(gqa.state_dict())
    per_kv_head = {"k_proj.weight": gqa.num_kv_heads, "v_proj.weight": gqa.num_kv_heads}
    if kind == "based":  # k_proj / k_feat hold half the KV heads each
        per_kv_head = {"k_proj.weight": 1, "k_feat.weight": 1, "v_proj.weight": 2}
    for name, kv_heads in per_kv_head.items():
        state[name] = _duplicate_kv_rows(state[name], kv_heads, gqa.group)
    mha.load_state_dict(state)
    x = tokens()
    torch.testing.assert_close(mha(x), gqa(x), **TIGHT)
    torch.testing.assert_close(decode(mha, x, KVCache.dynamic(), 5), gqa(x), **TIGHT)
    # ... and the GQA cache is smaller by the group size (the window heads' share for based).
    mha_cache, gqa_cache = KVCache.dynamic(), KVCache.dynamic()
    mha(x, mha_cache), gqa(x, gqa_cache)
    if kind in ("exact", "sliding", "block_sparse", "topk"):
        assert mha_cache.nbytes() == gqa.group * gqa_cache.nbytes()


def _same_weights(kind: str, source: Attention, **args) -> Attention:
    target = make(kind, **args)
    target.load_state_dict(source.state_dict())
    return target


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [13, 14, 40])
def test_sliding_window_covering_the_sequence_is_exact(window: int, causal: bool) -> None:
    exact, x = make("exact", causal=causal), tokens()
    if not causal and window % 2 == 0:
        window += 1  # centred windows are odd
    sliding = _same_weights("sliding", exact, window=window, causal=causal)
    torch.testing.assert_close(sliding(x), exact(x), **TIGHT)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("topk", [13, 50])
def test_topk_with_k_at_least_n_is_exact(topk: int, causal: bool) -> None:
    exact, x = make("exact", causal=causal), tokens()
    torch.testing.assert_close(_same_weights("topk", exact, topk=topk, causal=causal)(x),
                               exact(x), **TIGHT)


@pytest.mark.parametrize("causal", [True, False])
def test_block_sparse_with_all_blocks_on_is_exact(causal: bool) -> None:
    exact, x = make("exact", causal=causal), tokens()
    everything = torch.ones(1, 4, 4, dtype=torch.bool)
    layer = _same_weights("block_sparse", exact, block_mask=everything, causal=causal)
    torch.testing.assert_close(layer(x), exact(x), **TIGHT)
    cache = KVCache.dynamic()
    torch.testing.assert_close(decode(layer, x, cache, 3), exact(x), **TIGHT) if causal else None


def test_block_mask_callable_and_per_head_masks() -> None:
    heads_mask = (torch.rand(HEADS, 4, 4) > 0.5) | torch.eye(4, dtype=torch.bool)
    layer, x = make("block_sparse", block_mask=heads_mask), tokens()
    torch.testing.assert_close(layer(x), naive_attention_forward(layer, x), **TIGHT)
    by_call = _same_weights("block_sparse", layer,
                            block_mask=lambda q_blocks, k_blocks: heads_mask[:, :q_blocks,
                                                                             :k_blocks])
    torch.testing.assert_close(by_call(x), layer(x), **TIGHT)
    with pytest.raises(LeanError, match="block_mask"):
        layer(tokens(n=17))  # 5 blocks needed, 4 given


def test_gla_with_gate_one_is_plain_linear_attention() -> None:
    gla, x = make("gla"), tokens()
    with torch.no_grad():
        gla.gate_proj[1].bias.fill_(1e4)  # logsigmoid(1e4) == 0 in float64: decay exactly 1
    assert torch.equal(gla.log_decay(x), torch.zeros_like(gla.log_decay(x)))
    linear = make("linear", feature_map="identity", normalize=False)
    state = {k: v for k, v in gla.state_dict().items() if not k.startswith("gate_proj")}
    state["q_proj.weight"] = state["q_proj.weight"] * gla.head_dim ** -0.5  # GLA scales q
    linear.load_state_dict(state)
    torch.testing.assert_close(gla(x), linear(x), **TIGHT)


def test_based_window_heads_with_window_covering_the_sequence_are_causal_softmax() -> None:
    based, x = make("based", window=13), tokens()
    wider = _same_weights("based", based, window=30)
    torch.testing.assert_close(based(x), wider(x), **TIGHT)
    # The window heads' part of the output is exact causal softmax attention.
    positions = torch.arange(13)
    half = based.linear_kv_heads
    q = based.rotary(based.q_proj(x).view(2, 13, -1, 8).transpose(1, 2), positions)
    k = based.rotary(based.k_proj(x).view(2, 13, -1, 8).transpose(1, 2), positions)
    v = based.v_proj(x).view(2, 13, -1, 8).transpose(1, 2)[:, half:]
    heads = {}
    handle = based.o_proj.register_forward_pre_hook(lambda m, a: heads.setdefault("in", a[0]))
    based(x)
    handle.remove()
    window_part = heads["in"].view(2, 13, HEADS, 8)[:, :, based.linear_heads:].transpose(1, 2)
    torch.testing.assert_close(window_part, naive_attention(q, k, v, causal=True), **TIGHT)


def test_mha_is_the_default_num_kv_heads() -> None:
    assert make("exact", num_kv_heads=None).num_kv_heads == HEADS


@pytest.mark.parametrize("kind", ["exact", "topk", "mla"])
def test_key_padding_mask_ignores_padded_keys(kind: str) -> None:
    layer, x = make(kind, causal=False), tokens()
    real = torch.ones(2, 13, dtype=torch.bool)
    real[:, 9:] = False
    padded = layer(x, key_padding_mask=real)
    torch.testing.assert_close(padded[:, :9], layer(x[:, :9]), **TIGHT)


def test_dropout_acts_in_training_only() -> None:
    layer, x = make("exact", dropout=0.5), tokens()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_finite_differences(kind: str) -> None:
    extra = {"window": 3} if kind in ("sliding", "based") else {}
    if kind == "block_sparse":
        extra = {"block_size": 2}
    if kind == "based":
        extra["feature_dim"] = 2
    torch.manual_seed(0)
    args = {**{"exact": {}, "sliding": {}, "block_sparse": {
        "block_mask": torch.ones(1, 3, 3, dtype=torch.bool).tril()},
        "topk": {"topk": 2}, "mla": {"kv_lora_rank": 4}, "linear": {}, "gla": {},
        "based": {}}[kind], **extra}
    layer = Attention(8, 2, None if kind == "mla" else 2, kind, **args).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), fast_mode=True)


@pytest.mark.parametrize("args,match", [
    ({"kind": "sliding"}, "window"),
    ({"kind": "topk"}, "topk"),
    ({"kind": "block_sparse", "block_size": 4}, "block_mask"),
    ({"kind": "mla"}, "kv_lora_rank"),
    ({"kind": "exact", "window": 4}, "window"),
    ({"kind": "exact", "topk": 4}, "topk"),
    ({"kind": "linear", "kv_lora_rank": 4}, "kv_lora_rank"),
    ({"kind": "gla", "causal": False}, "causal"),
    ({"kind": "based", "window": 4, "num_kv_heads": 1}, "num_kv_heads"),
    ({"kind": "mla", "kv_lora_rank": 8, "num_kv_heads": 2}, "num_kv_heads"),
    ({"kind": "nope"}, "kind"),
    ({"num_kv_heads": 3}, "num_kv_heads"),
    ({"num_heads": 5}, "dim"),
    ({"head_dim": 7}, "head_dim"),
    ({"dropout": 1.5}, "dropout"),
    ({"kind": "linear", "feature_map": "cosine"}, "feature_map"),
    ({"kind": "block_sparse", "block_size": 4, "block_mask": torch.ones(4, 4)}, "block_mask"),
])
def test_bad_combinations_raise_lean_errors_naming_the_argument(args: dict, match: str) -> None:
    args = {"dim": DIM, "num_heads": HEADS, **args}
    with pytest.raises(LeanError, match=match):
        Attention(**args)


def test_bad_calls_raise_lean_errors() -> None:
    layer, x = make("exact"), tokens()
    with pytest.raises(LeanError, match="dim=32"):
        layer(x[..., :5])
    with pytest.raises(LeanTypeError, match="cache"):
        layer(x, cache={})
    with pytest.raises(LeanError, match="causal=False"):
        make("exact", causal=False)(x, KVCache.dynamic())
    with pytest.raises(LeanError, match="absorb"):
        layer(x, absorb=True)
    with pytest.raises(LeanError, match="key_padding_mask"):
        make("linear")(x, key_padding_mask=torch.ones(2, 13, dtype=torch.bool))
    cache = KVCache.dynamic()
    layer(x, cache)
    with pytest.raises(LeanError, match="layer_idx"):
        make("gla")(x, cache)
    with pytest.raises(LeanError, match="max_len=8"):
        layer(x, KVCache.static(8))


def test_window_of_one_returns_each_tokens_own_value() -> None:
    layer, x = make("sliding", window=1), tokens()
    own_value = layer.v_proj(x).unflatten(-1, (2, -1)).repeat_interleave(2, dim=2).flatten(2)
    torch.testing.assert_close(layer(x), layer.o_proj(own_value), **TIGHT)
    for cache in (KVCache.dynamic(), KVCache.static(4)):
        torch.testing.assert_close(decode(layer, x, cache, 3), layer(x), **TIGHT)
        assert cache.nbytes() == 0  # nothing from the past is needed
