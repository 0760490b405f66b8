"""Expert parallelism on 2 gloo processes vs the single-process layer: tokens/s and bytes
exchanged.

The layer of ``benchmarks/moe.py`` (E = 8, top-2, d = 1024, expert hidden 2816, float32),
4096 tokens in all. Two processes on this 2-core machine, one thread each: each holds 4
experts and 2048 tokens, and tokens travel with ``all_to_all_single`` over gloo (TCP on
localhost). The single-process baseline runs in rank 0 with 2 threads on all 4096 tokens while
rank 1 waits at a barrier, interleaved round by round with the expert-parallel steps, so both
see the same machine. A step's time is the slower rank's (all-reduced max).

What this measures on one machine: the cost of the exchange (copies through gloo) against the
same compute split over two processes; there is no extra hardware to gain from, so a ratio
below 1 is the communication overhead. Forward (no_grad) and forward+backward.

Run: ``flock /tmp/leantorch-bench.lock .venv/bin/python benchmarks/moe_expert_parallel.py``
Writes ``benchmarks/results/moe_expert_parallel.json`` and re-renders the measured section of
``docs/moe.md`` (``--doc-only``: only that, from the JSON files; see ``benchmarks/moe.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _common import THREADS, machine_info, ratio, summarize, write_results
from leantorch.distributed import expert_parallel
from leantorch.nn.moe import MoE
from moe import write_doc

EXPERTS, TOP_K, DIM, HIDDEN, TOKENS, WORLD = 8, 2, 1024, 2816, 4096, 2


def _layer() -> MoE:
    torch.manual_seed(0)
    layer = MoE(DIM, HIDDEN, EXPERTS, TOP_K)
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 0.02)
    return layer


def _step(layer: MoE, x: torch.Tensor, grad: torch.Tensor, phase: str) -> None:
    if phase == "forward":
        with torch.no_grad():
            layer(x)
    else:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(grad)


def _max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t[0])


def _worker(rank: int, port: int, tokens: int, warmup: int, rounds: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    generator = torch.Generator().manual_seed(1)
    x_all = torch.randn(tokens, DIM, generator=generator)
    grad_all = torch.randn(tokens, DIM, generator=generator)
    share = tokens // WORLD
    mine = slice(rank * share, (rank + 1) * share)
    single = _layer() if rank == 0 else None
    sharded = expert_parallel(_layer())
    results: dict[str, Any] = {"phases": {}}
    # correctness: the sharded forward equals the single-process one on this rank's tokens
    torch.set_num_threads(1)
    with torch.no_grad():
        y_mine = sharded.eval()(x_all[mine])
    pieces = [torch.empty_like(y_mine) for _ in range(WORLD)]
    dist.all_gather(pieces, y_mine)
    if rank == 0:
        torch.set_num_threads(THREADS)
        with torch.no_grad():
            reference = single.eval()(x_all)
        results["max_abs_diff_vs_single_process"] = float((torch.cat(pieces) -
                                                           reference).abs().max())
    results["exchanged_bytes_per_forward"] = sharded.stats.exchanged_bytes
    results["rows_sent"] = sharded.experts.last_sent_rows
    results["rows_received"] = sharded.experts.last_received_rows
    for phase in ("forward", "forward+backward"):
        train = phase != "forward"
        sharded.train(train)
        if single is not None:
            single.train(train)
        x_mine = x_all[mine].clone().requires_grad_(train)
        x_full = x_all.clone().requires_grad_(train)
        ep_times, single_times = [], []
        for index in range(warmup + rounds):
            torch.set_num_threads(1)
            dist.barrier()
            start = time.perf_counter()
            _step(sharded, x_mine, grad_all[mine], phase)
            elapsed = _max_over_ranks(time.perf_counter() - start)
            dist.barrier()
            if rank == 0:
                torch.set_num_threads(THREADS)
                start = time.perf_counter()
                _step(single, x_full, grad_all, phase)
                single_elapsed = time.perf_counter() - start
            dist.barrier()
            if index >= warmup:
                ep_times.append(elapsed)
                if rank == 0:
                    single_times.append(single_elapsed)
        if rank == 0:
            results["phases"][phase] = {"expert_parallel": summarize(ep_times),
                                        "single_process": summarize(single_times)}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    load_before = list(os.getloadavg())
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "ep.json")
        mp.spawn(_worker, args=(_free_port(), options.tokens, options.warmup, options.rounds,
                                out), nprocs=WORLD, join=True)
        results = json.loads(Path(out).read_text())
    phases = {}
    for phase, timings in results["phases"].items():
        ep = statistics.median(timings["expert_parallel"]["samples_s"])
        single = statistics.median(timings["single_process"]["samples_s"])
        phases[phase] = {
            **timings,
            "tokens_per_s": {"expert_parallel": round(options.tokens / ep, 1),
                             "single_process": round(options.tokens / single, 1)},
            "ratio_expert_parallel/single_process": ratio(single, ep, 3),
        }
        print(f"{phase:17s} expert-parallel {options.tokens / ep:7.0f} tok/s | single process "
              f"{options.tokens / single:7.0f} tok/s")
    per_rank_bytes = results["exchanged_bytes_per_forward"]
    payload = {
        "benchmark": "moe_expert_parallel",
        "description": "MoE layer split over 2 gloo processes (1 thread each, 4 experts and "
                       "half the tokens each) vs the single-process layer (2 threads, all "
                       "tokens); tokens/s of the whole batch, forward and forward+backward, "
                       "and bytes exchanged by all_to_all_single",
        "shapes": {"experts": EXPERTS, "top_k": TOP_K, "dim": DIM, "expert_hidden": HIDDEN,
                   "tokens": options.tokens, "world_size": WORLD, "dtype": "float32"},
        "backend": "gloo",
        "max_abs_diff_vs_single_process": results["max_abs_diff_vs_single_process"],
        "exchanged_bytes": {
            "rank0_forward_sent_plus_received": per_rank_bytes,
            "rank0_rows_sent": results["rows_sent"],
            "rank0_rows_received": results["rows_received"],
            "note": "forward: rows to other ranks and outputs back, sent plus received by "
                    "rank 0; backward moves the same bytes again",
        },
        "threads": {"single_process": THREADS, "per_rank": 1},
        "warmup": options.warmup,
        "rounds": options.rounds,
        "machine": machine_info(),
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "phases": phases,
        "script_seconds": round(time.perf_counter() - started, 1),
    }
    path = write_results("moe_expert_parallel", payload)
    print(f"wrote {path} in {payload['script_seconds']} s")
    write_doc()


if __name__ == "__main__":
    main()
