"""Whole transformers models (small configs, random weights) against hand-derived totals."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests._optional import needs_transformers, transformers
from tests.conftest import count

pytestmark = needs_transformers
T = transformers

B, N, D, HEADS, FF, LAYERS, VOCAB = 2, 10, 32, 4, 48, 2, 100


def ids() -> dict[str, torch.Tensor]:
    x = torch.randint(0, VOCAB, (B, N))
    return {"input_ids": x, "attention_mask": torch.ones_like(x)}


def bert(attn: str = "sdpa") -> torch.nn.Module:
    config = T.BertConfig(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                          intermediate_size=FF, vocab_size=VOCAB, attn_implementation=attn)
    return T.BertModel(config).eval()


def test_bert_macs_match_the_hand_formula() -> None:
    per_layer = 4 * N * D * D + 2 * N * D * FF + 2 * N * N * D  # qkvo, FFN, QK^T and PV
    pooler = D * D  # the [CLS] token only
    assert count(bert(), ids()).macs == B * (LAYERS * per_layer + pooler)


def test_gpt2_counts_the_causal_half_of_attention() -> None:
    config = T.GPT2Config(n_embd=D, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB,
                          n_positions=64, bos_token_id=0, eos_token_id=0)
    model = T.GPT2LMHeadModel(config).eval()
    pairs = N * (N + 1) // 2
    per_layer = 4 * N * D * D + 2 * N * D * 4 * D + 2 * pairs * D
    lm_head = N * D * VOCAB
    assert count(model, ids()).macs == B * (LAYERS * per_layer + lm_head)


def test_llama_grouped_kv_projections_are_smaller() -> None:
    kv_heads = 2
    config = T.LlamaConfig(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                           num_key_value_heads=kv_heads, intermediate_size=FF, vocab_size=VOCAB,
                           bos_token_id=0, eos_token_id=0)
    model = T.LlamaForCausalLM(config).eval()
    kv_dim = D // HEADS * kv_heads
    pairs = N * (N + 1) // 2
    per_layer = (2 * N * D * D + 2 * N * D * kv_dim  # q, o full; k, v grouped
                 + 3 * N * D * FF  # SwiGLU: gate, up, down
                 + 2 * pairs * D)  # every query head attends
    assert count(model, ids()).macs == B * (LAYERS * per_layer + N * D * VOCAB)


def test_mixtral_experts_cost_only_the_tokens_routed_to_them() -> None:
    experts, top_k = 4, 2
    config = T.MixtralConfig(hidden_size=D, num_hidden_layers=1, num_attention_heads=HEADS,
                             num_key_value_heads=HEADS, intermediate_size=FF,
                             num_local_experts=experts, num_experts_per_tok=top_k,
                             vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    model = T.MixtralModel(config).eval()
    report = count(model, ids())
    tokens = B * N
    router = tokens * D * experts
    routed = tokens * top_k * 3 * D * FF  # each token through k SwiGLU experts, not all E
    attention = 4 * tokens * D * D + 2 * B * (N * (N + 1) // 2) * D
    assert report.macs == router + routed + attention
    grouped = report.ops["aten._grouped_mm"]["macs"]
    assert grouped == routed


def test_eager_attention_agrees_with_flop_counter_mode_and_sdpa_is_what_it_misses() -> None:
    eager, sdpa = bert("eager"), bert("sdpa")
    sdpa.load_state_dict(eager.state_dict())
    inputs = ids()
    with FlopCounterMode(display=False) as peer_eager:
        eager(**inputs)
    with FlopCounterMode(display=False) as peer_sdpa:
        sdpa(**inputs)
    ours_eager, ours_sdpa = count(eager, inputs), count(sdpa, inputs)
    assert ours_eager.forward.matmul_flops == peer_eager.get_total_flops()
    assert ours_sdpa.macs == ours_eager.macs  # same math either way
    attention_macs = ours_sdpa.ops["aten._scaled_dot_product_flash_attention_for_cpu"]["macs"]
    assert attention_macs == B * LAYERS * 2 * N * N * D
    assert peer_eager.get_total_flops() - peer_sdpa.get_total_flops() == 2 * attention_macs


TINY = {
    "bert": lambda: T.BertModel(T.BertConfig(hidden_size=D, num_hidden_layers=1,
                                             num_attention_heads=HEADS, intermediate_size=FF,
                                             vocab_size=VOCAB)),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=D, n_layer=1, n_head=HEADS,
                                                   vocab_size=VOCAB, bos_token_id=0,
                                                   eos_token_id=0)),
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(
        hidden_size=D, num_hidden_layers=1, num_attention_heads=HEADS, num_key_value_heads=2,
        intermediate_size=FF, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)),
    "mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(
        hidden_size=D, num_hidden_layers=1, num_attention_heads=HEADS, num_key_value_heads=2,
        intermediate_size=FF, num_local_experts=4, vocab_size=VOCAB, bos_token_id=0,
        eos_token_id=0)),
    "vit": lambda: T.ViTForImageClassification(T.ViTConfig(
        hidden_size=D, num_hidden_layers=1, num_attention_heads=HEADS, intermediate_size=FF,
        image_size=32, patch_size=8)),
    "resnet": lambda: T.ResNetForImageClassification(T.ResNetConfig(
        hidden_sizes=[16, 32, 64, 128], embedding_size=16, depths=[1, 1, 1, 1])),
    "convnext": lambda: T.ConvNextForImageClassification(T.ConvNextConfig(
        hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1])),
    "mobilenetv2": lambda: T.MobileNetV2ForImageClassification(T.MobileNetV2Config(
        depth_multiplier=0.35, image_size=32)),
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_op_of_common_architectures_has_a_formula(name: str) -> None:
    model = TINY[name]().train()
    inputs = ids() if name in ("bert", "gpt2", "llama", "mixtral") else torch.randn(2, 3, 32, 32)
    report = count(model, inputs, backward=True)
    assert report.uncounted == {}
    assert report.flops > 0 and report.backward.flops > report.flops
