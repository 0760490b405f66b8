"""Where does sparse execution beat the dense matmul on this CPU, and where does it not?

For the two Linear shapes of a BERT-base FFN (768 -> 3072 and 3072 -> 768) and 1, 128 and 1024
input rows (batch x seq), fp32, 2 threads, times

  * ``dense``: ``F.linear`` with the pruned weight baked in (zeros stored and multiplied),
  * ``csr``: :class:`leantorch.compress.prune.sparse_exec.SparseLinear` in CSR
    (``torch.sparse`` / MKL sparse BLAS),
  * ``bsr16`` / ``bsr32``: the same module in BSR with 16x16 / 32x32 tiles (only kept tiles
    are multiplied),

for weights pruned by leantorch's own transforms:

  * ``unstructured``: ``prune.magnitude`` at densities 1% .. 90% (run as CSR),
  * ``nm``: ``prune.nm`` at 1:32, 1:16, 1:8, 1:4, 2:4, 3:4 (run as CSR: this CPU has no N:M
    kernel, so N:M is just a balanced unstructured pattern here),
  * ``block16`` / ``block32``: ``prune.block`` at tile densities 5% .. 70% (run as BSR with the
    matching tile and as CSR, to show what the tile structure is worth),

interleaved in one process after warm-up (a sample of a fast layer is a run of forwards
through 4 copies of it, so weights come from memory as in a model; see ``run_case``), and
reports medians per forward, the speedup dense / sparse, the
stored bytes, and per (shape, rows, pattern, format) the crossover density: the density below
which the sparse path is faster (linear interpolation of log speedup between the last density
that wins and the first that loses). Writes ``benchmarks/results/sparse_matmul.json`` and
``sparse_matmul.png``, and rewrites the measured section of ``docs/sparsity.md``
(``--doc-only`` re-renders it from the JSON without timing anything).

Run from the repository root:
``flock /tmp/leantorch-bench.lock .venv/bin/python benchmarks/sparse_matmul.py``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from _common import (
    RESULTS_DIR,
    THREADS,
    interleaved_timings,
    machine_info,
    ratio,
    setup_threads,
    summarize,
    write_doc_section,
    write_results,
)
from leantorch.compress.prune.block import prune_block
from leantorch.compress.prune.masks import make_permanent, prune_magnitude
from leantorch.compress.prune.nm import prune_nm
from leantorch.compress.prune.sparse_exec import SparseLinear

SHAPES = [(768, 3072), (3072, 768)]  # (in_features, out_features): BERT-base FFN up, down
ROWS = [1, 128, 1024]
DENSITIES = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9]
NM = [(1, 32), (1, 16), (1, 8), (1, 4), (2, 4), (3, 4)]
BLOCK_DENSITIES = [0.05, 0.1, 0.2, 0.3, 0.5, 0.7]
BLOCKS = [16, 32]
LAYERS = 4  # copies of a fast layer run in turn, so each reads its weights from memory
# (pattern, format) pairs whose speedup curves and crossovers are reported
PAIRS = [("unstructured", "csr"), ("nm", "csr"), ("block16", "bsr16"), ("block16", "csr"),
         ("block32", "bsr32"), ("block32", "csr")]


def pruned_weight(layer: nn.Linear, pattern: str, density: float, n: int = 0,
                  m: int = 0) -> torch.Tensor:
    """The weight of ``layer`` pruned by leantorch's transform for ``pattern``, baked in."""
    if pattern == "unstructured":
        masked, _ = prune_magnitude(layer, ratio=1 - density)
    elif pattern == "nm":
        masked, _ = prune_nm(layer, n=n, m=m)
    else:
        masked, _ = prune_block(layer, ratio=1 - density, block_size=int(pattern[5:]))
    baked, _ = make_permanent(masked)
    return baked.weight.detach()


def stored_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in
               list(module.parameters()) + list(module.buffers()))


def per_call(stats: dict[str, Any], calls: int) -> dict[str, Any]:
    """Sample statistics (one sample = ``calls`` forwards) as seconds per forward."""
    return {"median_s": stats["median_s"] / calls, "min_s": stats["min_s"] / calls,
            "max_s": stats["max_s"] / calls,
            "samples_s": [round(t / calls, 9) for t in stats["samples_s"]]}


