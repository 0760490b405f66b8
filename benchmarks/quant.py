"""Quantization: latency and fidelity of leantorch's quantization transforms against
``torch.ao.quantization.quantize_dynamic`` and torchao, side by side in one process.

Models (CPU, 2 threads, eval, ``torch.no_grad``):

* ``minilm``: the real all-MiniLM-L6-v2 sentence encoder on 32 passages of 128 tokens (bundled
  sentences joined until a passage fills 128 tokens). Fidelity: cosine similarity of each
  variant's sentence embeddings to the float32 model's, on those passages and on all 600
  bundled sentences (batches of 32, padded per batch).
* ``bert-base``: bert-base shapes with random weights (``load_model("bert-base")``) on 8 x 128
  random tokens. Fidelity: cosine similarity of the last hidden states, per token.

Variants: float32; leantorch ``quant.int8_dynamic``, ``quant.llm_int8`` (threshold 6.0),
``quant.int8_weight`` (per channel), ``quant.int4_weight`` (groups of 128 and of 32,
asymmetric), the QAT
fake-quant model (``quant.fake``, int8_dynamic scheme) and a post-training ternary model
(``quant.fake`` ternary + ``quant.convert``, no QAT: it shows the cost, its fidelity needs
quantization-aware training); torch.ao ``quantize_dynamic`` (Linear, qint8) with the default
``x86`` engine and with ``onednn``; torchao ``Int8DynamicActivationInt8WeightConfig``,
``Int8WeightOnlyConfig`` and ``Int4WeightOnlyConfig`` where they run on this CPU (the reason is
recorded where they do not).

All variants of a model are timed interleaved after a warm-up (``_common.interleaved_timings``);
medians and speedups over float32 are reported, with the spread (median, quartiles) of the
per-round ratio; ``--repeat N`` reruns the whole timed comparison N times and records the spread
of each speedup across the runs. A second measurement takes each variant's CPU
time with one intra-op thread: on a shared 2-core machine a parallel op waits for the other
thread's time slice (about 4 ms per op here when anything else runs), which penalises
implementations made of many small ops; CPU time is immune to that and compares the work done. A ``kernel_probe`` times single layers of
MiniLM's FFN shape: the integer matmul alone, leantorch's int8 layer, torch's packed weight-only
kernels against dequantize-then-matmul.

torchao is a peer only: it lives apart from the project's environment, in
``.venv/torchao-peer`` (``.venv/bin/pip install --no-deps --target .venv/torchao-peer
torchao==0.18.0``), because transformers imports torchao whenever it can find it, which costs
every process that builds a transformers model 3.4 s and a screen of warnings here. This script
adds that folder to ``sys.path``; without it the torchao rows say why they did not run.

Run from the repository root, one benchmark at a time:
``flock /tmp/leantorch-bench.lock .venv/bin/python benchmarks/quant.py``.
Writes ``benchmarks/results/quant.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from _common import (
    THREADS,
    add_repeat_option,
    error_text,
    interleaved_timings,
    machine_info,
    ratio,
    repeated_timings,
    setup_threads,
    summarize,
    write_results,
)
from leantorch.compress.quant import (
    LLMInt8Linear,
    convert,
    fake_quantize,
    int4_weight,
    int8_dynamic,
    int8_weight,
    llm_int8,
)

warnings.filterwarnings("ignore")  # torch.ao's deprecation notices; torchao's registration noise
TORCHAO_DIR = Path(__file__).resolve().parents[1] / ".venv" / "torchao-peer"
if TORCHAO_DIR.is_dir():
    sys.path.append(str(TORCHAO_DIR))

Forward = Callable[[], torch.Tensor]


# --------------------------------------------------------------------------- peers
def torch_ao_dynamic(model: nn.Module, engine: str) -> nn.Module:
    """torch.ao.quantization.quantize_dynamic on Linear layers with ``engine``."""
    torch.backends.quantized.engine = engine
    return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear},
                                                  dtype=torch.qint8)


def torchao_quantized(model: nn.Module, config_name: str) -> nn.Module:
    """torchao.quantization.quantize_ with the named config (on a copy)."""
    with contextlib.redirect_stderr(io.StringIO()):  # torchao prints CUDA-extension warnings
        import torchao.quantization as ao
    config = getattr(ao, config_name)()
    quantized = copy.deepcopy(model)
    ao.quantize_(quantized, config)
    return quantized


def torchao_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("torchao")
    except Exception:
        return None


# --------------------------------------------------------------------------- variants
def build_variants(model: nn.Module, with_qat: bool) -> tuple[dict[str, dict[str, Any]],
                                                               dict[str, str]]:
    """name -> {"model", "engine", "by", "what"}; and name -> why it could not be built."""
    variants: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}

    def add(name: str, by: str, what: str, make: Callable[[], nn.Module],
            engine: str | None = None) -> None:
        try:
            variants[name] = {"model": make().eval(), "engine": engine, "by": by, "what": what}
        except Exception as error:  # a peer that does not run here: say why, keep going
            failed[name] = error_text(error)

    add("fp32", "torch", "float32 model", lambda: model)
    add("leantorch int8_dynamic", "leantorch",
        "quant.int8_dynamic: int8 per-channel weights x int8 per-token activations, "
        "torch._int_mm", lambda: int8_dynamic(model)[0])
    add("leantorch llm_int8", "leantorch",
        "quant.llm_int8 (threshold 6.0): outlier input features in float, the rest int8",
        lambda: llm_int8(model)[0])
    add("leantorch int8_weight", "leantorch",
        "quant.int8_weight: int8 per-channel weights, float activations (dequantize + matmul)",
        lambda: int8_weight(model)[0])
    add("leantorch int4_weight", "leantorch",
        "quant.int4_weight: int4 weights, group 128, asymmetric, float activations",
        lambda: int4_weight(model)[0])
    add("leantorch int4_weight g32", "leantorch",
        "quant.int4_weight group_size=32 (the int4-weight recipe's choice)",
        lambda: int4_weight(model, group_size=32)[0])
    if with_qat:
        add("leantorch fake int8_dynamic (QAT)", "leantorch",
            "quant.fake scheme=int8_dynamic: the fake-quant training model (float matmuls)",
            lambda: fake_quantize(model, scheme="int8_dynamic")[0])
        add("leantorch ternary (post-training)", "leantorch",
            "quant.fake scheme=ternary + quant.convert without fine-tuning: BitNet b1.58 "
            "weights need QAT; shown for cost",
            lambda: convert(fake_quantize(model, scheme="ternary")[0])[0])
    add("torch.ao quantize_dynamic (x86)", "torch.ao",
        "torch.ao.quantization.quantize_dynamic, engine x86 (the default): per-tensor "
        "activations", lambda: torch_ao_dynamic(model, "x86"), engine="x86")
    add("torch.ao quantize_dynamic (onednn)", "torch.ao",
        "torch.ao.quantization.quantize_dynamic, engine onednn: per-tensor activations",
        lambda: torch_ao_dynamic(model, "onednn"), engine="onednn")
    for config, label in (("Int8DynamicActivationInt8WeightConfig", "torchao int8_dynamic"),
                          ("Int8WeightOnlyConfig", "torchao int8_weight"),
                          ("Int4WeightOnlyConfig", "torchao int4_weight")):
        add(label, "torchao", f"torchao.quantization.quantize_({config}())",
            lambda config=config: torchao_quantized(model, config))
    torch.backends.quantized.engine = "x86"
    return variants, failed


def forward_fn(entry: dict[str, Any], inputs: dict[str, torch.Tensor],
               output: Callable[[Any], torch.Tensor]) -> Forward:
    model, engine = entry["model"], entry["engine"]

    def run() -> torch.Tensor:
        if engine is not None:
            torch.backends.quantized.engine = engine
        with torch.no_grad():
            result = output(model(**inputs))
        if engine is not None:
            torch.backends.quantized.engine = "x86"
        return result

    return run


def cosine_stats(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Cosine similarity of matching rows (last dim), mean and min."""
    cos = F.cosine_similarity(a.double().flatten(0, -2), b.double().flatten(0, -2), dim=-1)
    return {"mean": round(cos.mean().item(), 6), "min": round(cos.min().item(), 6)}


