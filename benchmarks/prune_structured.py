"""Structured pruning against Torch-Pruning, and on the real MiniLM encoder.

Three sections, each writing ``benchmarks/results/prune_structured_<section>.json``:

- ``vision``: ResNet-50 and ViT-B/16 (transformers, random weights, 224x224, batch 1) pruned
  at 30% and 50% by leantorch (``prune.structured``) and by Torch-Pruning's ``MetaPruner``
  with the same importance (group L2 magnitude), the same ratio and the same units (ResNet:
  every channel group, classifier outputs kept; ViT: heads, MLP neurons and embedding width,
  head size kept). FLOPs are counted by leantorch.measure for all three models; latency is
  timed in one interleaved loop (original, leantorch, Torch-Pruning) on 2 threads.
- ``coverage``: GPT-2 (124M) and the 4-layer Llama from transformers: whether each library
  produces a pruned model that still runs, with its error when it does not.
- ``architectures``: every transformers architecture of the coverage table in
  docs/pruning_structured.md, built tiny from a config: which groups are cut (and exact),
  which are left alone and why, whether the config describes the pruned model
  (``save_pretrained`` + ``from_pretrained`` give the same outputs, or ``save_pretrained``
  refuses), and leantorch save/load; about a minute (not in the default sections).
- ``minilm``: the real all-MiniLM-L6-v2, 30% of its heads and MLP neurons pruned (first-order
  Taylor on calibration sentences), embedding fidelity on held-out sentences (mean cosine to
  the original embeddings, nearest-neighbour agreement) and paraphrase retrieval before and
  after a short MSE distillation (``leantorch.compress.finetune.distill``) on the calibration
  sentences, plus latency against the original.

    flock /tmp/leantorch-bench.lock .venv/bin/python benchmarks/prune_structured.py \\
        [--sections vision,coverage,minilm,architectures] [--rounds 8]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from _common import (
    error_text,
    interleaved_timings,
    machine_info,
    ratio,
    setup_threads,
    summarize,
    write_results,
)
from leantorch.compress.prune import prune_structured
from leantorch.measure import profile
from leantorch.models import load_model

RATIOS = (0.3, 0.5)
PEER_LIMIT_S = 180  # a peer attempt that runs longer is stopped and recorded as timed out


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def stop(_signum: int, _frame: Any) -> None:
        raise TimeoutError(f"stopped after {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def counts(model: torch.nn.Module, *args: Any, **kwargs: Any) -> dict[str, int]:
    report = profile(model, *args, input_kwargs=kwargs, latency=False, device_spec=None,
                     activations=False)
    return {"params": sum(p.numel() for p in model.parameters()), "flops": report.flops,
            "macs": report.macs}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --------------------------------------------------------------------------- vision
def vit_heads(model: torch.nn.Module) -> dict[torch.nn.Module, int]:
    heads = {}
    for module in model.modules():
        if hasattr(module, "q_proj") and hasattr(module, "num_attention_heads"):
            for proj in (module.q_proj, module.k_proj, module.v_proj):
                heads[proj] = module.num_attention_heads
    return heads


def torch_pruning(name: str, model: torch.nn.Module, x: torch.Tensor, ratio_: float
                  ) -> torch.nn.Module:
    """Torch-Pruning's documented MetaPruner usage for the model."""
    import torch_pruning as tp

    extra: dict[str, Any] = {}
    if name == "vit-b16":
        # heads are cut whole (head size kept), like leantorch's "heads" units
        extra = {"num_heads": vit_heads(model), "prune_num_heads": True,
                 "prune_head_dims": False, "head_pruning_ratio": ratio_}
    pruner = tp.pruner.MetaPruner(
        model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio_, ignored_layers=[model.classifier], **extra)
    pruner.step()
    return model