def run_case(in_f: int, out_f: int, rows: int, pattern: str, density: float, n: int, m: int,
             warmup: int, rounds: int) -> dict[str, Any]:
    torch.manual_seed(0)
    layer = nn.Linear(in_f, out_f)
    weight = pruned_weight(layer, pattern, density, n, m)
    bias = layer.bias.detach()
    x = torch.randn(rows, in_f)
    dense = nn.Linear(in_f, out_f)
    with torch.no_grad():
        dense.weight.copy_(weight)
        dense.bias.copy_(bias)
    variants: dict[str, nn.Module] = {"dense": dense}
    if pattern.startswith("block"):
        b = int(pattern[5:])
        variants[f"bsr{b}"] = SparseLinear.from_dense(weight, bias, "bsr", b)
    variants["csr"] = SparseLinear.from_dense(weight, bias, "csr")
    expected = F.linear(x, weight, bias)
    with torch.no_grad():
        for name, module in variants.items():  # every variant computes the same thing
            torch.testing.assert_close(module(x), expected, rtol=1e-4, atol=1e-4,
                                       msg=lambda text, name=name: f"{name}: {text}")
    # the dense forward's time on a ~200 GFLOP/s, ~10 GB/s core pair: a fixed estimate, so the
    # sample layout does not depend on how busy the machine is when the script runs
    single = 2 * rows * in_f * out_f / 200e9 + 4 * in_f * out_f / 10e9
    # A fast forward is timed as a run of forwards through LAYERS copies of the layer (as in
    # a model, each reads its own weights, which the copies push out of the 2 x 2 MiB L2),
    # repeated so one sample takes >= ~10 ms: the OpenMP wake-up and cold caches that
    # interleaved_timings' gc.collect() leaves before each sample are then paid once per
    # sample, not once per forward.
    layers = LAYERS if single < 0.002 else 1
    repeats = max(1, math.ceil(0.01 / (layers * single)))
    copies = {name: [module] + [copy.deepcopy(module) for _ in range(layers - 1)]
              for name, module in variants.items()}

    def call(modules: list[nn.Module]):
        def run() -> None:
            with torch.no_grad():
                for _ in range(repeats):
                    for module in modules:
                        module(x)
        return run

    fns = {name: call(modules) for name, modules in copies.items()}
    start = time.perf_counter()
    fns[list(fns)[-1]]()
    slow = time.perf_counter() - start > 0.3  # keep the slowest cases from eating the budget
    times = interleaved_timings(fns, warmup=warmup, rounds=max(3, rounds // 2) if slow
                                else rounds)
    calls = repeats * layers
    stats = {name: per_call(summarize(samples), calls) for name, samples in times.items()}
    base = stats["dense"]["median_s"]
    kept = int((weight != 0).sum())
    return {
        "in_features": in_f, "out_features": out_f, "rows": rows, "pattern": pattern,
        "nm": f"{n}:{m}" if pattern == "nm" else None,
        "target_density": density, "density": kept / weight.numel(),
        "forwards_per_sample": {"layers": layers, "repeats": repeats},
        "median_s": {name: s["median_s"] for name, s in stats.items()},
        "speedup_vs_dense": {name: ratio(base, s["median_s"], 3)
                             for name, s in stats.items() if name != "dense"},
        # best-of-rounds times are what the code costs without interference from other
        # processes on this shared 2-core machine; medians are the headline
        "speedup_vs_dense_min": {name: ratio(stats["dense"]["min_s"], s["min_s"], 3)
                                 for name, s in stats.items() if name != "dense"},
        "stored_bytes": {name: stored_bytes(module) for name, module in variants.items()},
        "timings_per_forward": stats,
    }


def crossover(points: list[tuple[float, float]]) -> dict[str, Any]:
    """From (density, speedup) points: the density where speedup crosses 1 going up in
    density, the largest density that still wins, and whether the crossing lies inside the
    sweep."""
    points = sorted(points)
    winning = [d for d, s in points if s > 1]
    result: dict[str, Any] = {"max_winning_density": max(winning) if winning else None,
                              "wins_at": winning}
    for (d0, s0), (d1, s1) in itertools.pairwise(points):
        if s0 > 1 >= s1:
            t = math.log(s0) / (math.log(s0) - math.log(s1))
            result["crossover_density"] = round(d0 + t * (d1 - d0), 4)
            result["where"] = "inside the sweep"
            return result
    if not winning:
        result.update(crossover_density=None, where="never faster in the sweep")
    elif len(winning) == len(points):
        result.update(crossover_density=None, where="faster at every swept density")
    else:
        result.update(crossover_density=None, where="no single crossing (noisy)")
    return result


def plot(cases: list[dict[str, Any]], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(ROWS), len(SHAPES), figsize=(11, 3.2 * len(ROWS)),
                             sharex=True, squeeze=False)
    styles = {("unstructured", "csr"): ("unstructured, CSR", "C0", "o"),
              ("nm", "csr"): ("N:M, CSR", "C1", "s"),
              ("block16", "bsr16"): ("16x16 tiles, BSR", "C2", "^"),
              ("block16", "csr"): ("16x16 tiles, CSR", "C2", "x"),
              ("block32", "bsr32"): ("32x32 tiles, BSR", "C3", "v"),
              ("block32", "csr"): ("32x32 tiles, CSR", "C3", "+")}
    for i, rows in enumerate(ROWS):
        for j, (in_f, out_f) in enumerate(SHAPES):
            ax = axes[i][j]
            for (pattern, fmt), (label, color, marker) in styles.items():
                pts = sorted((c["density"], c["speedup_vs_dense"][fmt]) for c in cases
                             if c["rows"] == rows and c["in_features"] == in_f
                             and c["pattern"] == pattern and fmt in c["speedup_vs_dense"])
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker=marker, color=color, label=label,
                            linestyle="--" if fmt == "csr" and pattern.startswith("block")
                            else "-")
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"Linear {in_f}->{out_f}, {rows} rows", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if i == len(ROWS) - 1:
                ax.set_xlabel("density (kept weights / all)")
            if j == 0:
                ax.set_ylabel("speedup vs dense")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Sparse vs dense Linear on this CPU (fp32, 2 threads; > 1: sparse is faster)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