def int8_fraction(model: nn.Module) -> float | None:
    layers = [m for m in model.modules() if isinstance(m, LLMInt8Linear)]
    seen = sum(m.columns_seen for m in layers)
    return None if not seen else 1 - sum(m.outlier_columns_seen for m in layers) / seen


def reset_llm_int8(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, LLMInt8Linear):
            module.reset_statistics()


# --------------------------------------------------------------------------- models
def minilm_inputs(batch: int, seq_len: int) -> tuple[dict[str, torch.Tensor],
                                                     list[dict[str, torch.Tensor]]]:
    """(timed batch: ``batch`` passages of exactly ``seq_len`` tokens, all 600 sentences in
    batches of 32)."""
    from leantorch.data import sentences
    from leantorch.models import minilm_tokenizer

    tokenizer = minilm_tokenizer()
    texts = sentences()
    passages, start = [], 0
    for _ in range(batch):
        words: list[str] = []
        while len(tokenizer(" ".join(words))["input_ids"]) < seq_len + 2:
            words.append(texts[start % len(texts)])
            start += 1
        passages.append(" ".join(words))
    timed = dict(tokenizer(passages, padding="max_length", truncation=True, max_length=seq_len,
                           return_tensors="pt"))
    assert bool(timed["attention_mask"].all()), "every passage fills the sequence"
    sentence_batches = [dict(tokenizer(texts[i:i + 32], padding=True, truncation=True,
                                       max_length=seq_len, return_tensors="pt"))
                        for i in range(0, len(texts), 32)]
    return timed, sentence_batches