def vision(rounds: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, units in (("resnet50", ["channels"]), ("vit-b16", ["heads", "neurons", "width"])):
        loaded = load_model(name)
        original = loaded.model.eval()
        (x,), _ = loaded.example_inputs(1)
        base = counts(original, x)
        entry: dict[str, Any] = {"input": list(x.shape), "units": units, "original": base,
                                 "ratios": {}}
        for r in RATIOS:
            row: dict[str, Any] = {}
            models = {"original": original}
            start = time.perf_counter()
            ours, change = prune_structured(original, ratio=r, units=units, importance="l2",
                                            exclude=["classifier*"], example_inputs=x)
            row["leantorch"] = {"prune_s": round(time.perf_counter() - start, 2),
                                **counts(ours, x), "groups_cut": len(change.details["groups"])}
            models["leantorch"] = ours
            start = time.perf_counter()
            try:
                theirs = torch_pruning(name, copy.deepcopy(original), x, r)
                with torch.no_grad():
                    assert theirs(x).logits.shape == original(x).logits.shape
                row["torch_pruning"] = {"prune_s": round(time.perf_counter() - start, 2),
                                        **counts(theirs, x)}
                models["torch_pruning"] = theirs
            except Exception as error:  # record, do not hide, a peer that fails
                row["torch_pruning"] = {"error": error_text(error)}
            calls = {k: (lambda m=m, x=x: m(x)) for k, m in models.items()}
            with torch.no_grad():
                times = interleaved_timings(calls, warmup=2, rounds=rounds)
            row["latency"] = {k: summarize(v) for k, v in times.items()}
            medians = {k: row["latency"][k]["median_s"] for k in models}
            row["speedup"] = {k: ratio(medians["original"], medians[k]) for k in models
                              if k != "original"}
            row["flops_ratio"] = {k: ratio(row[k]["flops"], base["flops"]) for k in models
                                  if k != "original"}
            if "torch_pruning" in models:
                row["speedup_leantorch_over_torch_pruning"] = ratio(
                    medians["torch_pruning"], medians["leantorch"])
            row["load_average"] = load_average()
            entry["ratios"][str(r)] = row
            print(name, r, row["speedup"], row["flops_ratio"], flush=True)
        results[name] = entry
    return results


# --------------------------------------------------------------------------- coverage
def torch_pruning_text(model: torch.nn.Module, ids: torch.Tensor, ratio_: float,
                       help_it: bool) -> str:
    """Torch-Pruning on a transformers LM, the way its LLM example configures it (heads from
    the attention modules, the LM head ignored). ``help_it``: also turn the KV cache off and
    hand it the logits (its tracer cannot follow transformers' cache objects)."""
    import torch_pruning as tp

    extra: dict[str, Any] = {}
    if help_it:
        model.config.use_cache = False
        extra["output_transform"] = lambda out: out.logits

    heads: dict[torch.nn.Module, int] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        for proj, attr in (("q_proj", "num_attention_heads"), ("k_proj", "num_key_value_heads"),
                           ("v_proj", "num_key_value_heads"), ("c_attn", "num_attention_heads")):
            if hasattr(module, proj) and config is not None and hasattr(config, attr):
                heads[getattr(module, proj)] = getattr(config, attr)
    pruner = tp.pruner.MetaPruner(
        model, ids, importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio_, ignored_layers=[model.get_output_embeddings()], num_heads=heads,
        prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio_, **extra)
    pruner.step()
    return "pruned"


def coverage() -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in ("gpt2", "llama-tiny"):
        loaded = load_model(name)
        original = loaded.model.eval()
        _, kwargs = loaded.example_inputs(1, 32)
        ids = kwargs["input_ids"]
        with torch.no_grad():
            reference = original(input_ids=ids, use_cache=False).logits
        entry: dict[str, Any] = {"original": counts(original, input_ids=ids, use_cache=False)}
        try:
            ours, change = prune_structured(original, ratio=0.3, units=["heads", "neurons"],
                                            example_inputs={"input_ids": ids})
            with torch.no_grad():
                logits = ours(input_ids=ids, use_cache=False).logits
            import leantorch

            with tempfile.TemporaryDirectory() as folder:
                loaded_back = leantorch.load(leantorch.save(ours, f"{folder}/m.safetensors"))
                with torch.no_grad():
                    same = torch.equal(loaded_back(input_ids=ids, use_cache=False).logits,
                                       logits)
            entry["leantorch"] = {"status": "ok", **counts(ours, input_ids=ids, use_cache=False),
                                  "groups_cut": len(change.details["groups"]),
                                  "logits_shape_kept": logits.shape == reference.shape,
                                  "save_load_bit_exact": same,
                                  "config": change.details["config"]}
        except Exception as error:
            entry["leantorch"] = {"status": "error", "error": error_text(error)}
        for label, help_it in (("torch_pruning", False), ("torch_pruning_no_cache", True)):
            theirs = copy.deepcopy(original)
            start = time.perf_counter()
            try:
                with time_limit(PEER_LIMIT_S):
                    torch_pruning_text(theirs, ids, 0.3, help_it)
                with torch.no_grad():
                    logits = theirs(input_ids=ids, use_cache=False).logits
                after = counts(theirs, input_ids=ids, use_cache=False)
                status = "ok" if logits.shape == reference.shape else "wrong output shape"
                if after["params"] == entry["original"]["params"]:
                    status = "ran, but removed nothing"
                entry[label] = {"status": status,
                                "prune_s": round(time.perf_counter() - start, 1), **after}
            except Exception as error:
                entry[label] = {"status": "error", "error": error_text(error),
                                "after_s": round(time.perf_counter() - start, 1)}
        results[name] = entry
        print(name, {k: v.get("status") for k, v in entry.items() if isinstance(v, dict)},
              flush=True)
    return results


# --------------------------------------------------------------------------- architectures
def tiny_transformers() -> dict[str, tuple[Any, dict[str, torch.Tensor]]]:
    """Every transformers architecture the coverage table lists, built tiny from a config
    (random weights) with its example inputs."""
    import transformers as T

    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    text = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    image = {"pixel_values": torch.randn(1, 3, 32, 32,
                                         generator=torch.Generator().manual_seed(0))}
    lm = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "intermediate_size": 48, "vocab_size": 100}
    t5 = T.T5Config(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, vocab_size=100)
    return {
        "BERT": (lambda: T.BertModel(T.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            vocab_size=100)), text),
        "DistilBERT": (lambda: T.DistilBertModel(T.DistilBertConfig(
            dim=32, n_layers=2, n_heads=4, hidden_dim=48, vocab_size=100)), text),
        "GPT-2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)), text),
        "Llama": (lambda: T.LlamaForCausalLM(T.LlamaConfig(**lm)), text),
        "Qwen2": (lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**lm)), text),
        "Mistral": (lambda: T.MistralForCausalLM(T.MistralConfig(**lm)), text),
        "Mixtral": (lambda: T.MixtralForCausalLM(T.MixtralConfig(
            **lm, num_local_experts=8, num_experts_per_tok=2)), text),
        "OLMoE": (lambda: T.OlmoeForCausalLM(T.OlmoeConfig(
            **lm, num_experts=8, num_experts_per_tok=2)), text),
        "T5": (lambda: T.T5ForConditionalGeneration(t5),
               {**text, "decoder_input_ids": ids[:, :6]}),
        "ViT": (lambda: T.ViTForImageClassification(T.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            image_size=32, patch_size=8, num_labels=10)), image),
        "Swin": (lambda: T.SwinForImageClassification(T.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
            window_size=4, num_labels=10)), image),
        "ConvNeXt": (lambda: T.ConvNextForImageClassification(T.ConvNextConfig(
            num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10)), image),
        "ResNet": (lambda: T.ResNetForImageClassification(T.ResNetConfig(
            embedding_size=8, hidden_sizes=[16, 32], depths=[1, 2], num_labels=10)), image),
        "MobileNetV2": (lambda: T.MobileNetV2ForImageClassification(T.MobileNetV2Config(
            image_size=32, depth_multiplier=0.5, num_labels=10)), image),
    }