DOC = Path(__file__).resolve().parents[1] / "docs" / "sparsity.md"
# Every case of one (shape, rows) times the same dense layer, so its dense medians measure the
# same thing; when they differ by more than this factor, the machine's noise is as large as
# the speedups and no crossover is read from that group.
NOISE_LIMIT = 1.3
PATTERN_NAMES = {"unstructured": "unstructured", "nm": "N:M", "block16": "16x16 tiles",
                 "block32": "32x32 tiles"}


def _format_name(fmt: str) -> str:
    return "CSR" if fmt == "csr" else f"BSR {fmt[3:]}"


def _shape(in_f: int, out_f: int) -> str:
    return f"{in_f}→{out_f}"


def _percent(density: float) -> str:
    return f"{density * 100:.3g}%"


def _rows_name(rows: int) -> str:
    return "1 row" if rows == 1 else f"{rows} rows"


def _dense_spread(cases: list[dict[str, Any]]) -> tuple[float, float, float]:
    """(fastest, slowest, slowest / fastest) of the dense medians of cases of one group."""
    medians = [c["median_s"]["dense"] for c in cases]
    return min(medians), max(medians), max(medians) / min(medians)


def _crossover_cell(entry: dict[str, Any], top: float, readable: bool) -> str:
    """One crossover as table text: the density below which sparse wins."""
    if not readable:
        return "noise"
    density = entry["crossover_density"]
    if density is not None:
        text = f"< {_percent(density)}"
        if any(d > density for d in entry["wins_at"]):
            text += " (wins again above)"
    elif entry["where"] == "never faster in the sweep":
        text = "never"
    elif entry["where"] == "faster at every swept density":
        text = f"always (to {_percent(top)})"
    else:
        text = "no single crossing"
    best = entry.get("from_min_times")
    if best and best.get("crossover_density") is not None \
            and best["crossover_density"] != density:
        text += f"; best-of-rounds < {_percent(best['crossover_density'])}"
    return text


