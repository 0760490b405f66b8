"""Wall-clock latency: median, min and max over timed runs after warm-up, threads stated."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from leantorch.errors import LeanError

__all__ = ["Latency", "time_callable"]


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