def main_output(out: Any) -> torch.Tensor:
    for attr in ("logits", "last_hidden_state"):
        if getattr(out, attr, None) is not None:
            return getattr(out, attr)
    return out[0]


def prune_and_reload(model: torch.nn.Module, inputs: dict[str, torch.Tensor],
                     units: list[str]) -> dict[str, Any]:
    """Cut half of ``units``; then save_pretrained + from_pretrained (local folder) and
    leantorch.save/load, each compared with the pruned model's output."""
    import leantorch
    from leantorch.errors import LeanError

    entry: dict[str, Any] = {"units": units}
    try:
        pruned, change = prune_structured(model, ratio=0.5, units=units,
                                          example_inputs=inputs)
    except Exception as error:
        return {**entry, "status": "error", "error": error_text(error)}
    pruned.eval()
    cut: dict[str, list[int]] = {}
    for group in change.details["groups"].values():
        kind = cut.setdefault(group["kind"], [0, 0])
        kind[0] += 1
        kind[1] += int(group["exact"])
    reasons = sorted({r for r in change.skipped.values()})
    with torch.no_grad():
        reference = main_output(pruned(**inputs))
    entry.update({"status": "ok", "params": [change.before.params, change.after.params],
                  "groups_cut": {k: {"groups": v[0], "exact": v[1]} for k, v in cut.items()},
                  "skipped_groups": len(change.skipped), "skipped_reasons": reasons[:4],
                  "config": change.details["config"],
                  "config_describes_model": change.details.get("config_describes_model")})
    with tempfile.TemporaryDirectory() as folder:
        try:
            pruned.save_pretrained(f"{folder}/hf")
            loaded = type(pruned).from_pretrained(f"{folder}/hf", local_files_only=True).eval()
            with torch.no_grad():
                diff = (main_output(loaded(**inputs)) - reference).abs().max().item()
            entry["save_pretrained"] = {"status": "round-trips", "max_abs_diff": diff}
        except LeanError as error:
            entry["save_pretrained"] = {"status": "refused", "reason": error_text(error, 300)}
        except Exception as error:
            entry["save_pretrained"] = {"status": "error", "error": error_text(error)}
        try:
            back = leantorch.load(leantorch.save(pruned, f"{folder}/m.safetensors"))
            with torch.no_grad():
                entry["leantorch_save_load_bit_exact"] = torch.equal(
                    main_output(back(**inputs)), reference)
        except Exception as error:
            entry["leantorch_save_load_bit_exact"] = error_text(error)
    return entry


