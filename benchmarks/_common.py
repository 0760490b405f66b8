"""Shared helpers of the benchmark scripts: thread setup, machine info, interleaved timing and
result writing.

Every benchmark sets the thread count explicitly, times leantorch and the thing it is compared
with side by side in one process (interleaved, after warm-up), reports medians and ratios, and
writes ``benchmarks/results/<name>.json`` with what it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from leantorch.errors import LeanError
from leantorch.io import atomic_write_text
from leantorch.measure import hardware
from leantorch.measure.latency import Spread, compare_interleaved

THREADS = 2
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def setup_threads(threads: int = THREADS) -> int:
    """Pin intra-op threads to ``threads`` (the house rule: always explicit)."""
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: the library's machine block (``cpu`` with the model,
    core counts and matrix features, ``torch_cpu_capability``, ``threads``...; the same block
    ``leantorch compress`` writes into report.json), plus the keys older result files and
    their renderers use (``cpu_model``, ``cpu_count``, ``torch_num_threads``...) and package
    versions. Call it after ``setup_threads``: the thread count is read at the call."""
    return {
        **hardware.machine_info(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "packages": {name: _version(name) for name in (
            "leantorch", "transformers", "fvcore", "torch-pruning", "numpy")},
    }


def interleaved_timings(
    fns: Mapping[str, Callable[[], Any]], warmup: int, rounds: int
) -> dict[str, list[float]]:
    """Seconds per call of each function, round by round: the library's
    :func:`leantorch.measure.compare_interleaved` (``warmup`` untimed calls of each, then
    ``rounds`` rounds calling every function once, the order rotating from round to round), as
    the raw per-round samples the scripts summarise themselves."""
    comparison = compare_interleaved(fns, rounds=rounds, warmup=warmup)
    return {name: [ms / 1e3 for ms in timing.samples_ms]
            for name, timing in comparison.candidates.items()}


def ratio_spread(times: Mapping[str, Sequence[float]], baseline: str) -> dict[str, dict[str, float]]:
    """Per name, the spread (median, q1, q3, min, max) of the per-round ratio
    ``baseline / name`` of an :func:`interleaved_timings` result: its rounds line up, so each
    ratio compares two times taken moments apart."""
    base = times[baseline]
    return {name: Spread.of([b / max(t, 1e-12) for b, t in zip(base, samples, strict=True)]
                            ).to_dict() for name, samples in times.items()}


def add_repeat_option(parser: argparse.ArgumentParser) -> None:
    """``--repeat N``: run the whole timed comparison N times (see :func:`repeated_timings`)."""
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run the whole timed comparison N times (warm-up included) and "
                        "report the spread of each speedup across the runs (default 1)")


def repeated_timings(
    fns: Mapping[str, Callable[[], Any]], baseline: str, warmup: int, rounds: int,
    repeats: int = 1,
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Run :func:`interleaved_timings` ``repeats`` times, each a whole comparison with its own
    warm-up. Returns the first run's times (what a script reports as before) and a summary::

        {"repeats": n,
         "per_round": {name: spread of the per-round ratio baseline / name, first run},
         "across_repeats": {name: {"values": [speedup of each run], median, q1, q3, min, max}}
                           (None when repeats == 1)}

    where a run's speedup is the ratio of the medians, baseline / name. The per-round spread
    says how noisy one run is; the across-repeats spread says how far a rerun of the script
    would move the number."""
    if repeats < 1:
        raise LeanError(f"--repeat must be an integer >= 1, got {repeats!r}")
    runs = [interleaved_timings(fns, warmup=warmup, rounds=rounds) for _ in range(repeats)]
    across = None
    if repeats > 1:
        across = {}
        for name in fns:
            values = [statistics.median(run[baseline]) / statistics.median(run[name])
                      for run in runs]
            across[name] = {"values": [round(v, 4) for v in values],
                            **Spread.of(values).to_dict()}
    return runs[0], {"repeats": repeats, "per_round": ratio_spread(runs[0], baseline),
                     "across_repeats": across}


def summarize(samples: list[float]) -> dict[str, Any]:
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "samples_s": [round(s, 6) for s in samples],
    }


def ratio(numerator: float | None, denominator: float | None, digits: int = 4) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, digits)


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``benchmarks/results/<name>.json`` atomically and return the path."""
    path = RESULTS_DIR / f"{name}.json"
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    return path


DOC_START, DOC_END = "<!-- measured:start -->", "<!-- measured:end -->"


def write_doc_section(doc: Path, body: str) -> bool:
    """Replace the measured section of ``doc`` (between ``DOC_START`` and ``DOC_END``) with
    ``body``, atomically, leaving the rest of the file alone. Returns False (and says so) when
    the file has no such section."""
    text = doc.read_text()
    if DOC_START not in text or DOC_END not in text:
        print(f"{doc} has no {DOC_START} ... {DOC_END} section; not rewritten")
        return False
    head, rest = text.split(DOC_START, 1)
    tail = rest.split(DOC_END, 1)[1]
    atomic_write_text(doc, f"{head}{DOC_START}\n{body}\n{DOC_END}{tail}")
    print(f"rewrote the measured section of {doc}")
    return True


def error_text(error: BaseException, limit: int = 500) -> str:
    """One line saying what went wrong, for a result file."""
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message[:limit]}"
