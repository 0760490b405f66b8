"""Counting overhead of ``leantorch.measure.profile`` against a plain forward.

For bert-base (batch 1, seq 128) and vit-b16 (batch 1, 3x224x224), eval mode, times

  (a) ``plain``: a forward under ``torch.no_grad()``;
  (b) ``count``: ``profile(model, ..., latency=False, device_spec=None, activations=False)``,
      the counting pass only;
  (c) ``count+activations``: ``profile(model, ..., latency=False, device_spec=None)``, the
      counting pass plus the extra grad-enabled forward that measures saved activations;
  (d) ``plain_grad`` (context for (c)): a plain forward with grad enabled, which is what the
      extra pass of (c) costs before leantorch's hooks;

interleaved in one process after a warm-up, and reports medians and the ratios (b)/(a),
(c)/(a) and (d)/(a). Writes ``benchmarks/results/measure_overhead.json``.

Run from the repository root: ``.venv/bin/python benchmarks/measure_overhead.py``.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch

from _common import (
    THREADS,
    interleaved_timings,
    machine_info,
    ratio,
    setup_threads,
    summarize,
    write_results,
)
from leantorch.measure import profile
from leantorch.models import load_model

CASES = {"bert-base": 128, "vit-b16": None}  # model -> seq_len (None: a vision model)


def leftover_hooks(model: torch.nn.Module) -> int:
    """Forward hooks still attached anywhere in ``model`` (profile must leave none)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def run_case(name: str, seq_len: int | None, warmup: int, rounds: int) -> dict[str, Any]:
    loaded = load_model(name)
    model = loaded.model.eval()
    args, kwargs = loaded.example_inputs(batch=1, seq_len=seq_len)

    def plain() -> None:
        with torch.no_grad():
            model(*args, **kwargs)

    def count() -> None:
        profile(model, *args, input_kwargs=kwargs, latency=False, device_spec=None,
                activations=False)

    def count_activations() -> None:
        profile(model, *args, input_kwargs=kwargs, latency=False, device_spec=None)

    def plain_grad() -> None:
        with torch.enable_grad():
            model(*args, **kwargs)

    fns = {"plain": plain, "count": count, "count+activations": count_activations,
           "plain_grad": plain_grad}
    times = interleaved_timings(fns, warmup=warmup, rounds=rounds)
    stats = {key: summarize(samples) for key, samples in times.items()}
    base = stats["plain"]["median_s"]
    report = profile(model, *args, input_kwargs=kwargs, latency=False, device_spec=None)
    inputs = {f"arg{i}": list(a.shape) for i, a in enumerate(args)}
    inputs.update({k: list(v.shape) for k, v in kwargs.items()})
    return {
        "model": name,
        "class": type(model).__name__,
        "inputs": inputs,
        "batch": 1,
        "seq_len": seq_len,
        "params": report.params.total,
        "forward_flops": report.forward.flops,
        "forward_macs": report.forward.macs,
        "saved_activation_bytes": report.memory.saved_activation_bytes,
        "timings": stats,
        "median_s": {key: s["median_s"] for key, s in stats.items()},
        "ratios": {
            "count/plain": ratio(stats["count"]["median_s"], base, 3),
            "count+activations/plain": ratio(stats["count+activations"]["median_s"], base, 3),
            "plain_grad/plain": ratio(stats["plain_grad"]["median_s"], base, 3),
        },
        "overhead_s": {
            "count": round(stats["count"]["median_s"] - base, 6),
            "count+activations": round(stats["count+activations"]["median_s"] - base, 6),
        },
        "hooks_left_after_profile": leftover_hooks(model),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls of each variant")
    parser.add_argument("--rounds", type=int, default=21, help="timed interleaved rounds")
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    options = parser.parse_args(argv)
    threads = setup_threads(THREADS)
    started = time.perf_counter()
    load_before = list(os.getloadavg())
    cases = {}
    for name in options.models:
        case = run_case(name, CASES[name], options.warmup, options.rounds)
        cases[name] = case
        med = case["median_s"]
        print(f"{name:10s} plain {med['plain'] * 1e3:8.1f} ms | count "
              f"{med['count'] * 1e3:8.1f} ms ({case['ratios']['count/plain']:.2f}x) | "
              f"count+activations {med['count+activations'] * 1e3:8.1f} ms "
              f"({case['ratios']['count+activations/plain']:.2f}x) | plain_grad "
              f"{med['plain_grad'] * 1e3:8.1f} ms ({case['ratios']['plain_grad/plain']:.2f}x)")
    payload = {
        "benchmark": "measure_overhead",
        "description": "median wall time of a plain no_grad forward vs profile() counting "
                       "(activations=False) vs profile() counting + saved-activation forward; "
                       "latency=False, device_spec=None; plain_grad (a grad-enabled plain "
                       "forward) for context; interleaved rounds after warm-up",
        "threads": threads,
        "warmup": options.warmup,
        "rounds": options.rounds,
        "machine": machine_info(),
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "cases": cases,
        "script_seconds": round(time.perf_counter() - started, 1),
    }
    path = write_results("measure_overhead", payload)
    print(f"wrote {path} in {payload['script_seconds']} s")


if __name__ == "__main__":
    main()
