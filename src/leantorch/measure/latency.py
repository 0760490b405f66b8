"""Wall-clock latency: median, min and max over timed runs after warm-up, threads stated; and
the interleaved comparison that every printed speedup comes from.

A speedup is a ratio of two times. Timed one after the other, minutes apart, the two times see
different machines (another process, a turbo clock, a cold cache), and the ratio carries that
drift. :func:`compare_interleaved` times the candidates in alternating rounds instead (each round
calls every candidate once, in a rotated order), takes the ratio to the baseline *within* each
round, and reports the median ratio with its quartiles, so the spread says how far to trust it.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from leantorch.errors import LeanError, LeanTypeError, describe
from leantorch.validate import positive_int

__all__ = ["CandidateTiming", "Comparison", "Latency", "Spread", "compare_interleaved",
           "time_callable"]


@dataclass(frozen=True)
class Latency:
    """Timing of one callable. All times in milliseconds."""

    median_ms: float
    min_ms: float
    max_ms: float
    q1_ms: float
    q3_ms: float
    runs: int
    warmup: int
    threads: int
    device: str
    what: str

    def to_dict(self) -> dict[str, object]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def time_callable(
    fn: Callable[[], object],
    runs: int = 10,
    warmup: int = 3,
    device: str | torch.device = "cpu",
    what: str = "forward",
) -> Latency:
    """Call ``fn`` ``warmup`` times, then time ``runs`` calls (synchronising CUDA around each).

    The thread count reported is ``torch.get_num_threads()`` at the time of the call: set it
    before timing (``torch.set_num_threads``) for comparable numbers.
    """
    if not isinstance(runs, int) or runs < 1:
        raise LeanError(f"runs must be an integer >= 1, got {runs!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise LeanError(f"warmup must be an integer >= 0, got {warmup!r}")
    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    q1, _, q3 = statistics.quantiles(times, n=4) if runs > 1 else (times[0], 0, times[0])
    return Latency(
        median_ms=statistics.median(times),
        min_ms=min(times),
        max_ms=max(times),
        q1_ms=q1,
        q3_ms=q3,
        runs=runs,
        warmup=warmup,
        threads=torch.get_num_threads(),
        device=str(device),
        what=what,
    )


# --------------------------------------------------------------------------- interleaved
@dataclass(frozen=True)
class Spread:
    """Median, quartiles and extremes of a sample. Quartiles interpolate linearly between
    order statistics (numpy's default ``percentile``), so they stay within ``[min, max]``."""

    median: float
    q1: float
    q3: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        """The spread of ``values`` (a non-empty sequence of numbers; order does not matter)."""
        if not values:
            raise LeanError("Spread.of: values must be a non-empty sequence of numbers, got []")
        ordered = sorted(float(v) for v in values)
        if len(ordered) == 1:
            v = ordered[0]
            return cls(v, v, v, v, v)
        q1, median, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
        return cls(median, q1, q3, ordered[0], ordered[-1])

    def to_dict(self) -> dict[str, float]:
        """``{"median", "q1", "q3", "min", "max"}`` as a dict."""
        return asdict(self)

    def bracket(self, suffix: str = "x", digits: int = 2) -> str:
        """``"1.36x [1.31-1.40]"``: the median, then the quartiles."""
        f = f"{{:.{digits}f}}"
        return (f"{f.format(self.median)}{suffix} "
                f"[{f.format(self.q1)}-{f.format(self.q3)}]")


@dataclass(frozen=True)
class CandidateTiming:
    """One candidate of an interleaved comparison.

    ``samples_ms[r]`` is its time in round ``r``; ``speedup`` summarises the per-round ratios
    ``baseline_ms[r] / samples_ms[r]`` (above 1: faster than the baseline; exactly 1 for the
    baseline itself).
    """

    name: str
    samples_ms: tuple[float, ...]
    latency: Spread
    speedup: Spread

    @property
    def median_ms(self) -> float:
        """The median time over the rounds, in milliseconds."""
        return self.latency.median

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict: median, latency spread, speedup spread and every sample."""
        return {"median_ms": self.latency.median, "latency_ms": self.latency.to_dict(),
                "speedup": self.speedup.to_dict(), "samples_ms": list(self.samples_ms)}


@dataclass(frozen=True)
class Comparison:
    """The result of :func:`compare_interleaved`: one :class:`CandidateTiming` per candidate
    (in the order given), and how they were timed. ``orders[r]`` is the calling order of round
    ``r``."""

    baseline: str
    candidates: dict[str, CandidateTiming]
    rounds: int
    warmup: int
    threads: int
    device: str
    order: str
    orders: tuple[tuple[str, ...], ...]

    def __getitem__(self, name: str) -> CandidateTiming:
        return self.candidates[name]

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict: how the rounds ran and each candidate's
        :meth:`CandidateTiming.to_dict` (the per-round calling orders are left out)."""
        return {"baseline": self.baseline, "rounds": self.rounds, "warmup": self.warmup,
                "threads": self.threads, "device": self.device, "order": self.order,
                "candidates": {k: v.to_dict() for k, v in self.candidates.items()}}


# a ratio's denominator is at least 1 ns: a clock too coarse to see a call must not divide by 0
_MIN_MS = 1e-6


def compare_interleaved(
    fns: Mapping[str, Callable[[], object]],
    baseline: str | None = None,
    *,
    rounds: int = 10,
    warmup: int = 2,
    device: str | torch.device = "cpu",
    order: str = "rotate",
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> Comparison:
    """Time every callable in ``fns`` in ``rounds`` alternating rounds, one process, after
    ``warmup`` untimed calls of each; return per-candidate medians and the spread of the
    per-round ratio to ``baseline`` (default: the first name).

    Each round calls every candidate once. ``order="rotate"`` starts round ``r`` at candidate
    ``r mod n`` (so over ``n`` rounds each candidate takes each position once and none always
    runs first or after the same neighbour); ``order="shuffle"`` draws a random order per round
    from ``seed``. Garbage is collected before each round and the collector is paused inside
    it, so no candidate pays for another's garbage. On CUDA the device is synchronised before
    and after each call. ``clock`` (seconds) exists for tests.

    The thread count reported is ``torch.get_num_threads()`` at the call: set it first.
    """
    if not isinstance(fns, Mapping):
        raise LeanTypeError(f"compare_interleaved: fns must be a mapping of name -> callable, "
                            f"got {describe(fns)}")
    if not fns:
        raise LeanError("compare_interleaved: fns must name at least one callable, got {}")
    for name, fn in fns.items():
        if not callable(fn):
            raise LeanTypeError(f"compare_interleaved: fns[{name!r}] must be callable, got "
                                f"{type(fn).__name__}")
    names = list(fns)
    baseline = names[0] if baseline is None else baseline
    if baseline not in fns:
        raise LeanError(f"compare_interleaved: baseline {baseline!r} is not one of the "
                        f"candidates {names}")
    positive_int("compare_interleaved", "rounds", rounds)
    positive_int("compare_interleaved", "warmup", warmup, minimum=0)
    if order not in ("rotate", "shuffle"):
        raise LeanError(f"compare_interleaved: order must be 'rotate' or 'shuffle', got "
                        f"{order!r}")
    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync()
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {name: [] for name in names}
    orders = []
    for index in range(rounds):
        if order == "rotate":
            shift = index % len(names)
            this_round = names[shift:] + names[:shift]
        else:
            this_round = rng.sample(names, len(names))
        orders.append(tuple(this_round))
        gc.collect()
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            for name in this_round:
                sync()
                start = clock()
                fns[name]()
                sync()
                samples[name].append((clock() - start) * 1e3)
        finally:
            if was_enabled:
                gc.enable()
    base = samples[baseline]
    candidates = {}
    for name in names:
        ratios = [1.0 if name == baseline else b / max(t, _MIN_MS)
                  for b, t in zip(base, samples[name], strict=True)]
        candidates[name] = CandidateTiming(name, tuple(samples[name]), Spread.of(samples[name]),
                                           Spread.of(ratios))
    return Comparison(baseline, candidates, rounds, warmup, torch.get_num_threads(),
                      str(device), order, tuple(orders))
