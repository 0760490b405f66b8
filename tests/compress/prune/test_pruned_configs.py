"""Pruned transformers models keep a config that says the truth: where the new sizes are
uniform, ``save_pretrained`` + ``from_pretrained`` rebuild the pruned model exactly (same
tensor shapes and values, same outputs); where a config cannot describe them (GPT-2 or BERT
heads, a non-uniform cut), ``save_pretrained`` refuses and writes nothing."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as T
from torch import nn

import leantorch
from leantorch.compress.prune import prune_structured
from leantorch.errors import LeanError

VOCAB, D = 100, 32


def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))


def lm_inputs() -> dict[str, torch.Tensor]:
    x = ids()
    return {"input_ids": x, "attention_mask": torch.ones_like(x)}


def seq2seq_inputs() -> dict[str, torch.Tensor]:
    return {**lm_inputs(), "decoder_input_ids": ids()[:, :6]}


def decoder(cls: type, config: type, layers: int = 2, **sizes: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return cls(config(hidden_size=D, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=48, vocab_size=VOCAB,
                          **sizes)).eval()
    return build


def t5(cls: type) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return cls(T.T5Config(d_model=D, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                              vocab_size=VOCAB)).eval()
    return build


def bert() -> nn.Module:
    torch.manual_seed(0)
    return T.BertModel(T.BertConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=48, vocab_size=VOCAB)).eval()


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    return T.GPT2LMHeadModel(T.GPT2Config(n_embd=D, n_layer=2, n_head=4, vocab_size=VOCAB,
                                          n_positions=64)).eval()


def distilbert() -> nn.Module:
    torch.manual_seed(0)
    return T.DistilBertModel(T.DistilBertConfig(dim=D, n_layers=2, n_heads=4, hidden_dim=48,
                                                vocab_size=VOCAB)).eval()


def image_inputs() -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))}


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return T.ResNetForImageClassification(T.ResNetConfig(
        embedding_size=8, hidden_sizes=[16, 32], depths=[1, 2], num_labels=10)).eval()


def vit() -> nn.Module:
    torch.manual_seed(0)
    return T.ViTForImageClassification(T.ViTConfig(
        hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        image_size=32, patch_size=8, num_labels=10)).eval()


mixtral = decoder(T.MixtralForCausalLM, T.MixtralConfig, num_local_experts=8,
                  num_experts_per_tok=2)
olmoe = decoder(T.OlmoeForCausalLM, T.OlmoeConfig, num_experts=8, num_experts_per_tok=2)

# name: (build, inputs, units, config values the pruned model must have)
DESCRIBED: dict[str, tuple[Callable[[], nn.Module], Callable[[], Any], list[str],
                           dict[str, Any]]] = {  # slow: mixtral, olmoe (see the router test), t5, resnet
    "mixtral": (mixtral, lm_inputs, ["experts", "neurons"],
                {"num_local_experts": 4, "intermediate_size": 24}),
    "olmoe": (olmoe, lm_inputs, ["experts", "neurons"],
              {"num_experts": 4, "intermediate_size": 24}),
    "t5": (t5(T.T5ForConditionalGeneration), seq2seq_inputs, ["heads", "neurons"],
           {"num_heads": 2, "d_kv": 8, "d_ff": 24}),
    "t5_encoder": (t5(T.T5EncoderModel), lm_inputs, ["heads", "neurons"],
                   {"num_heads": 2, "d_ff": 24}),
    # head_dim is derived from hidden_size / heads unless set: the cut pins it at 8
    "qwen2": (decoder(T.Qwen2ForCausalLM, T.Qwen2Config), lm_inputs, ["heads", "neurons"],
              {"num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8,
               "intermediate_size": 24}),
    "qwen2_head_dim": (decoder(T.Qwen2ForCausalLM, T.Qwen2Config, head_dim=16), lm_inputs,
                       ["kv_heads", "neurons"],
                       {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}),
    "llama": (decoder(T.LlamaForCausalLM, T.LlamaConfig), lm_inputs,
              ["kv_heads", "neurons"],
              {"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 24}),
    "mistral": (decoder(T.MistralForCausalLM, T.MistralConfig), lm_inputs,
                ["kv_heads", "heads", "neurons"],
                {"num_attention_heads": 1, "num_key_value_heads": 1, "intermediate_size": 24}),
    "bert": (bert, lm_inputs, ["neurons"], {"intermediate_size": 24}),
    # per-stage lists: every stage's channels halved
    "resnet": (resnet, image_inputs, ["channels"],
               {"embedding_size": 4, "hidden_sizes": [8, 16]}),
    # ViT reads head_dim when the config has one: the head cut pins it
    "vit": (vit, image_inputs, ["heads", "neurons"],
            {"num_attention_heads": 2, "head_dim": 8, "intermediate_size": 24}),
    "gpt2": (gpt2, lm_inputs, ["neurons"], {"n_inner": 64}),
    "distilbert": (distilbert, lm_inputs, ["neurons"], {"hidden_dim": 24}),
}


def outputs(model: nn.Module, inputs: dict[str, torch.Tensor], **extra: Any) -> Any:
    with torch.no_grad():
        return model(**inputs, **extra)


def main_output(out: Any) -> torch.Tensor:
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def from_folder(model: nn.Module, folder: Path) -> nn.Module:
    """transformers' own loading, from the local folder only, by the class the folder names."""
    config = T.AutoConfig.from_pretrained(folder, local_files_only=True)
    assert type(config) is type(model.config)
    return type(model).from_pretrained(folder, local_files_only=True).eval()


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow)
                                  if n in ("mixtral", "olmoe", "t5", "resnet")
                                  else n for n in DESCRIBED])
