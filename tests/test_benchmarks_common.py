"""benchmarks/_common.py: the machine block every result file gets, and --repeat's spread of a
ratio across whole reruns (on a fake clock: no test asserts a time)."""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import sys
from pathlib import Path

import pytest

from leantorch.errors import LeanError
from leantorch.measure import machine_info

# the benchmark scripts import their helpers as a top-level module, from their own folder
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
_common = importlib.import_module("_common")


def test_every_result_file_gets_the_library_machine_block() -> None:
    info = _common.machine_info()
    assert json.loads(json.dumps(info)) == info
    library = machine_info()
    for key in library:  # the same block as report.json's, key for key
        assert info[key] == library[key], key
    # and what the renderers of older result files read
    assert {"cpu_model", "cpu_count", "torch", "torch_num_threads"} <= set(info)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_repeat_reruns_the_whole_comparison_and_spreads_the_ratio(monkeypatch) -> None:
    clock = Clock()
    # the benchmarks time through the library's compare_interleaved: give it the fake clock
    monkeypatch.setattr(_common, "compare_interleaved",
                        functools.partial(_common.compare_interleaved, clock=clock))
    # base takes 4 s on every call; the candidate's calls take 1, 2, then 4 s per run
    # (3 warm-up calls + 3 rounds per run), so its per-run speedups are 4, 2 and 1
    script = iter([9.0, 9.0, 9.0, 1.0, 1.0, 1.0] + [9.0] * 3 + [2.0] * 3 + [9.0] * 3 + [4.0] * 3)
    calls = {"base": 0, "fast": 0}

    def make(name: str):
        def run() -> None:
            calls[name] += 1
            clock.now += 4.0 if name == "base" else next(script)
        return run

    times, spread = _common.repeated_timings({"base": make("base"), "fast": make("fast")},
                                             "base", warmup=3, rounds=3, repeats=3)
    assert calls == {"base": 18, "fast": 18}  # each run has its own warm-up
    assert times["fast"] == [1.0, 1.0, 1.0]  # the first run's times, as before
    assert spread["repeats"] == 3
    assert spread["per_round"]["fast"]["median"] == 4.0
    across = spread["across_repeats"]["fast"]
    assert across["values"] == [4.0, 2.0, 1.0]
    assert (across["median"], across["q1"], across["q3"]) == (2.0, 1.5, 3.0)
    assert (across["min"], across["max"]) == (1.0, 4.0)
    assert spread["across_repeats"]["base"]["values"] == [1.0, 1.0, 1.0]


def test_one_run_has_no_spread_across_repeats_and_zero_runs_is_refused() -> None:
    times, spread = _common.repeated_timings({"a": lambda: None}, "a", warmup=0, rounds=2)
    assert len(times["a"]) == 2 and spread["across_repeats"] is None
    with pytest.raises(LeanError, match="--repeat must be an integer >= 1, got 0"):
        _common.repeated_timings({"a": lambda: None}, "a", warmup=0, rounds=1, repeats=0)
    parser = argparse.ArgumentParser()
    _common.add_repeat_option(parser)
    assert parser.parse_args(["--repeat", "4"]).repeat == 4
    assert parser.parse_args([]).repeat == 1
