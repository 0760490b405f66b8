"""Interop with transformers' Mixtral sparse-MoE block: same router choices, same outputs,
weights exported back; whole-model conversion round-trips leantorch.save/load."""

from __future__ import annotations

import pytest
import torch

import leantorch
from leantorch.compress.moefy import convert_mixtral
from leantorch.errors import LeanError
from leantorch.nn.moe import MoE, from_mixtral, to_mixtral
from tests._optional import needs_transformers, optional_import, transformers

pytestmark = needs_transformers

T = transformers
mixtral = optional_import("transformers.models.mixtral.modeling_mixtral")

D, FF, E, K = 32, 48, 4, 2


def _block(implementation: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    config = T.MixtralConfig(hidden_size=D, intermediate_size=FF, num_local_experts=E,
                             num_experts_per_tok=K)
    config._experts_implementation = implementation
    torch.manual_seed(seed)
    block = mixtral.MixtralSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    return block.to(dtype).eval()


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_leantorch_layer_matches_mixtral_choices_and_outputs(implementation) -> None:
    block = _block(implementation)
    moe = from_mixtral(block).eval()
    x = torch.randn(3, 9, D)
    logits, gates, chosen = block.gate(x.reshape(-1, D))
    routing = moe.router.route(moe.router.logits(x.reshape(-1, D)))
    assert torch.equal(moe.router.logits(x.reshape(-1, D)), logits)
    assert torch.equal(routing.expert_index.view(K, -1).t(), chosen)
    assert torch.equal(routing.gates.view(K, -1).t(), gates)
    torch.testing.assert_close(moe(x), block(x), rtol=1e-6, atol=1e-6)


def test_float64_differs_only_by_mixtrals_float32_router() -> None:
    block = _block("eager", torch.float64)
    moe = from_mixtral(block).eval()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    _, gates, chosen = block.gate(x.reshape(-1, D))
    # Mixtral computes its softmax in float32 even for a float64 model; we keep float64
    assert gates.dtype == torch.float32
    routing = moe.router.route(moe.router.logits(x.reshape(-1, D)))
    assert routing.gates.dtype == torch.float64
    assert torch.equal(routing.expert_index.view(K, -1).t(), chosen)
    torch.testing.assert_close(routing.gates.view(K, -1).t().float(), gates)
    torch.testing.assert_close(moe(x), block(x), rtol=1e-5, atol=1e-6)


def test_export_back_gives_the_same_block() -> None:
    block = _block("eager")
    back = to_mixtral(from_mixtral(block), block.experts.config)
    for (name, a), (_, b) in zip(block.state_dict().items(), back.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    x = torch.randn(4, 3, D)
    assert torch.equal(back(x), block(x))


def test_export_refuses_a_layer_mixtral_cannot_express() -> None:
    with pytest.raises(LeanError, match="dropless"):
        to_mixtral(MoE(D, FF, E, K, capacity_factor=1.0))
    with pytest.raises(LeanError, match="no zero-computation experts"):
        to_mixtral(MoE(D, FF, E, K, zero_experts=1))
    block = _block("eager")
    block.jitter_noise = 0.1
    with pytest.raises(LeanError, match="router_jitter_noise"):
        from_mixtral(block)


def test_whole_mixtral_model_converts_and_round_trips(tmp_path) -> None:
    config = T.MixtralConfig(hidden_size=D, intermediate_size=FF, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2,
                             num_local_experts=E, num_experts_per_tok=K, vocab_size=64,
                             bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = T.MixtralForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 7))
    converted, change = convert_mixtral(model)
    assert change.replaced == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert isinstance(converted.model.layers[0].mlp, MoE)
    assert not isinstance(model.model.layers[0].mlp, MoE)  # the caller's model is untouched
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, model(ids).logits, rtol=1e-5,
                                   atol=1e-5)
    loaded = leantorch.load(leantorch.save(converted, tmp_path / "mixtral.safetensors"))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, converted(ids).logits)