def architectures() -> dict[str, Any]:
    """Coverage of transformers architectures (tiny, from configs): what prunes, whether the
    config describes the result. Heads are cut together with the rest; where the config then
    cannot describe the model, the same cut without heads is tried too."""
    results: dict[str, Any] = {}
    for name, (build, inputs) in tiny_transformers().items():
        torch.manual_seed(0)
        model = build().eval()
        units = ["channels", "heads", "kv_heads", "neurons", "experts"]
        entry = {"all_but_width": prune_and_reload(model, inputs, units)}
        first = entry["all_but_width"]
        if first.get("config_describes_model") is False and \
                {"heads", "kv_heads"} & set(first.get("groups_cut", {})):
            entry["without_heads"] = prune_and_reload(
                model, inputs, ["channels", "neurons", "experts"])
        results[name] = entry
        print(name, {k: (v["status"], v.get("save_pretrained", {}).get("status"))
                     for k, v in entry.items()}, flush=True)
    return results


# --------------------------------------------------------------------------- minilm
def embed(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**b) for b in batches])


def fidelity(original: torch.nn.Module, pruned: torch.nn.Module,
             evaluation: list[dict[str, torch.Tensor]],
             pairs: tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]
             ) -> dict[str, float]:
    a, b = embed(original, evaluation), embed(pruned, evaluation)
    cosine = F.cosine_similarity(a, b, dim=-1)

    def nearest(x: torch.Tensor) -> torch.Tensor:
        sim = F.normalize(x, dim=-1) @ F.normalize(x, dim=-1).T
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(1)

    queries_a, keys_a = embed(original, pairs[0]), embed(original, pairs[1])
    queries_b, keys_b = embed(pruned, pairs[0]), embed(pruned, pairs[1])
    top_a = (queries_a @ keys_a.T).argmax(1)
    top_b = (queries_b @ keys_b.T).argmax(1)
    truth = torch.arange(len(top_a))
    return {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
            "neighbour_agreement": float((nearest(a) == nearest(b)).float().mean()),
            "paraphrase_retrieval_agreement": float((top_a == top_b).float().mean()),
            "paraphrase_top1": float((top_b == truth).float().mean()),
            "paraphrase_top1_original": float((top_a == truth).float().mean())}


