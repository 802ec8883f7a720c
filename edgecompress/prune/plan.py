"""The pruning plan: per group its options, their costs under the budget's measure, and the allocation.

Costs of a group keeping ``k`` units (``k = 0``: the branch is removed):

* ``params`` — ``k`` × the parameters one unit owns (:func:`edgecompress.prune.groups.unit_params`);
* ``flops`` — multiply-adds per sample: ``k`` × (the unit's parameters × its projection rows per
  sample, + for heads ``2 · windows · seq² · columns`` for ``q kᵀ`` and ``p v``), from the shapes seen
  on the calibration data;
* ``latency`` — the measured ORT table (:mod:`.latency`).

The budget is the fraction of the prunable groups' total cost to remove; the allocation keeps at
most ``(1 − budget) × total``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from edgecompress.prune import allocate
from edgecompress.prune.calibrate import Stats
from edgecompress.prune.curves import sample_options
from edgecompress.prune.groups import Group, unit_params
from edgecompress.prune.latency import Shape, measure


@dataclass
class Table:
    options: dict[str, list[int]]  # group → kept counts, ascending
    costs: dict[str, list[float]]  # group → cost of each option
    measured: dict[str, list[int]] | None = None  # latency: the widths really timed

    def total(self) -> float:
        return sum(c[-1] for c in self.costs.values())

    def cost(self, widths: dict[str, int]) -> float:
        return sum(self.costs[g][self.options[g].index(k)] for g, k in widths.items())


def options_of(groups: list[Group], granularity, round_to: int) -> dict[str, list[int]]:
    """Kept counts per group (see :func:`edgecompress.prune.allocate.width_options`); a group whose
    kind is not in ``granularity`` (or that is coupled by a norm) may only be removed whole (``blocks``)."""
    out = {}
    blocks = "blocks" in granularity
    for g in groups:
        if g.kind in granularity and g.why is None:
            out[g.name] = allocate.width_options(g.units, g.col_width, round_to, blocks)
        elif blocks:
            out[g.name] = [0, g.units]
    return out


def unit_cost(model: nn.Module, g: Group, st: Stats, measure_of: str) -> float:
    p = unit_params(model, g)
    if measure_of == "params":
        return float(p)
    core = 2.0 * st.windows * st.seq**2 * g.col_width if g.kind == "heads" else 0.0
    return p * st.rows_per_sample + core


def latency_shape(g: Group, st: Stats, batch: int, seq: int, text: bool) -> Shape:
    """The group as timed: ``batch`` samples (images: × windows) of ``seq`` tokens (images: as seen);
    the output width is taken equal to the input width (the residual stream)."""
    rows, n = (batch, seq) if text else (max(1, round(batch * st.windows)), st.seq)
    return Shape(g.kind, g.d_in, g.d_in, g.col_width, g.head_dim or 1, rows, n, g.gated, g.act or "gelu")


def latency_costs(groups, options, stats, batch, seq, text, threads, seconds, points) -> Table:
    """ORT latency per option, one round-robin timing per distinct shape."""
    by_shape: dict[Shape, set[int]] = {}
    shapes = {}
    for g in groups:
        if g.name in options:
            s = shapes[g.name] = latency_shape(g, stats[g.name], batch, seq, text)
            by_shape.setdefault(s, set()).update(sample_options(options[g.name], points))
    timed = {s: measure(s, sorted(ws), threads, seconds) for s, ws in by_shape.items()}
    costs, measured = {}, {}
    for name, opts in options.items():
        t = timed[shapes[name]]
        xs = sorted(x for x in t if x > 0)  # a removed branch costs 0; no ramp from it to the narrowest width
        costs[name] = [float(np.interp(k, xs, [t[x] for x in xs])) if k > 0 else 0.0 for k in opts]
        measured[name] = sorted(t)
    return Table(options, costs, measured)


def static_costs(model, groups, options, stats, measure_of: str) -> Table:
    costs = {}
    for g in groups:
        if g.name in options:
            per = unit_cost(model, g, stats[g.name], measure_of)
            costs[g.name] = [k * per for k in options[g.name]]
    return Table(options, costs)


def allocate_widths(
    table: Table, budget: float, values: dict[str, list[float]] | None
) -> dict[str, int] | None:
    """Kept counts per group keeping at most ``(1 − budget)`` of the total cost: the DP over the
    distortion curves ``values`` when given (layer-adaptive), else the uniform ratio. None if impossible."""
    names = list(table.options)
    capacity = (1.0 - budget) * table.total()
    costs = [table.costs[n] for n in names]
    if values is None:
        picks = allocate.uniform([table.options[n] for n in names], costs, capacity)
    else:
        icosts, icap = allocate.quantize(costs, capacity)
        picks = allocate.dp(icosts, [values[n] for n in names], icap)
    if picks is None:
        return None
    return {n: table.options[n][i] for n, i in zip(names, picks, strict=True)}


def max_removable(table: Table) -> float:
    """The largest budget any allocation can meet (every group at its smallest option)."""
    total = table.total()
    return 1.0 - sum(c[0] for c in table.costs.values()) / total if total > 0 else 0.0


def feasible_max(table: Table, values: dict[str, list[float]] | None, iters: int = 30) -> float:
    """The largest budget :func:`allocate_widths` meets (bisection; ``uniform`` may stop below
    :func:`max_removable`)."""
    lo, hi = 0.0, max_removable(table)
    if allocate_widths(table, hi, values) is not None:
        return hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if allocate_widths(table, mid, values) is not None else (lo, mid)
    return lo