def single_thread_cpu_times(fns: dict[str, Forward], rounds: int) -> dict[str, float]:
    """Median CPU seconds of each function with one intra-op thread (interleaved, after one
    warm-up call each). CPU time leaves out the time a process waits for a core, so unlike the
    2-thread wall time it does not depend on what else runs on the machine: it compares the
    work each variant does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for fn in fns.values():
            fn()
        samples: dict[str, list[float]] = {key: [] for key in fns}
        names = list(fns)
        for index in range(rounds):
            shift = index % len(names)
            for key in names[shift:] + names[:shift]:
                start = time.thread_time()
                fns[key]()
                samples[key].append(time.thread_time() - start)
    finally:
        torch.set_num_threads(threads)
    return {key: sorted(v)[len(v) // 2] for key, v in samples.items()}


def run_model(name: str, model: nn.Module, timed: dict[str, torch.Tensor],
              extra: list[dict[str, torch.Tensor]], output: Callable[[Any], torch.Tensor],
              with_qat: bool, warmup: int, rounds: int, cpu_rounds: int,
              repeat: int = 1) -> dict[str, Any]:
    started = time.perf_counter()
    variants, failed = build_variants(model, with_qat)
    fns = {key: forward_fn(entry, timed, output) for key, entry in variants.items()}
    reference = fns["fp32"]()
    extra_reference = torch.cat([forward_fn(variants["fp32"], batch, output)()
                                 for batch in extra]) if extra else None
    fidelity: dict[str, Any] = {}
    fractions: dict[str, float | None] = {}
    for key, entry in variants.items():
        reset_llm_int8(entry["model"])
        result = fns[key]()
        fidelity[key] = {"timed_batch": cosine_stats(result, reference)}
        if key == "leantorch llm_int8":
            fractions["timed_batch"] = int8_fraction(entry["model"])
        if extra:
            reset_llm_int8(entry["model"])
            outs = [forward_fn(entry, batch, output)() for batch in extra]
            fidelity[key]["sentences"] = cosine_stats(torch.cat(outs), extra_reference)
            if key == "leantorch llm_int8":
                fractions["sentences"] = int8_fraction(entry["model"])
    times, spread = repeated_timings(fns, "fp32", warmup, rounds, repeat)
    stats = {key: summarize(samples) for key, samples in times.items()}
    cpu = single_thread_cpu_times(fns, rounds=cpu_rounds) if cpu_rounds else {}
    base = stats["fp32"]["median_s"]
    rows = {}
    for key, entry in variants.items():
        median = stats[key]["median_s"]
        rows[key] = {
            "by": entry["by"],
            "what": entry["what"],
            "median_ms": round(median * 1e3, 2),
            "speedup_vs_fp32": ratio(base, median, 3),
            "speedup_vs_fp32_per_round": spread["per_round"][key],
            "cosine": fidelity[key],
            "timings": stats[key],
        }
        if spread["across_repeats"]:
            rows[key]["speedup_vs_fp32_repeats"] = spread["across_repeats"][key]
        if cpu:
            rows[key]["cpu_ms_1_thread"] = round(cpu[key] * 1e3, 2)
            rows[key]["cpu_speedup_vs_fp32_1_thread"] = ratio(cpu["fp32"], cpu[key], 3)
    primary = "sentences" if extra else "timed_batch"
    ours = rows["leantorch int8_dynamic"]
    peers = {k: r for k, r in rows.items() if r["by"] in ("torch.ao", "torchao")}
    fastest = max(peers, key=lambda k: peers[k]["speedup_vs_fp32"]) if peers else None
    target = {
        "rule": "leantorch int8_dynamic at least as fast as the fastest peer, with mean cosine "
                f">= 0.99 to fp32 ({primary})",
        "leantorch_speedup": ours["speedup_vs_fp32"],
        "leantorch_cosine_mean": ours["cosine"][primary]["mean"],
        "fastest_peer": fastest,
        "fastest_peer_speedup": None if fastest is None else peers[fastest]["speedup_vs_fp32"],
        "fastest_peer_cosine_mean": None if fastest is None else
        peers[fastest]["cosine"][primary]["mean"],
    }
    faithful = {k: r for k, r in peers.items() if r["cosine"][primary]["mean"] >= 0.99}
    fastest_faithful = max(faithful, key=lambda k: faithful[k]["speedup_vs_fp32"]) \
        if faithful else None
    target["fastest_peer_with_cosine_0.99"] = fastest_faithful
    target["fastest_peer_with_cosine_0.99_speedup"] = None if fastest_faithful is None else \
        faithful[fastest_faithful]["speedup_vs_fp32"]
    target["speed_met"] = fastest is None or \
        target["leantorch_speedup"] >= target["fastest_peer_speedup"]
    target["fidelity_met"] = target["leantorch_cosine_mean"] >= 0.99
    target["met"] = target["speed_met"] and target["fidelity_met"]
    if cpu:
        fastest_cpu = max(peers, key=lambda k: peers[k]["cpu_speedup_vs_fp32_1_thread"]) \
            if peers else None
        target["cpu_1_thread"] = {
            "leantorch_speedup": ours["cpu_speedup_vs_fp32_1_thread"],
            "fastest_peer": fastest_cpu,
            "fastest_peer_speedup": None if fastest_cpu is None else
            peers[fastest_cpu]["cpu_speedup_vs_fp32_1_thread"],
        }
    print(f"\n{name}: fp32 {base * 1e3:.1f} ms")
    for key, row in rows.items():
        cos = row["cosine"][primary]
        extra_cpu = (f"  | 1 thread CPU {row['cpu_ms_1_thread']:8.1f} ms "
                     f"{row['cpu_speedup_vs_fp32_1_thread']:5.2f}x" if cpu else "")
        per_round = row["speedup_vs_fp32_per_round"]
        repeats = row.get("speedup_vs_fp32_repeats")
        spread_text = f"[{per_round['q1']:.2f}-{per_round['q3']:.2f}]" + (
            f" runs {repeats['min']:.2f}-{repeats['max']:.2f}" if repeats else "")
        print(f"  {key:38s} {row['median_ms']:9.1f} ms  {per_round['median']:5.2f}x "
              f"{spread_text}  cos mean {cos['mean']:.4f} min {cos['min']:.4f}{extra_cpu}")
    for key, why in failed.items():
        print(f"  {key:38s} not run: {why[:120]}")
    return {
        "model": name,
        "inputs": {k: list(v.shape) for k, v in timed.items()},
        "repeats": repeat,
        "fidelity_measured_on": primary,
        "variants": rows,
        "not_run": failed,
        "llm_int8_fraction_in_8_bit": fractions,
        "target": target,
        "seconds": round(time.perf_counter() - started, 1),
    }


def minilm_case(warmup: int, rounds: int, cpu_rounds: int, batch: int,
                seq_len: int, repeat: int = 1) -> dict[str, Any]:
    from leantorch.models import load_minilm

    timed, sentences = minilm_inputs(batch, seq_len)
    return run_model("minilm", load_minilm(), timed, sentences, lambda out: out, True,
                     warmup, rounds, cpu_rounds, repeat)


def bert_case(warmup: int, rounds: int, cpu_rounds: int, batch: int,
              seq_len: int, repeat: int = 1) -> dict[str, Any]:
    from leantorch.models import load_model

    loaded = load_model("bert-base")
    _, kwargs = loaded.example_inputs(batch=batch, seq_len=seq_len)
    return run_model("bert-base", loaded.model.eval(), kwargs, [],
                     lambda out: out.last_hidden_state, False, warmup, rounds, cpu_rounds,
                     repeat)


# --------------------------------------------------------------------------- kernels
def kernel_probe(rounds: int) -> dict[str, Any]:
    """One Linear of MiniLM's FFN shape (384 -> 1536) at a few token counts: float32, the
    integer matmul alone, leantorch's int8 layers, and torch's packed weight-only kernels
    against leantorch's dequantize-then-matmul."""
    from leantorch.compress.quant import Int8DynamicLinear, WeightOnlyLinear
    from leantorch.ops.quant import naive

    torch.manual_seed(0)
    k, n = 384, 1536
    linear = nn.Linear(k, n).eval()
    int8_layer = Int8DynamicLinear.from_linear(linear)
    int8_weight_layer = WeightOnlyLinear.from_linear(linear, 8)
    int4_layer = WeightOnlyLinear.from_linear(linear, 4, 128, symmetric=False)
    codes, scale, _ = naive.quantize_groupwise(linear.weight.detach(), 8, k)
    scale = scale.squeeze(1)
    results: dict[str, Any] = {"shape": {"in_features": k, "out_features": n}, "tokens": {}}
    int4_packed = None
    with contextlib.suppress(Exception):  # torch's int4 CPU packing: uint4 codes as int32
        unsigned = naive.quantize_groupwise(linear.weight.detach(), 4, 128, False)[0]
        int4_packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            unsigned.to(torch.int32), 1)
        int4_scales = torch.randn(k // 128, n, 2)  # layout only: timing, not values
    dyn4 = None
    with contextlib.suppress(Exception):  # int8 activations x int4 weights (KleidiAI on Arm)
        nibbles = torch.randint(0, 16, (n, k), dtype=torch.uint8)
        dyn4 = torch.ops.aten._dyn_quant_pack_4bit_weight(
            (nibbles[:, ::2] | (nibbles[:, 1::2] << 4)).contiguous(), torch.rand(n, k // 128),
            None, 128, k, n)
    for tokens in (1, 32, 4096):
        x = torch.randn(tokens, k)
        q = torch.randint(-127, 128, (tokens, k), dtype=torch.int8)
        fns: dict[str, Forward] = {
            "fp32 F.linear": lambda x=x: F.linear(x, linear.weight, linear.bias),
            "torch._int_mm alone": lambda q=q: torch._int_mm(q, codes.t()),
            "leantorch Int8DynamicLinear": lambda x=x: int8_layer(x),
            "leantorch WeightOnlyLinear int8": lambda x=x: int8_weight_layer(x),
            "leantorch WeightOnlyLinear int4": lambda x=x: int4_layer(x),
        }
        if tokens <= 32:  # these take 1-3 s each at 4096 tokens here
            fns["torch _weight_int8pack_mm"] = \
                lambda x=x: torch.ops.aten._weight_int8pack_mm(x, codes, scale)
            if dyn4 is not None:
                fns["torch _dyn_quant_matmul_4bit (int8 act x int4)"] = \
                    lambda x=x: torch.ops.aten._dyn_quant_matmul_4bit(x, dyn4, 128, k, n)
            if int4_packed is not None:
                fns["torch _weight_int4pack_mm_for_cpu (fp32)"] = \
                    lambda x=x: torch.ops.aten._weight_int4pack_mm_for_cpu(
                        x, int4_packed, 128, int4_scales)
        if int4_packed is not None:
            xb, sb = x.bfloat16(), int4_scales.bfloat16()
            fns["torch _weight_int4pack_mm_for_cpu (bf16)"] = \
                lambda xb=xb, sb=sb: torch.ops.aten._weight_int4pack_mm_for_cpu(
                    xb, int4_packed, 128, sb)
        with torch.no_grad():
            times = interleaved_timings(fns, warmup=2, rounds=rounds)
        results["tokens"][str(tokens)] = {key: round(summarize(v)["median_s"] * 1e3, 4)
                                          for key, v in times.items()}
    results["not_timed_at_4096_tokens"] = (
        "_weight_int8pack_mm, _weight_int4pack_mm_for_cpu with float32 input and "
        "_dyn_quant_matmul_4bit: 1 to 3 s per call at 4096 tokens on this CPU")
    return results


def _layer_probe_shape(k: int, n: int, tokens: int, rounds: int) -> dict[str, float]:
    from leantorch.compress.quant import Int8DynamicLinear
    from leantorch.ops.quant.int8 import int8_scaled_matmul, quantize_per_token_fast

    torch.manual_seed(0)
    linear = nn.Linear(k, n).eval()
    layer = Int8DynamicLinear.from_linear(linear)
    x = torch.randn(tokens, k)
    q, _ = quantize_per_token_fast(x)
    peers = {engine: torch_ao_dynamic(nn.Sequential(linear), engine)
             for engine in ("x86", "onednn")}

    def ao(engine: str) -> torch.Tensor:
        torch.backends.quantized.engine = engine
        out = peers[engine](x)
        torch.backends.quantized.engine = "x86"
        return out

    fns: dict[str, Forward] = {
        "fp32 F.linear": lambda: F.linear(x, linear.weight, linear.bias),
        "leantorch Int8DynamicLinear": lambda: layer(x),
        "  its per-token quantization": lambda: quantize_per_token_fast(x)[0],
        "  its int8 GEMM (oneDNN, weight scales fused)":
            lambda: int8_scaled_matmul(q, layer.weight, layer.weight_scale),
        "  torch._int_mm instead, alone": lambda: torch._int_mm(q, layer.weight.t()),
        "torch.ao quantize_dynamic Linear (x86)": lambda: ao("x86"),
        "torch.ao quantize_dynamic Linear (onednn)": lambda: ao("onednn"),
    }
    with torch.no_grad():
        cpu = single_thread_cpu_times(fns, rounds)
    return {key: round(v * 1e3, 3) for key, v in cpu.items()}


def layer_probe(rounds: int, tokens: int = 4096) -> dict[str, Any]:
    """Where an int8 dynamic layer's time goes, against torch.ao's: one thread's CPU time for
    MiniLM's two FFN shapes at ``tokens`` rows (32 x 128)."""
    results: dict[str, Any] = {"tokens": tokens,
                               "unit": "ms of CPU time, one intra-op thread, median"}
    for k, n in ((384, 1536), (1536, 384)):
        results[f"{k}->{n}"] = _layer_probe_shape(k, n, tokens, rounds)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="timed interleaved rounds")
    parser.add_argument("--cpu-rounds", type=int, default=3,
                        help="rounds of the 1-thread CPU-time measurement (0: skip it)")
    parser.add_argument("--probe-rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=32, help="MiniLM passages")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--bert-batch", type=int, default=8)
    parser.add_argument("--skip", nargs="*", default=[], choices=["probe", "minilm", "bert"])
    add_repeat_option(parser)
    options = parser.parse_args(argv)
    threads = setup_threads(THREADS)
    started = time.perf_counter()
    load_before = list(os.getloadavg())
    payload: dict[str, Any] = {
        "benchmark": "quant",
        "description": __doc__.split("\n\n")[0],
        "threads": threads,
        "warmup": options.warmup,
        "rounds": options.rounds,
        "repeat": options.repeat,
        "machine": machine_info(),
        "torchao": torchao_version(),
        "torchao_location": str(TORCHAO_DIR.relative_to(TORCHAO_DIR.parents[1]))
        if TORCHAO_DIR.is_dir() else None,
        "load_average_before": load_before,
    }
    if "probe" not in options.skip:
        payload["kernel_probe"] = kernel_probe(options.probe_rounds)
        payload["layer_probe_cpu_1_thread"] = layer_probe(options.probe_rounds)
    if "minilm" not in options.skip:
        payload["minilm"] = minilm_case(options.warmup, options.rounds, options.cpu_rounds,
                                        options.batch, options.seq_len, options.repeat)
    if "bert" not in options.skip:
        payload["bert-base"] = bert_case(options.warmup, options.rounds, options.cpu_rounds,
                                         options.bert_batch, options.seq_len, options.repeat)
    payload["load_average_after"] = list(os.getloadavg())
    payload["script_seconds"] = round(time.perf_counter() - started, 1)
    path = write_results("quant", payload)
    print(f"wrote {path} in {payload['script_seconds']} s")


if __name__ == "__main__":
    main()
