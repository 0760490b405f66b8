"""Where an int8 MiniLM's time goes: ``torch.profiler`` over the real all-MiniLM-L6-v2 encoder
after ``quant.int8_dynamic`` (32 passages x 128 tokens, CPU, 2 threads, eval, no_grad).

Each aten / leantorch op's self CPU time is put in one bucket: the per-token quantize passes
(amax/amin, divide, round, cast to int8), the int8 GEMM (oneDNN or ``torch._int_mm``), the
rescale after it (per-token scale, bias, casts), the attention matmuls (SDPA / bmm), layer
norms, GELU, softmax, copies and the rest. ``--fast`` also profiles the fast-path knobs
(``compute_dtype=torch.bfloat16``, then with ``compile=True``; the compiled quantize kernels
count as "per-token quantize").

Run: ``benchmarks/int8_profile.py [--rounds N] [--fast]``; writes
``benchmarks/results/int8_profile.json``.
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from _common import THREADS, machine_info, setup_threads, write_results

# aten op name (without the "aten::" prefix) -> bucket; the first match wins
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("int8 GEMM", ("int8_scaled_mm", "qlinear_pointwise", "_int_mm")),
    ("per-token quantize", ("amax", "amin", "maximum", "neg_", "div", "div_", "round_",
                            "eq", "masked_fill_")),
    ("attention (SDPA, bmm, softmax)", ("_scaled_dot_product_flash_attention_for_cpu",
                                        "scaled_dot_product_attention", "bmm", "baddbmm",
                                        "matmul", "_softmax", "softmax")),
    ("layer norm", ("layer_norm", "native_layer_norm")),
    ("GELU", ("gelu",)),
    ("float GEMM (not quantized)", ("addmm", "mm", "linear")),
    ("rescale (per-token scale, bias) and residual adds", ("addcmul", "mul", "mul_", "add",
                                                           "add_")),
    ("copies and casts (incl. the quantize's float32 copy and int8 cast)",
     ("to", "_to_copy", "copy_", "contiguous", "clone", "empty", "reshape", "view",
      "transpose", "permute", "expand", "t")),
]


def bucket_of(name: str) -> str:
    """The bucket of a profiler event key such as ``aten::amax`` or ``leantorch::...``."""
    short = name.split("::", 1)[-1]
    if short.startswith(("cpp_fused", "Torch-Compiled Region", "CompiledFunction",
                         "## Call CompiledFxGraph")):
        return "per-token quantize"  # the only compiled code in these models (compile=True)
    for bucket, ops in BUCKETS:
        if short in ops:
            return bucket
    return "other"


def profile_model(model: torch.nn.Module, inputs: dict[str, torch.Tensor],
                  rounds: int) -> dict[str, Any]:
    """Self CPU time per bucket and per op, averaged over ``rounds`` forward passes."""
    with torch.no_grad():
        for _ in range(2):  # warm-up: oneDNN prepacks weights, torch.compile compiles
            model(**inputs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(rounds):
                model(**inputs)
    ops: dict[str, dict[str, float]] = {}
    buckets: dict[str, float] = defaultdict(float)
    total = 0.0
    for event in prof.key_averages():
        self_us = event.self_cpu_time_total / rounds
        if self_us <= 0:
            continue
        total += self_us
        bucket = bucket_of(event.key)
        buckets[bucket] += self_us
        ops[event.key] = {"self_ms": round(self_us / 1e3, 3), "calls": event.count // rounds,
                          "bucket": bucket}
    ranked = dict(sorted(ops.items(), key=lambda kv: -kv[1]["self_ms"]))
    return {
        "total_self_ms": round(total / 1e3, 2),
        "buckets_ms": {k: round(v / 1e3, 2) for k, v in sorted(buckets.items(),
                                                                key=lambda kv: -kv[1])},
        "buckets_share": {k: round(v / total, 3) for k, v in sorted(buckets.items(),
                                                                   key=lambda kv: -kv[1])},
        "ops": dict(list(ranked.items())[:25]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--fast", action="store_true",
                        help="also profile int8_dynamic(compute_dtype=torch.bfloat16), without "
                        "and with compile=True")
    options = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = setup_threads(THREADS)
    from leantorch.compress.quant import int8_dynamic
    from leantorch.models import load_minilm
    from quant import minilm_inputs

    fp32 = load_minilm()
    inputs, _ = minilm_inputs(options.batch, options.seq_len)
    variants: dict[str, torch.nn.Module] = {
        "fp32": fp32,
        "int8_dynamic": int8_dynamic(fp32)[0],
    }
    if options.fast:
        variants["int8_dynamic compute_dtype=bfloat16"] = int8_dynamic(
            fp32, compute_dtype=torch.bfloat16)[0]
        variants["int8_dynamic compute_dtype=bfloat16 compile=True"] = int8_dynamic(
            fp32, compute_dtype=torch.bfloat16, compile=True)[0]
    payload: dict[str, Any] = {
        "benchmark": "int8_profile",
        "description": __doc__.split("\n\n")[0],
        "threads": threads,
        "rounds": options.rounds,
        "inputs": {k: list(v.shape) for k, v in inputs.items()},
        "machine": machine_info(),
        "load_average": list(os.getloadavg()),
        "unit": "ms of self CPU time per forward pass (summed over both threads' ops)",
    }
    for name, model in variants.items():
        payload[name] = profile_model(model.eval(), inputs, options.rounds)
        print(f"\n{name}: {payload[name]['total_self_ms']} ms")
        for bucket, ms in payload[name]["buckets_ms"].items():
            print(f"  {bucket:34s} {ms:8.2f} ms  {payload[name]['buckets_share'][bucket]:.1%}")
    path = write_results("int8_profile", payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
