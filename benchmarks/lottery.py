"""Lottery tickets on scikit-learn's bundled digits (8x8 images, 10 classes; no download).

Reproduces the qualitative result of Frankle & Carbin (2019) with
:func:`leantorch.compress.prune.lottery.find_ticket`: iterative magnitude pruning, rewinding
the survivors to their initial weights after every round, finds sparse sub-networks
("winning tickets") that train to the dense network's accuracy at 10-20% of the weights and
below, while the same masks with a random re-initialisation (the paper's control) do worse.

Models: an MLP 64-300-100-10 (the paper's LeNet-300-100 on 8x8 inputs) and a small CNN
(conv 16, conv 32, max-pool, fc 64, fc 10). Training: Adam, lr 1.2e-3, batch 60, a fixed
number of steps per round, on 1000 training images; validation accuracy (257 images) is
checked every 50 steps for the early-stopping step; test accuracy on the 540 held-out images
at the end of training is the headline number. Pruning: layer-wise, 20% of the surviving
weights of every layer per round (convolutions 10%, the output layer 10%, as in the paper).
Several seeds; the JSON keeps every run, the figure shows mean and min-max over seeds.

Writes ``benchmarks/results/lottery.json`` and ``benchmarks/results/lottery.png``.
Run from the repository root:
``flock /tmp/leantorch-bench.lock .venv/bin/python benchmarks/lottery.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from _common import RESULTS_DIR, machine_info, setup_threads, write_results
from leantorch.compress.prune.lottery import find_ticket

# The script reports accuracy, not time; these tiny models train faster, and reproducibly,
# on one thread (the house's 2-thread rule is for timings).
THREADS = 1
LR, BATCH, EVAL_EVERY = 1.2e-3, 60, 50


def digits_split() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fixed split of the 1797 digits: 1000 train, 257 validation, 540 test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    x, y = x[order], y[order]
    return {"train": (x[:1000], y[:1000]), "val": (x[1000:1257], y[1000:1257]),
            "test": (x[1257:], y[1257:])}


class MLP(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Flatten(), nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100),
                         nn.ReLU(), nn.Linear(100, 10))


class CNN(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


MODELS: dict[str, dict[str, Any]] = {
    # layer_rates: glob over module paths -> rate per round (first match wins)
    "mlp": {"build": MLP, "layer_rates": {"5": 0.1}},
    "cnn": {"build": CNN, "layer_rates": {"1": 0.1, "3": 0.1, "9": 0.1}},
}


def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    x, y = data
    was_training = model.training
    model.eval()
    with torch.no_grad():
        correct = (model(x).argmax(1) == y).float().mean().item()
    model.train(was_training)
    return correct


def make_trainer(data: dict[str, tuple[torch.Tensor, torch.Tensor]], seed: int,
                 log: dict[int, dict[str, Any]]) -> Callable[[nn.Module, range], None]:
    """``train(model, steps)``: Adam on shuffled mini-batches; the batch order depends only on
    (seed, step), so the ticket and its control see the same data. Records the best
    validation accuracy and its step in ``log[id(model)]``."""
    x, y = data["train"]

    def train(model: nn.Module, steps: range) -> None:
        optimizer = torch.optim.Adam(model.parameters(), lr=LR)
        record = log.setdefault(id(model), {})
        if record.get("next_step") != steps.start:  # a new run, not the rest of round 0
            record.update(best_val=-1.0, best_step=None, test_at_best=None)
        record["next_step"] = steps.stop
        model.train()
        per_epoch = len(y) // BATCH
        order = None
        for step in steps:
            epoch, index = divmod(step, per_epoch)
            if order is None or index == 0:
                order = torch.randperm(len(y), generator=torch.Generator().manual_seed(
                    seed * 100_003 + epoch))
            batch = order[index * BATCH:(index + 1) * BATCH]
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
            if (step + 1) % EVAL_EVERY == 0:
                val = accuracy(model, data["val"])
                if val > record["best_val"]:  # the paper's early-stopping point
                    record.update(best_val=val, best_step=step + 1,
                                  test_at_best=accuracy(model, data["test"]))

    return train


def run(name: str, seed: int, rounds: int, steps: int, rewind_step: int,
        data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    spec = MODELS[name]
    torch.manual_seed(seed)
    model = spec["build"]()
    log: dict[int, dict[str, Any]] = {}

    def evaluate(m: nn.Module) -> dict[str, Any]:
        record = log.get(id(m), {})
        return {"test": accuracy(m, data["test"]), "best_val": record.get("best_val"),
                "early_stop_step": record.get("best_step"),
                "test_at_early_stop": record.get("test_at_best")}

    result = find_ticket(model, make_trainer(data, seed, log), steps=steps, rounds=rounds,
                         rate=0.2, rewind_step=rewind_step, scope="layer",
                         layer_rates=spec["layer_rates"], evaluate=evaluate,
                         control_seed=10_000 * (seed + 1))
    return {"model": name, "seed": seed, "rewind_step": rewind_step, **result.to_dict()}


METRICS = ("test", "test_at_early_stop", "early_stop_step")


def summarize_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round: density, and over seeds each metric of the tickets and the controls."""
    rows = []
    for index in range(len(runs[0]["history"])):
        entries = [r["history"][index] for r in runs]
        row = {"round": index, "density": entries[0]["density"]}
        for metric in METRICS:
            row[f"ticket_{metric}"] = stats([e["metrics"][metric] for e in entries])
            if entries[0]["control_metrics"] is not None:
                row[f"control_{metric}"] = stats([e["control_metrics"][metric]
                                                  for e in entries])
        rows.append(row)
    return rows