def _speedup_table(cases: list[dict[str, Any]], shapes: list[tuple[int, int]],
                   patterns: list[str]) -> list[str]:
    """Markdown table: one line per (shape, pattern, format), one column per density."""
    chosen = [c for c in cases if c["pattern"] in patterns]
    if not chosen:
        return []
    if patterns == ["nm"]:
        columns = sorted({(c["target_density"], c["nm"]) for c in chosen})
        headers = [label for _, label in columns]
    else:
        columns = sorted({(c["target_density"], None) for c in chosen})
        headers = [_percent(d) for d, _ in columns]
    lines = ["| Linear | weights, format | " + " | ".join(headers) + " |",
             "|---|---|" + "---|" * len(headers)]
    for in_f, out_f in shapes:
        for pattern, fmt in PAIRS:
            if pattern not in patterns:
                continue
            by_column = {(c["target_density"], c["nm"] if pattern == "nm" else None): c
                         for c in chosen if c["in_features"] == in_f and c["pattern"] == pattern}
            if not by_column:
                continue
            cells = [f"{by_column[k]['speedup_vs_dense'][fmt]:.2f}" if k in by_column else ""
                     for k in columns]
            lines.append(f"| {_shape(in_f, out_f)} | {PATTERN_NAMES[pattern]}, "
                         f"{_format_name(fmt)} | " + " | ".join(cells) + " |")
        if patterns == ["unstructured"]:  # what the sparse copy stores, once per shape
            by_column = {(c["target_density"], None): c for c in chosen
                         if c["in_features"] == in_f}
            stored = {k: c["stored_bytes"] for k, c in by_column.items()}
            cells = [f"{stored[k]['csr'] / stored[k]['dense']:.2f}" if k in stored else ""
                     for k in columns]
            lines.append(f"| {_shape(in_f, out_f)} | CSR bytes / dense bytes | "
                         + " | ".join(cells) + " |")
    return lines


