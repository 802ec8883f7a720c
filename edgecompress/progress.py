"""Progress lines for long loops: ``edgecompress: adalog: unit 7/24 blocks.2.attn (41 s, ETA 1m40s)``.

Printed on stderr by rank 0 only, at most every ``every_s`` seconds (so short runs stay quiet), and
the last item once anything was printed. The ETA assumes the remaining items cost what the done
ones did on average.
"""

from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s} s"


class Progress:
    def __init__(self, what: str, total: int, every_s: float = 10.0, stream=None):
        from edgecompress.train import process_rank

        self.what, self.total, self.every_s = what, total, every_s
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = process_rank() != 0
        self.done, self.start = 0, time.perf_counter()
        self.last = self.start
        self.printed = 0

    def line(self, label: str) -> str:
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(self.done, 1) * (self.total - self.done)
        return f"edgecompress: {self.what}: {self.done}/{self.total} {label} ({_clock(elapsed)}, ETA {_clock(eta)})"

    def step(self, label: str = "") -> None:
        """One item done; print a line when ``every_s`` passed since the last one (or at the end)."""
        self.done += 1
        now = time.perf_counter()
        due = now - self.last >= self.every_s or (self.done == self.total and self.printed)
        if due and not self.quiet:
            print(self.line(label), file=self.stream, flush=True)
            self.last, self.printed = now, self.printed + 1
