"""The interleaved comparison's bookkeeping, on a fake clock: per-round ratios, quartiles,
rotated order, warm-up not counted. No test here asserts a wall-clock time."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from leantorch.errors import LeanError, LeanTypeError
from leantorch.measure import Spread, compare_interleaved


class FakeClock:
    """A clock that only moves when a fake candidate 'runs' for its scripted duration."""

    def __init__(self) -> None:
        self.now = 0.0
        self.log: list[str] = []

    def __call__(self) -> float:
        return self.now

    def candidate(self, name: str, durations_ms: list[float]):
        it = iter(durations_ms)

        def run() -> None:
            self.log.append(name)
            self.now += next(it) / 1e3
        return run


def test_ratios_are_taken_per_round_and_warmup_is_not_counted() -> None:
    clock = FakeClock()
    # two warm-up calls each, 1000 ms: a warm-up counted anywhere would show
    base = [1000, 1000, 10, 10, 40, 40]
    fast = [1000, 1000, 10, 5, 10, 40]
    result = compare_interleaved({"base": clock.candidate("base", base),
                                  "fast": clock.candidate("fast", fast)},
                                 rounds=4, warmup=2, clock=clock)
    assert clock.log[:4] == ["base", "fast", "base", "fast"]  # warm-up first, interleaved
    assert len(clock.log) == 2 * 2 + 4 * 2
    assert result["base"].samples_ms == pytest.approx((10, 10, 40, 40))
    assert result["fast"].samples_ms == pytest.approx((10, 5, 10, 40))
    # per-round ratios 1, 2, 4, 1: the median ratio is 1.5 where the ratio of the medians
    # (25 / 10) would say 2.5
    speed = result["fast"].speedup
    assert speed.median == pytest.approx(1.5)
    assert (speed.min, speed.max) == pytest.approx((1.0, 4.0))
    assert (speed.q1, speed.q3) == pytest.approx((1.0, 2.5))  # sorted 1,1,2,4, linear
    assert result["fast"].median_ms == pytest.approx(10.0)
    assert result["base"].median_ms == pytest.approx(25.0)
    assert result["base"].speedup == Spread(1.0, 1.0, 1.0, 1.0, 1.0)
    assert result.baseline == "base" and result.rounds == 4 and result.warmup == 2
    assert result.threads == torch.get_num_threads() and result.device == "cpu"


def test_the_order_rotates_every_round() -> None:
    clock = FakeClock()
    names = ["a", "b", "c"]
    fns = {n: clock.candidate(n, [1.0] * 20) for n in names}
    result = compare_interleaved(fns, rounds=4, warmup=1, clock=clock)
    assert result.orders == (("a", "b", "c"), ("b", "c", "a"), ("c", "a", "b"),
                             ("a", "b", "c"))
    assert clock.log[3:] == [n for order in result.orders for n in order]  # called as recorded
    # over len(names) rounds every candidate takes every position once
    for position in range(3):
        assert sorted(order[position] for order in result.orders[:3]) == names


def test_a_shuffled_order_is_a_permutation_per_round_and_reproducible() -> None:
    def orders(seed: int) -> tuple[tuple[str, ...], ...]:
        clock = FakeClock()
        fns = {n: clock.candidate(n, [1.0] * 30) for n in "abcd"}
        return compare_interleaved(fns, rounds=20, warmup=0, order="shuffle", seed=seed,
                                   clock=clock).orders

    first = orders(3)
    assert all(sorted(o) == list("abcd") for o in first)
    assert first == orders(3)
    assert len(set(first)) > 1  # not one fixed order


def test_the_baseline_can_be_any_candidate() -> None:
    clock = FakeClock()
    result = compare_interleaved({"x": clock.candidate("x", [6.0] * 3),
                                  "ref": clock.candidate("ref", [3.0] * 3)},
                                 baseline="ref", rounds=3, warmup=0, clock=clock)
    assert result["x"].speedup.median == pytest.approx(0.5)  # twice as slow as the reference
    assert result.to_dict()["baseline"] == "ref"
    assert result.to_dict()["candidates"]["x"]["speedup"]["median"] == pytest.approx(0.5)


def test_the_collector_is_paused_inside_a_round_and_restored() -> None:
    seen = []
    compare_interleaved({"f": lambda: seen.append(gc.isenabled())}, rounds=3, warmup=1)
    assert seen == [True, False, False, False]  # the warm-up runs as usual
    assert gc.isenabled()


def test_spread_matches_numpy_percentiles() -> None:
    values = np.random.default_rng(0).lognormal(size=17).tolist()
    s = Spread.of(values)
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    assert (s.q1, s.median, s.q3) == pytest.approx((q1, median, q3))
    assert (s.min, s.max) == (min(values), max(values))
    assert Spread.of([2.0]) == Spread(2.0, 2.0, 2.0, 2.0, 2.0)
    assert Spread(1.364, 1.31, 1.404, 1.2, 1.5).bracket() == "1.36x [1.31-1.40]"
    with pytest.raises(LeanError, match="non-empty"):
        Spread.of([])


def test_real_callables_give_typed_positive_times() -> None:
    x = torch.randn(64, 64)
    result = compare_interleaved({"mm": lambda: x @ x, "add": lambda: x + x}, rounds=3,
                                 warmup=1)
    for entry in result.candidates.values():
        assert len(entry.samples_ms) == 3 and all(t > 0 for t in entry.samples_ms)
        assert entry.latency.min <= entry.latency.q1 <= entry.latency.median \
            <= entry.latency.q3 <= entry.latency.max


@pytest.mark.parametrize("kwargs,error,fragment", [
    ({"fns": {}}, LeanError, "at least one callable"),
    ({"fns": [lambda: 0]}, LeanTypeError, "fns must be a mapping of name -> callable"),
    ({"fns": {"a": 3}}, LeanTypeError, "fns['a'] must be callable, got int"),
    ({"fns": {"a": int}, "baseline": "b"}, LeanError, "baseline 'b' is not one of"),
    ({"fns": {"a": int}, "rounds": 0}, LeanError, "rounds=0; expected an int >= 1"),
    ({"fns": {"a": int}, "warmup": -1}, LeanError, "warmup=-1; expected an int >= 0"),
    ({"fns": {"a": int}, "order": "random"}, LeanError,
     "order must be 'rotate' or 'shuffle', got 'random'"),
])
def test_bad_arguments_name_themselves(kwargs, error, fragment) -> None:
    with pytest.raises(error) as info:
        compare_interleaved(**kwargs)
    assert fragment in str(info.value)
