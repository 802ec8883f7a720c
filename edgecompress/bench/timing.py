"""Wall-clock latency of a callable: time-based warm-up, then a time- and count-bounded loop."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def time_callable(
    fn: Callable[[], object], min_seconds: float = 1.0, min_iters: int = 20, warmup_s: float = 0.3
) -> dict:
    """Median/p90/mean/min in milliseconds and the coefficient of variation of ``fn()``.

    Runs ``fn`` for ``warmup_s`` seconds untimed, then until both ``min_seconds`` have passed and
    ``min_iters`` calls were timed.
    """
    end = time.perf_counter() + warmup_s
    while time.perf_counter() < end:
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    mean = statistics.fmean(times)
    return {
        "median_ms": round(statistics.median(times), 4),
        "p90_ms": round(times[min(len(times) - 1, int(0.9 * len(times)))], 4),
        "mean_ms": round(mean, 4),
        "min_ms": round(times[0], 4),
        "cv": round(statistics.pstdev(times) / mean, 4) if mean else 0.0,
        "iterations": len(times),
    }