def stats(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "min": round(min(values), 4), "max": round(max(values), 4), "n": len(values)}


def verdict(summary: list[dict[str, Any]], metric: str, low: float = 0.1,
            high: float = 0.2) -> dict[str, Any]:
    """The paper's claim at the rounds whose density is in [low, high], over seeds: the ticket
    "matches" the dense network when their means differ by at most two standard errors of the
    difference; the control is "below the ticket" when it trails by more than that."""
    dense = summary[0][f"ticket_{metric}"]
    out = {"metric": metric, "dense_mean": dense["mean"], "dense_std": dense["std"],
           "rule": "match: |ticket - dense| <= 2 SE; control below: ticket - control > 2 SE "
                   "(SE = sqrt(s1^2/n1 + s2^2/n2) over seeds)",
           "rounds": []}
    for r in summary:
        if not low <= r["density"] <= high:
            continue
        ticket, control = r[f"ticket_{metric}"], r[f"control_{metric}"]
        se_dense = two_se(ticket, dense)
        se_control = two_se(ticket, control)
        out["rounds"].append({
            "density": round(r["density"], 4),
            "ticket_mean": ticket["mean"], "ticket_std": ticket["std"],
            "control_mean": control["mean"], "control_std": control["std"],
            "ticket_minus_dense": round(ticket["mean"] - dense["mean"], 4),
            "control_minus_dense": round(control["mean"] - dense["mean"], 4),
            "two_se_ticket_vs_dense": round(se_dense, 4),
            "two_se_ticket_vs_control": round(se_control, 4),
            "ticket_matches_dense": abs(ticket["mean"] - dense["mean"]) <= se_dense,
            "control_below_ticket": ticket["mean"] - control["mean"] > se_control,
        })
    return out