def render_measured(payload: dict[str, Any]) -> str:
    """The measured section of docs/sparsity.md, from a sparse_matmul results payload."""
    cases, crossovers = payload["cases"], payload["crossovers"]
    machine = payload["machine"]
    shapes = sorted({(c["in_features"], c["out_features"]) for c in cases},
                    key=lambda shape: SHAPES.index(shape) if shape in SHAPES else 99)
    rows_measured = sorted({c["rows"] for c in cases})
    before, after = payload["load_average_before"], payload["load_average_after"]
    cores = machine.get("cpu_count") or payload["threads"]
    per_sample = "forwards_per_sample" in cases[0]
    lines = [
        f"From `benchmarks/results/sparse_matmul.json` ({machine['cpu_model']}, "
        f"{payload['threads']} threads, torch {machine['torch']}, {payload['dtype']}, no grad): "
        f"medians of {payload['rounds']} interleaved rounds after {payload['warmup']} warm-up; "
        f"rows (batch x seq) measured: {', '.join(map(str, rows_measured))}"
        + ("" if rows_measured == ROWS else
           f" (the script sweeps {', '.join(map(str, ROWS))}; the others were not run)")
        + f"; {payload['script_seconds']:.0f} s in all. Speedup = dense time / sparse time "
        f"(> 1: sparse is faster); crossover = the density below which sparse is faster "
        f"(log-linear interpolation between the last winning and the first losing density).",
    ]
    load = max(before[0], after[0])
    if load > cores / 2:  # more than half the cores busy on average: others ran beside us
        lines += ["", f"**The machine was loaded**: load average {before[0]:.1f} before and "
                  f"{after[0]:.1f} after the run on {cores} cores: about "
                  f"{load / cores:.1f}x as much runnable work as cores, so the timed code "
                  "shared the CPU with other jobs."]
    else:
        lines += ["", f"Load average {before[0]:.1f} before and {after[0]:.1f} after the run "
                  f"on {cores} cores."]
    if not per_sample:
        lines += [
            "",
            "This JSON predates the current script: each sample is a single forward, so every "
            "sample also pays the OpenMP wake-up and the cold caches that the `gc.collect()` "
            "before each sample leaves (the current script times runs of forwards through "
            f"{LAYERS} copies of a fast layer, and records best-of-rounds speedups beside the "
            "medians).",
        ]

    groups: dict[tuple[int, int], dict[str, Any]] = {}
    for in_f, out_f in shapes:
        for rows in rows_measured:
            group = [c for c in cases if c["in_features"] == in_f and c["rows"] == rows]
            if group:
                fastest, slowest, spread = _dense_spread(group)
                groups[(in_f, rows)] = {"out_f": out_f, "fastest": fastest, "slowest": slowest,
                                        "spread": spread, "readable": spread <= NOISE_LIMIT}
    noisy = [(key, g) for key, g in groups.items() if not g["readable"]]
    lines += ["", "Noise check: every case of one shape and row count times the same dense "
              "layer, so its dense medians should agree. " + "; ".join(
                  f"{_shape(in_f, g['out_f'])}, {_rows_name(rows)}: {g['fastest'] * 1e3:.2f} to "
                  f"{g['slowest'] * 1e3:.2f} ms ({g['spread']:.1f}x)"
                  for (in_f, rows), g in groups.items())
              + f". A group whose dense medians differ by more than {NOISE_LIMIT}x gives no "
              "crossover here."]
    (in_f, rows), g = max(noisy, key=lambda item: item[1]["spread"], default=((0, 0), {}))
    estimate = 2 * rows * in_f * g.get("out_f", 0) / 200e9 + 4 * in_f * g.get("out_f", 0) / 10e9
    if noisy and g["fastest"] > 2 * estimate:  # even the fastest median is far off the estimate
        lines += ["", f"The script's own estimate of that dense forward ({_shape(in_f, g['out_f'])}"
                  f", {_rows_name(rows)}: its weights read once at ~10 GB/s plus its FLOPs at "
                  f"~200 GFLOP/s) is {estimate * 1e3:.1f} ms; the measured medians are "
                  f"{g['fastest'] / estimate:.0f}-{g['slowest'] / estimate:.0f}x that, so "
                  "what these samples time is mostly waiting for a core and waking threads."]

    lines += ["", "Speedup vs dense at each density (kept weights / all; for N:M, `n:m` is "
              "density n/m):"]
    for rows in rows_measured:
        for patterns, title in [(["unstructured"], "unstructured (`prune.magnitude`)"),
                                (["nm"], "N:M (`prune.nm`), run as CSR"),
                                (["block16", "block32"], "tiles (`prune.block`), run as BSR "
                                 "with the matching tile and as CSR")]:
            table = _speedup_table([c for c in cases if c["rows"] == rows], shapes, patterns)
            if table:
                lines += ["", f"{_rows_name(rows).capitalize()}, {title}:", "", *table]

    tops = {(c["in_features"], c["rows"], c["pattern"]): c["density"] for c in
            sorted(cases, key=lambda c: c["density"])}
    lines += ["", "Crossover densities (sparse is faster below them):", "",
              "| Linear | rows | " + " | ".join(
                  f"{PATTERN_NAMES[p]}, {_format_name(f)}" for p, f in PAIRS) + " |",
              "|---|---|" + "---|" * len(PAIRS)]
    for (in_f, rows), g in groups.items():
        cells = []
        for pattern, fmt in PAIRS:
            entry = next((e for e in crossovers if e["in_features"] == in_f
                          and e["rows"] == rows and e["pattern"] == pattern
                          and e["format"] == fmt), None)
            cells.append("" if entry is None else _crossover_cell(
                entry, tops.get((in_f, rows, pattern), 0.0), g["readable"]))
        lines.append(f"| {_shape(in_f, g['out_f'])} | {rows} | " + " | ".join(cells) + " |")

    lines += ["", *_verdict(payload, groups, rows_measured)]
    return "\n".join(lines)


