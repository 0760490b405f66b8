"""MoE++ zero-computation experts vs a vanilla MoE of the same size: layer throughput.

Vanilla: 8 SwiGLU experts (d = 1024, hidden 2816), top-2, 4096 tokens, float32, 2 threads.
MoE++: the same 8 FFN experts (identical weights) plus 1 zero, 1 copy and 2 constant experts
(the paper's 8 + 4 layout), top-2. A token sent to a zero-computation expert skips the FFN
matmuls, so the gain depends on the share of assignments those experts receive. MoE++ learns
that share in training (its tau weights the balance loss of those experts); here it is set by a
bias on the router logits of the zero-computation experts, found by bisection on the benchmark
batch, at 1/3 (what an untrained router gives with 4 of 12 experts), 1/2 and 2/3, plus the
untrained router itself. The paper claims 1.1x-2.1x expert throughput over a vanilla MoE of the
same size.

Forward (eval, no_grad) and forward+backward (train, input requiring grad, fixed output
gradient), interleaved medians after warm-up.

Run: ``flock /tmp/leantorch-bench.lock .venv/bin/python benchmarks/moe_plusplus.py``
Writes ``benchmarks/results/moe_plusplus.json`` and re-renders the measured section of
``docs/moe.md`` (``--doc-only``: only that, from the JSON files; see ``benchmarks/moe.py``).
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
from leantorch.nn.moe import MoE
from moe import write_doc

EXPERTS, TOP_K, DIM, HIDDEN, TOKENS = 8, 2, 1024, 2816, 4096
ZERO, COPY, CONSTANT = 1, 1, 2
TARGET_SHARES = (1 / 3, 1 / 2, 2 / 3)


def zc_share(layer: MoE, x: torch.Tensor) -> float:
    """Share of the assignments that went to zero-computation experts."""
    with torch.no_grad():
        layer.eval()(x)
    load = layer.stats.load
    return float(load[EXPERTS:].sum() / load.sum())


def set_share(layer: MoE, x: torch.Tensor, target: float) -> float:
    """Bisect a bias on the zero-computation experts' logits until their share is target."""
    low, high = -30.0, 30.0
    for _ in range(40):
        middle = (low + high) / 2
        with torch.no_grad():
            layer.router.bias[EXPERTS:] = middle
        if zc_share(layer, x) < target:
            low = middle
        else:
            high = middle
    return zc_share(layer, x)


def build(x: torch.Tensor) -> dict[str, MoE]:
    torch.manual_seed(0)
    vanilla = MoE(DIM, HIDDEN, EXPERTS, TOP_K, router_bias=True)
    with torch.no_grad():
        vanilla.router.weight.normal_(0.0, 0.02)
    variants = {"vanilla": vanilla}
    for label in ("untrained", *[f"share_{t:.2f}" for t in TARGET_SHARES]):
        plus = MoE(DIM, HIDDEN, EXPERTS, TOP_K, zero_experts=ZERO, copy_experts=COPY,
                   constant_experts=CONSTANT, router_bias=True)
        with torch.no_grad():
            plus.experts.load_state_dict(vanilla.experts.state_dict())
            plus.router.weight.normal_(0.0, 0.02)
            plus.router.weight[:EXPERTS] = vanilla.router.weight
        variants[f"moe++_{label}"] = plus
    for target in TARGET_SHARES:
        set_share(variants[f"moe++_share_{target:.2f}"], x, target)
    return variants


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--doc-only", action="store_true",
                        help="re-render docs/moe.md's measured section from the JSON files")
    options = parser.parse_args(argv)
    if options.doc_only:
        write_doc()
        return
    threads = setup_threads(THREADS)
    started = time.perf_counter()
    load_before = list(os.getloadavg())
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(options.tokens, DIM, generator=generator)
    grad = torch.randn(options.tokens, DIM, generator=generator)
    variants = build(x)
    shares = {n: zc_share(m, x) for n, m in variants.items()}
    ffn_rows = {n: int(m.stats.load[:EXPERTS].sum()) for n, m in variants.items()}
    phases: dict[str, Any] = {}
    for phase in ("forward", "forward+backward"):
        fns = {}
        for name, layer in variants.items():
            layer.train(phase != "forward")
            if phase == "forward":
                def run(layer: MoE = layer) -> None:
                    with torch.no_grad():
                        layer(x)
            else:
                x_grad = x.clone().requires_grad_()

                def run(layer: MoE = layer, x_grad: torch.Tensor = x_grad) -> None:
                    layer.zero_grad(set_to_none=True)
                    x_grad.grad = None
                    layer(x_grad).backward(grad)
            fns[name] = run
        times = interleaved_timings(fns, warmup=options.warmup, rounds=options.rounds)
        stats = {n: summarize(s) for n, s in times.items()}
        tokens_per_s = {n: round(options.tokens / s["median_s"], 1) for n, s in stats.items()}
        phases[phase] = {
            "timings": stats,
            "tokens_per_s": tokens_per_s,
            "speedup_vs_vanilla": {n: ratio(v, tokens_per_s["vanilla"], 3)
                                   for n, v in tokens_per_s.items() if n != "vanilla"},
        }
        print(f"{phase:17s} " + " | ".join(
            f"{n} {v:7.0f} tok/s" for n, v in tokens_per_s.items()))
    payload = {
        "benchmark": "moe_plusplus",
        "description": "MoE++ (8 FFN + 1 zero + 1 copy + 2 constant experts, top-2) vs "
                       "vanilla MoE (8 FFN experts, top-2), same FFN weights; the share of "
                       "assignments to zero-computation experts set by a router bias; layer "
                       "tokens/s, forward (no_grad) and forward+backward",
        "paper_claim": "1.1x-2.1x expert forward throughput vs a vanilla MoE of the same size "
                       "(MoE++, Jin et al. 2024)",
        "shapes": {"ffn_experts": EXPERTS, "zero": ZERO, "copy": COPY, "constant": CONSTANT,
                   "top_k": TOP_K, "dim": DIM, "expert_hidden": HIDDEN,
                   "tokens": options.tokens, "dtype": "float32"},
        "zero_computation_share": {n: round(v, 4) for n, v in shares.items()},
        "ffn_rows": ffn_rows,
        "params": {n: sum(p.numel() for p in m.parameters()) for n, m in variants.items()},
        "threads": threads,
        "warmup": options.warmup,
        "rounds": options.rounds,
        "machine": machine_info(),
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "phases": phases,
        "script_seconds": round(time.perf_counter() - started, 1),
    }
    path = write_results("moe_plusplus", payload)
    print(f"wrote {path} in {payload['script_seconds']} s")
    write_doc()


if __name__ == "__main__":
    main()
