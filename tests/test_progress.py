"""Progress lines (oracle: a fake clock; exact text)."""

from __future__ import annotations

import io

import edgecompress.progress as progress
from edgecompress.progress import Progress


def test_lines_are_throttled_and_the_last_one_closes(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    out = io.StringIO()
    p = Progress("adalog calibration, unit", 4, every_s=10.0, stream=out)
    for label, t in (("a", 3.0), ("b", 12.0), ("c", 15.0), ("d", 20.0)):
        now[0] = t
        p.step(label)
    assert out.getvalue().splitlines() == [
        "edgecompress: adalog calibration, unit: 2/4 b (12 s, ETA 12 s)",
        "edgecompress: adalog calibration, unit: 4/4 d (20 s, ETA 0 s)",
    ]


def test_short_runs_print_nothing(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    out = io.StringIO()
    p = Progress("x", 3, every_s=10.0, stream=out)
    for t in (1.0, 2.0, 3.0):
        now[0] = t
        p.step()
    assert out.getvalue() == ""