def _verdict(payload: dict[str, Any], groups: dict[tuple[int, int], dict[str, Any]],
             rows_measured: list[int]) -> list[str]:
    """Plain-language verdict, only from groups whose dense medians agree."""
    crossovers, cases = payload["crossovers"], payload["cases"]
    readable = {key for key, g in groups.items() if g["readable"]}
    lines = []
    if not readable:
        example = next((e for e in crossovers if e["pattern"] == "unstructured"
                        and e["format"] == "csr"), None)
        flips = ""
        if example is not None:
            swept = sorted(c["density"] for c in cases
                           if c["in_features"] == example["in_features"]
                           and c["rows"] == example["rows"] and c["pattern"] == "unstructured")
            wins = set(example["wins_at"])
            shape = _shape(example["in_features"], example["out_features"])
            flips = (f" (unstructured CSR, {shape}, {_rows_name(example['rows'])}: faster at "
                     + ", ".join(_percent(d) for d in swept if d in wins) + ", slower at "
                     + ", ".join(_percent(d) for d in swept if d not in wins) + ")")
        missing = [r for r in ROWS if r not in rows_measured]
        lines.append(
            "**Verdict: none from this run.** The ratios above are what the JSON recorded, but "
            "they flip between wins and losses from one density to the next" + flips
            + ", so the crossovers the JSON lists are interpolations of noise and no density "
            "can be named below which CSR or BSR beats dense on this CPU."
            + (f" The {' and '.join(map(str, missing))}-row cases (where dense is a real matmul "
               "rather than a matrix-vector product) were not measured at all." if missing else "")
            + " Re-run `flock /tmp/leantorch-bench.lock .venv/bin/python "
            "benchmarks/sparse_matmul.py` on a quiet machine: it rewrites this section "
            "(`--doc-only` re-renders it from the JSON).")
        return lines
    lines.append("**Verdict** (from the groups that pass the noise check):")
    best_by_rows: dict[int, float] = {}
    for rows in rows_measured:
        parts = []
        for pattern, fmt in PAIRS:
            per_shape = []
            if any(r == rows for _, r in readable):
                best_by_rows.setdefault(rows, 0.0)
            for (in_f, r), g in groups.items():
                if r != rows or (in_f, r) not in readable:
                    continue
                entry = next((e for e in crossovers if e["in_features"] == in_f and e["rows"] == r
                              and e["pattern"] == pattern and e["format"] == fmt), None)
                if entry is None:
                    continue
                if entry["crossover_density"] is not None:
                    text = f"below {_percent(entry['crossover_density'])}"
                    best_by_rows[rows] = max(best_by_rows.get(rows, 0.0),
                                             entry["crossover_density"])
                elif entry["where"] == "never faster in the sweep":
                    text = "at no swept density"
                elif entry["where"] == "faster at every swept density":
                    text = "at every swept density"
                    best_by_rows[rows] = max(best_by_rows.get(rows, 0.0),
                                             max(entry["wins_at"]))
                else:
                    text = "with no single crossing"
                per_shape.append(f"{text} ({_shape(in_f, g['out_f'])})")
            if per_shape:
                parts.append(f"{PATTERN_NAMES[pattern]} as {_format_name(fmt)} is faster "
                             + " and ".join(per_shape))
        if parts:
            lines += ["", f"- {_rows_name(rows).capitalize()}: " + "; ".join(parts) + "."]
    unread = [f"{_shape(in_f, g['out_f'])} at {_rows_name(rows)}"
              for (in_f, rows), g in groups.items() if (in_f, rows) not in readable]
    if unread:
        lines += ["", "- No verdict for " + ", ".join(unread) + " (dense medians disagree)."]
    if len(best_by_rows) > 1:
        few, many = min(best_by_rows), max(best_by_rows)
        if best_by_rows[few] > best_by_rows[many]:
            reason = ("sparse pays off more for few rows, where dense is a matrix-vector "
                      "product bound by reading the weights and the sparse copy reads fewer "
                      "bytes, than for many rows, where dense runs as a GEMM near the matmul "
                      "peak and the sparse kernels do not")
        else:
            reason = "the sparse kernels keep up as the row count grows"
        def best(rows: int) -> str:
            return _percent(best_by_rows[rows]) if best_by_rows[rows] else "no swept density"

        lines += ["", f"The highest density at which some sparse format still wins moves from "
                  f"{best(few)} at {_rows_name(few)} to {best(many)} at {_rows_name(many)}: "
                  f"{reason}."]
    return lines


