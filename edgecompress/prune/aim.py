"""Making a ``latency`` budget hit its target on the whole model, measured (field ``latency_rounds``).

The per-group ORT table (:mod:`.latency`) times each group alone; in the whole model the time that
narrowing a group saves can differ (measured: on the 1.9 ms vit-digits the table's prediction was
17 % optimistic, on MiniLM and DeiT-S within 10 %). So, as a Torch-Pruning / ModelOpt user expects
of a latency constraint, the pass checks the real model:

* **Target.** With ``L`` the dense model's ORT latency and ``S`` the table's total for the prunable
  groups (both at the table's shape: ``latency_batch`` samples of ``latency_seq`` tokens, images as
  calibrated), ``latency: f`` asks for the pruned / dense ratio ``t = 1 − f · min(1, S / L)``: the
  fraction ``f`` of the groups' share of the model's time is removed; the rest of the model stays.
* **Rounds.** The allocation (DP or uniform) is solved at an effective budget ``f₀ = f``; a copy of
  the model is shrunk to it (no recovery: it does not change shapes), exported (TorchScript ONNX)
  and timed against the dense graph alternately in one run (:func:`edgecompress.bench.timing.
  time_alternating`, ``latency_seconds``), giving the measured ratio ``m``. If ``|m / t − 1| ≤``
  :data:`TOLERANCE` the round is kept; otherwise the next budget assumes the measured saving is
  proportional to the tabled one (first correction: ``f₁ = f₀ (1 − t) / (1 − m₀)``) and then follows
  the secant through the last two rounds (exact when the saving is affine in the budget), clipped to
  what any allocation can remove. After ``latency_rounds`` rounds the round closest to ``t`` is kept.
  ``latency_rounds: 0`` uses the table alone. Every round is listed in the report.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

TOLERANCE = 0.05  # |measured / target − 1| accepted without another round (half the 10 % goal)
LOWEST = 1e-3  # the smallest effective budget tried


@dataclass(frozen=True)
class Round:
    budget: float  # the effective budget the allocation was solved at
    ratio: float  # measured pruned / dense ORT latency
    dense_ms: float

    def error(self, target: float) -> float:
        return abs(self.ratio / target - 1.0)


def target_ratio(budget: float, table_total: float, dense_ms: float) -> float:
    """``1 − f · min(1, S / L)``: the whole-model latency ratio that removes ``f`` of the groups' share."""
    return 1.0 - budget * min(1.0, table_total / dense_ms)


def next_budget(rounds: list[Round], target: float, highest: float) -> float:
    """The next effective budget (see the module docstring), in ``[LOWEST, highest]``."""
    last = rounds[-1]
    want = 1.0 - target  # the saving asked for, as a fraction of the dense latency
    if len(rounds) >= 2 and rounds[-2].ratio != last.ratio and rounds[-2].budget != last.budget:
        prev = rounds[-2]
        slope = (last.ratio - prev.ratio) / (last.budget - prev.budget)
        f = last.budget + (target - last.ratio) / slope if slope < 0 else highest
    else:
        saved = 1.0 - last.ratio
        f = last.budget * want / saved if saved > 0 else highest
    return float(np.clip(f, LOWEST, highest))


def aim(
    budget: float,
    table_total: float,
    highest: float,
    measure: Callable[[float], tuple[float, float]],
    rounds: int,
) -> tuple[float, list[dict]]:
    """Run the rounds: ``measure(f)`` allocates at effective budget ``f`` and returns the measured
    ``(pruned / dense ratio, dense ms)``. Returns the kept round's budget and a record of every round."""
    done: list[Round] = []
    f, target = min(budget, highest), None
    for _ in range(rounds):
        ratio, dense_ms = measure(f)
        done.append(Round(f, ratio, dense_ms))
        target = target_ratio(budget, table_total, dense_ms)
        if done[-1].error(target) <= TOLERANCE:
            break
        f = next_budget(done, target, highest)
        if any(abs(r.budget - f) < 1e-9 for r in done):
            break  # clipped back to a budget already measured
    best = min(done, key=lambda r: r.error(target_ratio(budget, table_total, r.dense_ms)))
    record = [{"budget": r.budget, "ratio": round(r.ratio, 4), "dense_ms": round(r.dense_ms, 4),
               "target": round(target_ratio(budget, table_total, r.dense_ms), 4)} for r in done]  # fmt: skip
    return best.budget, record


# ---- the measurement: the whole model in ONNX Runtime -------------------------------------------------


def timing_inputs(example, batch: int, seq: int, text: bool):
    """The table's shape from a calibration batch: rows repeated to ``batch`` (text: tokens to ``seq``,
    every token attended)."""

    def fit(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        for d, n in enumerate(dims):
            reps = [1] * t.dim()
            reps[d] = -(-n // t.shape[d])
            t = t.repeat(*reps).narrow(d, 0, n)
        return t.contiguous()

    if not text:
        return {"pixel_values": fit(example, (batch,))}
    out = {k: fit(v, (batch, seq)) for k, v in example.items() if torch.is_tensor(v) and v.dim() == 2}
    if "attention_mask" in out:
        out["attention_mask"] = torch.ones_like(out["attention_mask"])
    return out


class _Graph(nn.Module):
    def __init__(self, model: nn.Module, call, names: list[str]):
        super().__init__()
        self.model, self.call, self.names = model, call, names

    def forward(self, *tensors):
        inputs = tensors[0] if self.names == ["pixel_values"] else dict(zip(self.names, tensors, strict=True))
        return self.call(self.model, inputs)


def ort_latency(
    models: list[nn.Module], call, feeds: dict, threads: int | None, seconds: float
) -> list[float]:
    """Median ORT latency (ms) of each model, exported and timed round-robin in one run."""
    from edgecompress.bench.timing import time_alternating
    from edgecompress.export.onnx import DEFAULT_OPSET, _export_torchscript
    from edgecompress.export.runtime import ort_session

    names = list(feeds)
    args = tuple(feeds[n] for n in names)
    np_feeds = {n: t.numpy() for n, t in feeds.items()}
    with tempfile.TemporaryDirectory(prefix="ec-aim-") as tmp, torch.no_grad():
        sessions = []
        for i, m in enumerate(models):
            path = Path(tmp) / f"m{i}.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporter's tracer notes
                _export_torchscript(
                    _Graph(m.eval(), call, names), args, path, names, "y", DEFAULT_OPSET, None
                )
            sessions.append(ort_session(path, threads, spinning=False))
        fns = [lambda s=s: s.run(None, np_feeds) for s in sessions]
        stats = time_alternating(fns, min_seconds=seconds, min_iters=5, warmup_s=min(0.5, seconds / 4))
    return [float(st["median_ms"]) for st in stats]


def shrunk_copy(model: nn.Module, groups, keeps, stats) -> nn.Module:
    """A copy of ``model`` shrunk to ``keeps`` without recovery (the shapes the deployed model has)."""
    from edgecompress.prune.apply import shrink_all

    out = copy.deepcopy(model)
    shrink_all(out, groups, keeps, stats, "none", 0.0)
    return out
