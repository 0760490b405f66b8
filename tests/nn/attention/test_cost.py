"""leantorch.measure counts what each decoding path computes: the attention MACs of a cached
step grow with the context for exact attention, stay flat for linear kinds and sliding windows,
and MLA's absorbed form never up-projects the cache."""

from __future__ import annotations

import pytest
import torch

from leantorch.nn.attention import Attention, KVCache
from tests.conftest import count

DIM, HEADS, HD = 64, 4, 16


def step_macs(layer: Attention, context: int, **kwargs) -> int:
    cache = KVCache.dynamic()
    with torch.no_grad():
        layer(torch.randn(1, context, DIM), cache)
    report = count(layer, torch.randn(1, 1, DIM), cache, input_kwargs=kwargs)
    assert not report.uncounted, report.uncounted
    return report.macs


def projection_macs(q: int, kv: int) -> int:
    return DIM * (q + 2 * kv) + q * DIM


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_exact_step_counts_projections_plus_one_row_of_attention(kv_heads: int) -> None:
    layer = Attention(DIM, HEADS, kv_heads).eval()
    for context in (10, 50):
        keys = context + 1
        expected = projection_macs(HEADS * HD, kv_heads * HD) + HEADS * keys * (HD + HD)
        assert step_macs(layer, context) == expected


@pytest.mark.parametrize("kind,args", [("sliding", {"window": 8}), ("linear", {}),
                                       ("gla", {})])
def test_bounded_kinds_step_cost_is_flat_in_context(kind: str, args: dict) -> None:
    layer = Attention(DIM, HEADS, 2, kind, **args).eval()
    assert step_macs(layer, 20) == step_macs(layer, 80)


def test_mla_absorbed_step_never_up_projects_the_cache() -> None:
    rank, rope_dim = 32, 8
    layer = Attention(DIM, HEADS, kind="mla", kv_lora_rank=rank, rope_dim=rope_dim).eval()
    context = 40
    keys = context + 1
    queries = DIM * HEADS * (HD + rope_dim)
    latent = DIM * rank + DIM * rope_dim
    out = HEADS * HD * DIM
    absorbed = (queries + latent + out + HEADS * HD * rank        # W_UK on the query
                + HEADS * keys * 2 * (rank + rope_dim)            # scores, average of [c, k_R]
                + HEADS * rank * HD)                              # W_UV on the output
    unabsorbed = (queries + latent + out + keys * rank * 2 * HEADS * HD   # rebuild K and V
                  + HEADS * keys * (HD + rope_dim + HD))
    assert step_macs(layer, context, absorb=True) == absorbed
    assert step_macs(layer, context, absorb=False) == unabsorbed