def two_se(a: dict[str, float], b: dict[str, float]) -> float:
    return 2 * (a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"]) ** 0.5


def plot(summaries: dict[str, list[dict[str, Any]]], path, rewind_step: int = 0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    metrics = {"test": "test accuracy, end of training",
               "test_at_early_stop": "test accuracy at early stop"}
    fig, axes = plt.subplots(len(metrics), len(summaries),
                             figsize=(5.5 * len(summaries), 3.8 * len(metrics)), squeeze=False)
    for col, (key, summary) in enumerate(summaries.items()):
        pct = [100 * r["density"] for r in summary]
        for row, (metric, ylabel) in enumerate(metrics.items()):
            ax = axes[row][col]
            for label, who, color in (("winning ticket (rewound)", "ticket", "C0"),
                                      ("same mask, random re-init", "control", "C3")):
                field = f"{who}_{metric}"
                points = [(p, r[field]) for p, r in zip(pct, summary, strict=True)
                          if field in r]
                xs = [p for p, _ in points]
                ax.plot(xs, [s["mean"] for _, s in points], marker="o", color=color,
                        label=label)
                ax.fill_between(xs, [s["min"] for _, s in points],
                                [s["max"] for _, s in points], color=color, alpha=0.2)
            dense = summary[0][f"ticket_{metric}"]
            ax.axhline(dense["mean"], color="black", linestyle="--", linewidth=1,
                       label=f"dense ({dense['mean']:.3f})")
            ax.axvspan(10, 20, color="grey", alpha=0.12)
            ax.set_xscale("log")
            ticks = [t for t in (100, 50, 30, 20, 10, 5, 2, 1) if t >= min(pct) * 0.9]
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.invert_xaxis()
            ax.set_xlabel("weights remaining (%)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"digits, {key} (mean, min-max over "
                         f"{summary[0]['ticket_test']['n']} seeds)", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8, loc="lower left")
    where = "their initial weights" if rewind_step == 0 else f"their weights at step {rewind_step}"
    fig.suptitle(f"Lottery tickets on sklearn digits: survivors rewound to {where} after every "
                 "round\n(each round prunes 20% of every layer; 10% of convolutions and the "
                 "output layer)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--rewind-step", type=int, default=0)
    parser.add_argument("--tag", default="", help="suffix of the result files (trial runs)")
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw the figure from the existing JSON, train nothing")
    options = parser.parse_args(argv)
    suffix = ("" if options.rewind_step == 0 else f"_rewind{options.rewind_step}") + \
        (f"_{options.tag}" if options.tag else "")
    if options.plot_only:
        saved = json.loads((RESULTS_DIR / f"lottery{suffix}.json").read_text())
        plot(saved["summary"], RESULTS_DIR / f"lottery{suffix}.png",
             saved["setup"]["rewind_step"])
        return
    threads = setup_threads(THREADS)
    started = time.perf_counter()
    load_before = list(os.getloadavg())
    data = digits_split()
    runs, summaries, verdicts = {}, {}, {}
    for name in options.models:
        runs[name] = []
        for seed in range(options.seeds):
            t0 = time.perf_counter()
            runs[name].append(run(name, seed, options.rounds, options.steps,
                                  options.rewind_step, data))
            last = runs[name][-1]["history"]
            print(f"{name} seed {seed}: dense {last[0]['metrics']['test']:.3f}, density "
                  f"{last[-1]['density']:.3f}: ticket {last[-1]['metrics']['test']:.3f} vs "
                  f"control {last[-1]['control_metrics']['test']:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        summaries[name] = summarize_runs(runs[name])
        verdicts[name] = {m: verdict(summaries[name], m)
                          for m in ("test", "test_at_early_stop")}
        for r in summaries[name]:
            line = f"  {name} density {r['density']:.3f}:"
            for metric in ("test", "test_at_early_stop"):
                line += f" | {metric}: ticket {r[f'ticket_{metric}']['mean']:.4f} +- " \
                        f"{r[f'ticket_{metric}']['std']:.4f}"
                if f"control_{metric}" in r:
                    control = r[f"control_{metric}"]
                    line += f", control {control['mean']:.4f} +- {control['std']:.4f}"
            print(line)
    payload = {
        "benchmark": "lottery",
        "description": "iterative magnitude pruning with rewinding to init on sklearn digits; "
                       "test accuracy of the winning ticket vs the same mask randomly "
                       "re-initialised, per round, over seeds",
        "setup": {"threads": threads, "lr": LR, "batch": BATCH, "steps": options.steps,
                  "rounds": options.rounds, "rate": 0.2, "rewind_step": options.rewind_step,
                  "seeds": options.seeds, "layer_rates": {k: MODELS[k]["layer_rates"]
                                                          for k in options.models},
                  "split": {"train": 1000, "val": 257, "test": 540},
                  "models": {k: str(MODELS[k]["build"]()) for k in options.models}},
        "machine": machine_info(),
        "load_average_before": load_before, "load_average_after": list(os.getloadavg()),
        "verdict_10_to_20_percent": verdicts, "summary": summaries, "runs": runs,
        "script_seconds": round(time.perf_counter() - started, 1),
    }
    plot(summaries, RESULTS_DIR / f"lottery{suffix}.png", options.rewind_step)
    path = write_results(f"lottery{suffix}", payload)
    print(f"wrote {path} in {payload['script_seconds']} s")


if __name__ == "__main__":
    main()
