"""Every shipped recipe on the real MiniLM encoder (and the quantization recipes on bert-base
shapes): size, FLOPs, fidelity on held-out sentences and on a second, different text set (the
Python language reference's sentences, never tuned on), and latency timed side by side.

Each recipe runs through ``run_recipe`` on the same calibration and evaluation sentences (the
calibration corpus of ``leantorch.data.corpora``, as ``leantorch compress`` uses); the final
models are then timed against the fp32 original in one interleaved loop (same batch, 2
threads), so the speedups are ratios measured together; each comes with the spread of its
per-round ratio, and ``--repeat N`` reruns the whole timed loop N times and records the spread
of each speedup across the runs.

    .venv/bin/python benchmarks/recipes.py [--rounds 15] [--models minilm,bert-base] [--repeat N]
    .venv/bin/python benchmarks/recipes.py --recipes lowrank-50,prune-30 --no-timing

``--no-timing`` prints fidelity only and writes ``results/recipes-fidelity.json`` (the timed
``results/recipes.json`` is left alone).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch

from _common import (
    RESULTS_DIR,
    add_repeat_option,
    error_text,
    machine_info,
    ratio,
    repeated_timings,
    setup_threads,
    summarize,
    write_results,
)
from leantorch.compress.recipe import builtin_recipes, load_recipe, run_recipe
from leantorch.compress.verify import GateFailure
from leantorch.data import corpora
from leantorch.models import load_model

# bert-base has random weights here: only the recipes that need no training are meaningful
RECIPES = {"minilm": None, "bert-base": ("int8", "int4-weight")}
EVAL_BATCH, EVAL_SEQ = 32, 128


def run_model(name: str, rounds: int, repeat: int = 1, only: list[str] | None = None
              ) -> dict[str, Any]:
    loaded = load_model(name)
    sets = corpora(holdout=0.25)
    calibration_texts = sets.calibration
    evaluation = loaded.batches(sets.held_out, EVAL_BATCH, EVAL_SEQ, seed=1)
    # the second set needs real tokens: a model without a tokenizer gets random ids anyway
    second = (loaded.batches(sets.second, EVAL_BATCH, EVAL_SEQ)
              if loaded.tokenizer is not None else None)
    timing_batch = evaluation[0]
    finals: dict[str, torch.nn.Module] = {"original": loaded.model}
    recipes: dict[str, Any] = {}
    for recipe_name in RECIPES[name] or builtin_recipes():
        if only is not None and recipe_name not in only:
            continue
        recipe = load_recipe(recipe_name)
        cal = recipe.calibration
        calibration = loaded.batches(calibration_texts[:cal.samples], cal.batch_size,
                                     cal.seq_len)
        start = time.perf_counter()
        try:
            result = run_recipe(recipe, loaded.model, calibration=calibration,
                                evaluation=evaluation, example_inputs=timing_batch,
                                latency_runs=0, source=name, evaluation_ood=second,
                                ood_source="sentences of the Python language reference")
        except GateFailure as failure:
            result = failure.result
        except Exception as error:  # record, do not hide, a recipe that breaks
            recipes[recipe_name] = {"error": error_text(error)}
            continue
        entry = result.to_dict()
        entry["seconds"] = round(time.perf_counter() - start, 1)
        recipes[recipe_name] = entry
        finals[recipe_name] = result.model
        print(f"{name} {recipe_name}: {result.stages[-1].fidelity}; second set: "
              f"{result.stages[-1].fidelity_ood} "
              f"({'passed' if result.passed else 'FAILED ' + '; '.join(result.failures)})",
              flush=True)
    if not rounds:  # fidelity only
        return {"model": name, "recipes": recipes}

    def forward(model: torch.nn.Module):
        def call() -> None:
            with torch.no_grad():
                model(**timing_batch) if isinstance(timing_batch, dict) else model(*timing_batch)
        return call

    for model in finals.values():
        model.eval()
    times, spread = repeated_timings({k: forward(m) for k, m in finals.items()}, "original",
                                     warmup=2, rounds=rounds, repeats=repeat)
    base = statistics.median(times["original"])
    timing = {k: {**summarize(v), "speedup_vs_original": ratio(base, statistics.median(v)),
                  "speedup_per_round": spread["per_round"][k]}
              for k, v in times.items()}
    if spread["across_repeats"]:
        for k in timing:
            timing[k]["speedup_repeats"] = spread["across_repeats"][k]
    return {"model": name, "timing_batch": {k: list(v.shape) for k, v in timing_batch.items()},
            "recipes": recipes, "timing": timing}


def render_table(payload: dict[str, Any], model: str = "minilm") -> str:
    """The README's recipe table (Markdown) for ``model``, from a results payload."""
    entry = payload["models"][model]
    lines = ["| recipe | params | weights | GFLOPs | speedup | mean cosine | min cosine "
             "| retrieval agreement | mean cosine, second set | gate |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    first = None
    for name, recipe in entry["recipes"].items():
        if "error" in recipe:
            lines.append(f"| `{name}` | error: {recipe['error']} ||||||||")
            continue
        first = first or recipe["stages"][0]
        last = recipe["stages"][-1]
        metrics = last["fidelity"]["metrics"]
        second = (last.get("fidelity_ood") or {}).get("metrics", {}).get("cosine_mean")
        gates = ", ".join(f"{g['metric']} >= {g['min']}" for g in recipe["recipe"]["gates"]
                          if "min" in g)
        timed = entry["timing"][name]
        if "speedup_per_round" in timed:  # median [q1-q3] of the per-round ratios, as the CLI
            rounds = timed["speedup_per_round"]
            speed = f"{rounds['median']:.2f}x [{rounds['q1']:.2f}-{rounds['q3']:.2f}]"
        else:  # older result files: the ratio of the medians, no spread
            speed = f"{timed['speedup_vs_original']:.2f}x"
        lines.append(
            f"| `{name}` | {last['params'] / 1e6:.1f}M | {last['param_bytes'] / 2**20:.1f} MiB | "
            f"{last['flops'] / 1e9:.2f} | {speed} | "
            f"{metrics['cosine_mean']:.4f} | {metrics['cosine_min']:.4f} | "
            f"{metrics['retrieval_agreement']:.3f} | "
            f"{'-' if second is None else f'{second:.4f}'} | {gates} "
            f"({'passed' if recipe['passed'] else 'FAILED'}) |")
    if first is not None:
        lines.insert(2, f"| original (fp32) | {first['params'] / 1e6:.1f}M | "
                        f"{first['param_bytes'] / 2**20:.1f} MiB | {first['flops'] / 1e9:.2f} | "
                        "1.00x | 1 | 1 | 1 | 1 | - |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--models", default=",".join(RECIPES))
    parser.add_argument("--recipes", help="comma-separated shipped recipe names (default: all)")
    parser.add_argument("--no-timing", action="store_true",
                        help="fidelity only: skip the latency loop, write recipes-fidelity.json")
    parser.add_argument("--table", action="store_true",
                        help="print the README table from benchmarks/results/recipes.json")
    add_repeat_option(parser)
    args = parser.parse_args(argv)
    if args.table:
        print(render_table(json.loads((RESULTS_DIR / "recipes.json").read_text())))
        return
    threads = setup_threads()
    start = time.perf_counter()
    only = args.recipes.split(",") if args.recipes else None
    unknown = sorted(set(only or ()) - set(builtin_recipes()))
    if unknown:
        parser.error(f"--recipes: unknown {', '.join(unknown)}; shipped: "
                     f"{', '.join(builtin_recipes())}")
    rounds = 0 if args.no_timing else args.rounds
    payload: dict[str, Any] = {
        "benchmark": "recipes" if rounds else "recipes-fidelity",
        "description": "shipped recipes: fidelity on held-out sentences and latency of the "
                       "final model vs the original, timed interleaved in one loop",
        "threads": threads,
        "rounds": args.rounds,
        "repeat": args.repeat,
        "machine": machine_info(),
        "load_average_before": list(os.getloadavg()),
        "models": {},
    }
    for name in args.models.split(","):
        payload["models"][name] = run_model(name, rounds, args.repeat, only)
    payload["load_average_after"] = list(os.getloadavg())
    payload["script_seconds"] = round(time.perf_counter() - start, 1)
    path = write_results(payload["benchmark"], payload)
    if not rounds:
        print(f"wrote {path} in {payload['script_seconds']} s")
        return
    for name, entry in payload["models"].items():
        for recipe_name, timing in entry["timing"].items():
            recipe = entry["recipes"].get(recipe_name, {})
            stages = recipe.get("stages") or [{}]
            fidelity = (stages[-1].get("fidelity") or {}).get("metrics", {})
            print(f"{name:10s} {recipe_name:14s} speedup {timing['speedup_vs_original']} "
                  f"weights {stages[-1].get('param_bytes')} fidelity {fidelity}")
    print(render_table(payload))
    print(f"wrote {path} in {payload['script_seconds']} s")


if __name__ == "__main__":
    main()
