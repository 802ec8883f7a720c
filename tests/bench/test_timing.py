"""Latency statistics (oracle: hand-computed order statistics) and the timing loop's contract."""

from __future__ import annotations

import time

import pytest

from edgecompress.bench.env import environment
from edgecompress.bench.timing import CV_WARN, summarize, time_alternating, time_callable, unstable


def test_summary_statistics_by_hand():
    s = summarize([float(v) for v in range(100, 0, -1)])  # 1..100 ms, shuffled order does not matter
    assert s["median_ms"] == 50.5 and s["min_ms"] == 1.0 and s["max_ms"] == 100.0
    assert s["p90_ms"] == pytest.approx(90.1) and s["p99_ms"] == pytest.approx(99.01)
    assert s["iqr_ms"] == pytest.approx(75.25 - 25.75)
    assert s["mean_ms"] == 50.5 and s["cv"] == pytest.approx(28.866 / 50.5, abs=1e-3)
    assert s["iterations"] == 100


def test_time_callable_honours_iterations_and_seconds():
    calls = []
    stats = time_callable(
        lambda: calls.append(time.sleep(0.001)), min_seconds=0.05, min_iters=12, warmup_s=0.01
    )
    assert stats["iterations"] >= 12 and len(calls) >= stats["iterations"] + 2  # + at least two warm-up calls
    assert (
        1.0 <= stats["min_ms"] <= stats["median_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= stats["max_ms"]
    )


def test_max_seconds_caps_slow_callables():
    stats = time_callable(
        lambda: time.sleep(0.002), min_seconds=0.0, min_iters=10_000, warmup_s=0, max_seconds=0.05
    )
    assert stats["capped"] and 10 <= stats["iterations"] < 10_000


def test_alternation_times_every_callable_equally_often():
    a, b = time_alternating(
        [lambda: None, lambda: time.sleep(0.0005)], min_seconds=0.02, min_iters=7, warmup_s=0
    )
    assert a["iterations"] == b["iterations"] >= 7 and b["median_ms"] > a["median_ms"]


def test_unstable_warning_threshold():
    assert unstable(summarize([10.0] * 50)) is None
    noisy = summarize([10.0, 10.0, 10.0, 20.0] * 10)
    assert noisy["cv"] > CV_WARN and "coefficient of variation" in unstable(noisy)


def test_environment_is_captured():
    env = environment(threads=3)
    assert env["threads"] == 3 and env["cpu"]["model"] and env["cpu"]["logical_cores"] >= 1
    assert (
        isinstance(env["cpu"]["flags"], list)
        and env["libraries"]["onnxruntime"]
        and env["libraries"]["torch"]
    )
