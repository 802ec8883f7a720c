"""Wall-clock latency of callables: time-based warm-up, then a time- and count-bounded loop.

The method (trtexec-style, printed with every number): warm up for ``warmup_s`` seconds (at least
two calls), then time single calls until at least ``min_iters`` calls *and* ``min_seconds`` have
passed, stopping early only at ``max_seconds`` (the result then says ``capped``). Report the
median, p90, p99, mean, min, max, the interquartile range and the coefficient of variation
(std / mean). CPU timing uses ``time.perf_counter``; with ``cuda=True`` each call is timed with
CUDA events and synchronized. :func:`time_alternating` runs several callables round-robin in one
process, so drifts in machine load hit all of them alike (the way to compare A with B).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

CV_WARN = 0.05  # coefficient of variation above which a measurement is called unstable


def _cuda_timer() -> Callable[[Callable[[], object]], float]:
    import torch

    def timed(fn: Callable[[], object]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))

    return timed


def _cpu_timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def summarize(times_ms: Sequence[float], capped: bool = False) -> dict:
    """Latency statistics (milliseconds) of one series of timed calls."""
    ts = sorted(times_ms)
    n = len(ts)
    mean = statistics.fmean(ts)
    q = statistics.quantiles(ts, n=100, method="inclusive") if n > 1 else [ts[0]] * 99
    std = statistics.pstdev(ts)
    return {
        "median_ms": round(statistics.median(ts), 4),
        "p90_ms": round(q[89], 4),
        "p99_ms": round(q[98], 4),
        "mean_ms": round(mean, 4),
        "min_ms": round(ts[0], 4),
        "max_ms": round(ts[-1], 4),
        "iqr_ms": round(q[74] - q[24], 4),
        "cv": round(std / mean, 4) if mean else 0.0,
        "iterations": n,
        "capped": capped,
    }


def _warmup(fns: Sequence[Callable[[], object]], warmup_s: float) -> None:
    end = time.perf_counter() + warmup_s
    calls = 0
    while calls < 2 or time.perf_counter() < end:
        for fn in fns:
            fn()
        calls += 1


def time_alternating(
    fns: Sequence[Callable[[], object]],
    min_seconds: float = 3.0,
    min_iters: int = 100,
    warmup_s: float = 1.0,
    max_seconds: float = 120.0,
    cuda: bool = False,
) -> list[dict]:
    """Time ``fns`` round-robin (A, B, A, B, …); one statistics dict per callable."""
    timed = _cuda_timer() if cuda else _cpu_timed
    _warmup(fns, warmup_s)
    series: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    capped = False
    while len(series[0]) < min_iters or time.perf_counter() - start < min_seconds:
        if time.perf_counter() - start > max_seconds and len(series[0]) >= 10:
            capped = True
            break
        for k, fn in enumerate(fns):
            series[k].append(timed(fn))
    return [summarize(s, capped) for s in series]


def time_callable(
    fn: Callable[[], object],
    min_seconds: float = 1.0,
    min_iters: int = 20,
    warmup_s: float = 0.3,
    max_seconds: float = 120.0,
    cuda: bool = False,
) -> dict:
    """Median/p90/p99/mean/min/max/IQR in milliseconds and the coefficient of variation of ``fn()``.

    Runs ``fn`` for ``warmup_s`` seconds untimed, then until both ``min_seconds`` have passed and
    ``min_iters`` calls were timed (or ``max_seconds``, with at least 10 calls).
    """
    return time_alternating([fn], min_seconds, min_iters, warmup_s, max_seconds, cuda)[0]


def unstable(stats: dict) -> str | None:
    """A warning line when the coefficient of variation is above :data:`CV_WARN`, else None."""
    if stats["cv"] > CV_WARN:
        return (
            f"unstable timing: coefficient of variation {stats['cv'] * 100:.1f}% > {CV_WARN * 100:.0f}% "
            "(other load on the machine? frequency scaling?)"
        )
    return None
