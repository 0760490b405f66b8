"""MLA: absorbed and unabsorbed forms agree (with and without a cache); the folded weights are
the same products; the GQA -> MLA conversion is exact at equal KV-cache bytes."""

from __future__ import annotations

import pytest
import torch

from leantorch.errors import LeanError, LeanTypeError
from leantorch.nn.attention import Attention, KVCache, fold_mla_weights, gqa_to_mla
from leantorch.nn.attention.naive import naive_attention_forward
from tests.nn.attention._kinds import DIM, HEADS, make, tokens

TIGHT = {"atol": 1e-12, "rtol": 0}
MLA_VARIANTS = {
    "decoupled-rope": {"kv_lora_rank": 12},
    "wide-rope": {"kv_lora_rank": 20, "rope_dim": 8},
    "no-rope": {"kv_lora_rank": 12, "rope": False},
    "bias": {"kv_lora_rank": 12, "qkv_bias": True, "proj_bias": True},
    "latent-rope": {"kv_lora_rank": 24, "latent_rope_dim": 16, "rope_dim": 0},
}


@pytest.mark.parametrize("variant", MLA_VARIANTS)
def test_absorbed_equals_unabsorbed(variant: str) -> None:
    layer, x = make("mla", **MLA_VARIANTS[variant]), tokens()
    torch.testing.assert_close(layer(x, absorb=True), layer(x, absorb=False), **TIGHT)
    torch.testing.assert_close(layer(x), naive_attention_forward(layer, x), **TIGHT)
    for absorb in (True, False):
        cache = KVCache.dynamic()
        outputs = [layer(x[:, :5], cache, absorb=absorb)]
        outputs += [layer.step(x[:, t], cache, absorb=absorb).unsqueeze(1) for t in range(5, 13)]
        torch.testing.assert_close(torch.cat(outputs, 1), layer(x), **TIGHT)


@pytest.mark.parametrize("variant", ["decoupled-rope", "bias", "no-rope"])
def test_folded_weights_are_the_absorbed_products(variant: str) -> None:
    layer, x = make("mla", **MLA_VARIANTS[variant]), tokens()
    folded = fold_mla_weights(layer)
    positions = torch.arange(x.shape[1])
    q_nope, q_rope = layer._mla_queries(x, positions)
    absorbed = layer._mla_absorbed_query(q_nope, q_rope)[..., : layer.kv_lora_rank]
    by_fold = torch.nn.functional.linear(x, folded.query_weight, folded.query_bias)
    torch.testing.assert_close(by_fold.unflatten(-1, (HEADS, -1)).transpose(1, 2), absorbed,
                               **TIGHT)
    out_latent = torch.randn(2, HEADS, 13, layer.kv_lora_rank, dtype=torch.float64)
    w_uv = layer.v_up.weight.view(HEADS, layer.value_dim, layer.kv_lora_rank)
    heads = torch.einsum("bhnc,hvc->bnhv", out_latent, w_uv).flatten(2)
    torch.testing.assert_close(
        torch.nn.functional.linear(out_latent.transpose(1, 2).flatten(2), folded.output_weight),
        torch.nn.functional.linear(heads, layer.o_proj.weight), **TIGHT)
    with pytest.raises(LeanError, match="latent_rope_dim"):
        fold_mla_weights(make("mla", **MLA_VARIANTS["latent-rope"]))


def _logits(layer: Attention, x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, n, n) pre-softmax scores of a GQA layer or (absorbed) of an MLA layer."""
    positions = torch.arange(x.shape[1])
    if layer.kind == "mla":
        q = layer._mla_absorbed_query(*layer._mla_queries(x, positions))
        k = layer.mla_latent(x, positions)
    else:
        q = layer._rotate(layer.q_proj(x).unflatten(-1, (layer.num_heads, -1)).transpose(1, 2),
                          positions)
        k = layer._rotate(layer.k_proj(x).unflatten(-1, (layer.num_kv_heads, -1))
                          .transpose(1, 2), positions)
        k = k.repeat_interleave(layer.group, 1)
    return (q @ k.transpose(-1, -2)) * layer.scale


@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("kv_heads", [HEADS, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_gqa_to_mla_is_exact_at_equal_cache_bytes(kv_heads: int, rope: bool) -> None:
    gqa, x = make("exact", num_kv_heads=kv_heads, rope=rope, qkv_bias=True), tokens()
    mla = gqa_to_mla(gqa)
    assert mla.kind == "mla" and mla.kv_lora_rank == 2 * kv_heads * gqa.head_dim
    torch.testing.assert_close(_logits(mla, x), _logits(gqa, x), **TIGHT)
    torch.testing.assert_close(mla(x), gqa(x), **TIGHT)
    torch.testing.assert_close(mla(x, absorb=True), gqa(x), **TIGHT)
    assert mla.kv_bytes_per_token(torch.float64) == gqa.kv_bytes_per_token(torch.float64)
    gqa_cache, mla_cache = KVCache.dynamic(), KVCache.dynamic()
    gqa(x[:, :6], gqa_cache)
    outputs = [mla(x[:, :6], mla_cache)]
    for t in range(6, 13):
        gqa.step(x[:, t], gqa_cache)
        outputs.append(mla.step(x[:, t], mla_cache).unsqueeze(1))
    torch.testing.assert_close(torch.cat(outputs, 1), gqa(x), **TIGHT)
    assert mla_cache.nbytes() == gqa_cache.nbytes()


def test_gqa_to_mla_in_float32_within_1e_5() -> None:
    gqa = make("exact", num_kv_heads=2, dtype=torch.float32)
    x = tokens(dtype=torch.float32)
    mla = gqa_to_mla(gqa)
    assert mla.q_proj.weight.dtype == torch.float32
    torch.testing.assert_close(_logits(mla, x), _logits(gqa, x), atol=1e-5, rtol=0)
    torch.testing.assert_close(mla(x), gqa(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(mla(x, absorb=True), gqa(x), atol=1e-5, rtol=0)


def test_gqa_to_mla_leaves_the_source_alone_and_checks_it() -> None:
    gqa = make("exact")
    before = {k: v.clone() for k, v in gqa.state_dict().items()}
    gqa_to_mla(gqa)
    assert all(torch.equal(before[k], v) for k, v in gqa.state_dict().items())
    with pytest.raises(LeanError, match="kind"):
        gqa_to_mla(make("sliding"))
    with pytest.raises(LeanTypeError, match="layer"):
        gqa_to_mla(torch.nn.Linear(2, 2))


def test_mla_argument_errors() -> None:
    with pytest.raises(LeanError, match="rope_dim"):
        Attention(DIM, HEADS, kind="mla", kv_lora_rank=8, rope_dim=3)
    with pytest.raises(LeanError, match="latent_rope_dim"):
        Attention(DIM, HEADS, kind="mla", kv_lora_rank=8, latent_rope_dim=12)
