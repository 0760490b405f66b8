"""Shared helpers of the benchmark scripts: thread setup, machine info, interleaved timing and
result writing.

Every benchmark sets the thread count explicitly, times leantorch and the thing it is compared
with side by side in one process (interleaved, after warm-up), reports medians and ratios, and
writes ``benchmarks/results/<name>.json`` with what it ran on.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from leantorch.io import atomic_write_text

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
    """What the numbers were measured on."""
    return {
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
    """Seconds per call of each function: ``warmup`` untimed calls of each, then ``rounds``
    rounds that call every function once, the order rotating from round to round so no
    function always runs first (or right after the same neighbour)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


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