def minilm(rounds: int, finetune_steps: int) -> dict[str, Any]:
    from leantorch.compress.finetune import distill
    from leantorch.data import paraphrase_pairs, sentences, split

    loaded = load_model("minilm")
    original = loaded.model.eval()
    calibration_texts, evaluation_texts = split(sentences(), holdout=0.25)
    calibration = loaded.batches(calibration_texts[:256], 32, 64)
    evaluation = loaded.batches(evaluation_texts, 32, 64, seed=1)
    pairs = paraphrase_pairs()
    pair_batches = (loaded.batches([p[0] for p in pairs], 50, 64),
                    loaded.batches([p[1] for p in pairs], 50, 64))
    example = evaluation[0]
    result: dict[str, Any] = {"calibration_sentences": sum(len(b["input_ids"]) for b in
                                                          calibration),
                              "evaluation_sentences": len(evaluation_texts),
                              "paraphrase_pairs": len(pairs),
                              "original": counts(original, **example)}
    for importance in ("taylor", "l2"):
        start = time.perf_counter()
        pruned, change = prune_structured(original, ratio=0.3, units=["heads", "neurons"],
                                          importance=importance, calibration=calibration,
                                          example_inputs=example)
        row: dict[str, Any] = {"prune_s": round(time.perf_counter() - start, 2),
                               **counts(pruned, **example),
                               "config": change.details["config"],
                               "before_finetune": fidelity(original, pruned, evaluation,
                                                           pair_batches)}
        start = time.perf_counter()
        losses = distill(pruned, original, calibration, steps=finetune_steps, lr=2e-4,
                         loss="mse")
        row["finetune"] = {"steps": finetune_steps, "lr": 2e-4, "loss": "mse",
                           "utility": "leantorch.compress.finetune.distill",
                           "seconds": round(time.perf_counter() - start, 1),
                           "first_loss": losses[0] if losses else None,
                           "last_loss": losses[-1] if losses else None}
        row["after_finetune"] = fidelity(original, pruned.eval(), evaluation, pair_batches)
        result[importance] = row
        print("minilm", importance, row["before_finetune"]["cosine_mean"],
              row["after_finetune"]["cosine_mean"], flush=True)
        if importance == "taylor":
            fast = pruned
    calls = {"original": lambda: original(**example), "pruned_taylor": lambda: fast(**example)}
    with torch.no_grad():
        times = interleaved_timings(calls, warmup=2, rounds=rounds)
    result["latency"] = {k: summarize(v) for k, v in times.items()}
    result["latency_batch"] = list(example["input_ids"].shape)
    result["speedup"] = ratio(result["latency"]["original"]["median_s"],
                              result["latency"]["pruned_taylor"]["median_s"])
    result["load_average"] = load_average()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="vision,coverage,minilm")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--finetune-steps", type=int, default=150)
    args = parser.parse_args()
    threads = setup_threads()
    torch.manual_seed(0)
    for section in args.sections.split(","):
        start, load_start = time.perf_counter(), load_average()
        if section == "vision":
            payload = vision(args.rounds)
        elif section == "coverage":
            payload = coverage()
        elif section == "minilm":
            payload = minilm(args.rounds, args.finetune_steps)
        elif section == "architectures":
            payload = architectures()
        else:
            raise SystemExit(f"unknown section {section!r}: vision, coverage, minilm, "
                             "architectures")
        path = write_results(f"prune_structured_{section}", {
            "benchmark": f"prune_structured --sections {section}",
            "threads": threads, "rounds": args.rounds,
            "load_average_start": load_start, "load_average_end": load_average(),
            "seconds": round(time.perf_counter() - start, 1),
            "machine": machine_info(), "results": payload})
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