def write_doc(payload: dict[str, Any]) -> None:
    """Rewrite the measured section of docs/sparsity.md, leaving the rest of the file alone."""
    write_doc_section(DOC, render_measured(payload))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--rows", type=int, nargs="+", default=ROWS)
    parser.add_argument("--doc-only", action="store_true",
                        help="re-render docs/sparsity.md's measured section from the JSON")
    options = parser.parse_args(argv)
    if options.doc_only:
        write_doc(json.loads((RESULTS_DIR / "sparse_matmul.json").read_text()))
        return
    threads = setup_threads(THREADS)
    started = time.perf_counter()
    load_before = list(os.getloadavg())
    plan: list[tuple[str, float, int, int]] = [("unstructured", d, 0, 0) for d in DENSITIES]
    plan += [("nm", n / m, n, m) for n, m in NM]
    plan += [(f"block{b}", d, 0, 0) for b in BLOCKS for d in BLOCK_DENSITIES]
    cases = []
    for rows in options.rows:
        for in_f, out_f in SHAPES:
            for pattern, density, n, m in plan:
                case = run_case(in_f, out_f, rows, pattern, density, n, m, options.warmup,
                                options.rounds)
                cases.append(case)
                speedups = " ".join(f"{k} {v:.2f}x (min {case['speedup_vs_dense_min'][k]:.2f}x)"
                                    for k, v in case["speedup_vs_dense"].items())
                print(f"{in_f}->{out_f} rows {rows:5d} {pattern:12s} density "
                      f"{case['density']:.3f}: dense {case['median_s']['dense'] * 1e3:8.2f} ms"
                      f" | {speedups}", flush=True)
    crossovers = []
    for rows in options.rows:
        for in_f, out_f in SHAPES:
            for pattern, fmt in PAIRS:
                chosen = [c for c in cases if c["rows"] == rows and c["in_features"] == in_f
                          and c["pattern"] == pattern]
                by_min = crossover([(c["density"], c["speedup_vs_dense_min"][fmt])
                                    for c in chosen])
                crossovers.append({
                    "in_features": in_f, "out_features": out_f, "rows": rows,
                    "pattern": pattern, "format": fmt,
                    **crossover([(c["density"], c["speedup_vs_dense"][fmt]) for c in chosen]),
                    "from_min_times": {k: by_min[k] for k in
                                       ("crossover_density", "where", "max_winning_density")},
                })
    payload = {
        "benchmark": "sparse_matmul",
        "description": "median wall time per forward of a Linear layer with pruned weights: "
                       "dense F.linear (zeros multiplied) vs leantorch SparseLinear in CSR and "
                       "BSR (torch.sparse), fp32, no_grad, interleaved rounds after warm-up; "
                       "a sample of a fast layer runs forwards_per_sample forwards through "
                       "copies of the layer; "
                       "speedup = dense / sparse; crossover_density = the density below which "
                       "sparse wins",
        "threads": threads, "dtype": "float32", "warmup": options.warmup,
        "rounds": options.rounds, "machine": machine_info(),
        "load_average_before": load_before, "load_average_after": list(os.getloadavg()),
        "crossovers": crossovers, "cases": cases,
        "script_seconds": round(time.perf_counter() - started, 1),
    }
    if options.rows == ROWS:
        plot(cases, RESULTS_DIR / "sparse_matmul.png")
    path = write_results("sparse_matmul", payload)
    for c in crossovers:
        print(f"{c['in_features']}->{c['out_features']} rows {c['rows']:5d} {c['pattern']:12s} "
              f"{c['format']:5s}: crossover {c['crossover_density']} ({c['where']}; wins at "
              f"{[round(d, 3) for d in c['wins_at']]}); from min times "
              f"{c['from_min_times']['crossover_density']}")
    print(f"wrote {path} in {payload['script_seconds']} s; load average {load_before} -> "
          f"{payload['load_average_after']}")
    write_doc(payload)


if __name__ == "__main__":
    main()