def test_save_pretrained_rebuilds_the_pruned_model_exactly(name: str, tmp_path: Path) -> None:
    build, inputs_fn, units, expected = DESCRIBED[name]
    model, inputs = build(), inputs_fn()
    pruned, change = prune_structured(model, ratio=0.5, units=units, example_inputs=inputs)
    assert change.details["config_describes_model"] is True
    assert "config_gaps" not in change.details
    for key, value in expected.items():
        assert getattr(pruned.config, key) == value, key
    assert change.after.params < change.before.params
    pruned.save_pretrained(tmp_path / "hf")
    loaded = from_folder(pruned, tmp_path / "hf")
    state, back = pruned.state_dict(), loaded.state_dict()
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in state.items()}
    assert all(torch.equal(state[k], back[k]) for k in state)
    torch.testing.assert_close(main_output(outputs(loaded, inputs)),
                               main_output(outputs(pruned, inputs)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["mixtral", "olmoe"])
def test_router_logits_of_a_pruned_moe_have_the_kept_width(name: str, tmp_path: Path) -> None:
    build, inputs_fn, _, _ = DESCRIBED[name]
    inputs = inputs_fn()
    pruned, _ = prune_structured(build(), ratio=0.5, units="experts", example_inputs=inputs)
    out = outputs(pruned, inputs, output_router_logits=True)
    tokens = inputs["input_ids"].numel()
    assert [tuple(r.shape) for r in out.router_logits] == [(tokens, 4)] * 2
    assert torch.isfinite(out.aux_loss)  # the load-balancing loss reads the expert count
    pruned.save_pretrained(tmp_path / "hf")
    back = outputs(from_folder(pruned, tmp_path / "hf"), inputs, output_router_logits=True)
    for mine, theirs in zip(out.router_logits, back.router_logits, strict=True):
        assert torch.equal(mine, theirs)
    assert torch.equal(out.aux_loss, back.aux_loss)


def test_keeping_fewer_experts_than_top_k_routes_to_every_kept_expert(tmp_path: Path) -> None:
    model = decoder(T.MixtralForCausalLM, T.MixtralConfig, layers=1, num_local_experts=8,
                    num_experts_per_tok=2)()
    inputs = lm_inputs()
    pruned, change = prune_structured(model, ratio=0.9, units="experts", example_inputs=inputs)
    # max_ratio 0.9 of 8 experts leaves 1; a top-2 router over one expert would fail in topk
    assert pruned.config.num_local_experts == 1 and pruned.config.num_experts_per_tok == 1
    moe = pruned.model.layers[0].mlp
    assert moe.top_k == moe.gate.top_k == 1 and moe.gate.num_experts == 1
    assert change.details["config"][""]["num_experts_per_tok"] == [2, 1]
    pruned.save_pretrained(tmp_path / "hf")
    loaded = from_folder(pruned, tmp_path / "hf")
    assert torch.equal(outputs(loaded, inputs).logits, outputs(pruned, inputs).logits)


def test_t5_attention_keeps_no_stale_inner_dim() -> None:
    model, inputs = t5(T.T5EncoderModel)(), lm_inputs()
    pruned, _ = prune_structured(model, ratio=0.5, units="heads", example_inputs=inputs)
    attentions = [m for m in pruned.modules() if type(m).__name__ == "T5Attention"]
    assert len(attentions) == 2
    for m in attentions:
        assert (m.n_heads, m.inner_dim, m.q.out_features, m.o.in_features) == (2, 16, 16, 16)


# name: (build, units, per_layer, words the refusal must contain)
UNDESCRIBED: dict[str, tuple[Callable[[], nn.Module], list[str], dict[str, float], str]] = {
    "gpt2_heads": (gpt2, ["heads"], {}, "GPT2Config"),
    "distilbert_heads": (distilbert, ["heads", "neurons"], {}, "DistilBertConfig"),
    "bert_heads": (bert, ["heads"], {}, "BertConfig"),
    # one layer's MLP cut, the other's not: one intermediate_size cannot say both
    "llama_non_uniform": (decoder(T.LlamaForCausalLM, T.LlamaConfig), ["neurons"],
                          {"neurons model.layers.0.mlp": 0.5}, "LlamaConfig"),
}


@pytest.mark.parametrize("name", list(UNDESCRIBED))
def test_save_pretrained_refuses_where_the_config_cannot_describe_the_cut(
        name: str, tmp_path: Path) -> None:
    build, units, per_layer, words = UNDESCRIBED[name]
    model, inputs = build(), lm_inputs()
    pruned, change = prune_structured(model, ratio=0.0 if per_layer else 0.5, units=units,
                                      per_layer=per_layer, example_inputs=inputs)
    assert change.details["config_describes_model"] is False
    (reason,) = change.details["config_gaps"].values()
    assert words in reason and "in the pruned model but" in reason
    folder = tmp_path / "hf"
    with pytest.raises(LeanError) as error:
        pruned.save_pretrained(folder)
    assert words in str(error.value) and "leantorch.save" in str(error.value)
    assert not folder.exists()
    # the class is untouched: the original still saves
    model.save_pretrained(tmp_path / "original")
    assert (tmp_path / "original" / "config.json").exists()
    # a copy or a pickle refuses too, and so does the model leantorch.load rebuilds
    for twin in (copy.deepcopy(pruned), pickle.loads(pickle.dumps(pruned))):
        with pytest.raises(LeanError, match="cannot describe"):
            twin.save_pretrained(folder)
    loaded = leantorch.load(leantorch.save(pruned, tmp_path / "pruned.safetensors"))
    assert torch.equal(main_output(outputs(loaded, inputs)), main_output(outputs(pruned, inputs)))
    with pytest.raises(LeanError, match="cannot describe"):
        loaded.save_pretrained(folder)
    assert not folder.exists()


def test_described_cuts_reload_through_leantorch_with_their_config(tmp_path: Path) -> None:
    """leantorch.load replays the config values and the stale-attribute fixes (Mixtral's
    num_experts on the causal-LM wrapper) too."""
    model, inputs = mixtral(), lm_inputs()
    pruned, _ = prune_structured(model, ratio=0.5, units="experts", example_inputs=inputs)
    assert pruned.num_experts == 4
    loaded = leantorch.load(leantorch.save(pruned, tmp_path / "pruned.safetensors"))
    assert loaded.config.num_local_experts == 4 and loaded.num_experts == 4
    out, back = (outputs(m, inputs, output_router_logits=True) for m in (pruned, loaded))
    assert torch.equal(out.logits, back.logits) and torch.equal(out.aux_loss, back.aux_loss)
    loaded.save_pretrained(tmp_path / "hf")  # described: no refusal after the replay
    assert torch.equal(outputs(from_folder(loaded, tmp_path / "hf"), inputs).logits, out.logits)
