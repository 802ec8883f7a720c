"""How many units each group keeps under a budget: pure functions on per-group option tables.

Each group ``g`` has options (kept unit counts ``k``, ascending) with a cost ``c_g(k)`` (parameters,
multiply-adds or measured latency) and, for the layer-adaptive allocation, a distortion ``D_g(k)``
(the model-output error with only that group pruned to ``k``; :mod:`.curves`).

* :func:`width_options` — the kept counts a group may take: kept widths (``k`` × the unit's columns)
  that are multiples of ``round_to``, the full width, and 0 where whole branches may go.
* :func:`uniform` — the same kept ratio in every group: the largest ratio ``r`` whose per-group
  counts (the largest option ≤ ``r·n_g``) keep at most the allowed cost.
* :func:`dp` — the layer-adaptive allocation of RD-prune (Xu et al., ICCV 2023): by the additivity
  of the output distortion, minimise ``Σ_g D_g(k_g)`` subject to ``Σ_g c_g(k_g) ≤ C`` exactly, by
  dynamic programming over integer costs (a multiple-choice knapsack; ``O(groups · options · C)``).
  RD-prune counts the budget in single weights (tables of ~6 GB for DeiT-S); costs here are first
  quantised to ``steps`` units of the total (:func:`quantize`), rounding every option's cost *up*,
  so the solution always meets the real budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

QUANT_STEPS = 4096


def width_options(units: int, col_width: int, round_to: int, allow_zero: bool) -> list[int]:
    """Kept unit counts, ascending: ``k·col_width`` a multiple of ``round_to`` (and ``units`` itself)."""
    opts = [k for k in range(1, units) if (k * col_width) % round_to == 0] + [units]
    return ([0] if allow_zero else []) + opts


def uniform(
    options: Sequence[Sequence[int]], costs: Sequence[Sequence[float]], capacity: float
) -> list[int] | None:
    """Option indices for the largest common kept ratio whose total cost is ≤ ``capacity``; None if even
    the smallest options (or a group with no option at that ratio) cannot meet it."""
    ratios = sorted({k / opts[-1] for opts in options for k in opts}, reverse=True)
    for r in ratios:
        picks = []
        for opts in options:
            fit = [i for i, k in enumerate(opts) if k <= r * opts[-1] + 1e-9]
            if not fit:
                return None
            picks.append(fit[-1])
        if sum(c[i] for c, i in zip(costs, picks, strict=True)) <= capacity + 1e-9:
            return picks
    return None


def quantize(costs: Sequence[Sequence[float]], capacity: float, steps: int = QUANT_STEPS):
    """Integer costs in units of ``total / steps`` (rounded up) and the capacity in those units (down)."""
    total = sum(max(c) for c in costs)
    unit = total / steps if total > 0 else 1.0
    icosts = [[math.ceil(v / unit - 1e-9) for v in c] for c in costs]
    return icosts, math.floor(capacity / unit + 1e-9)


def dp(costs: Sequence[Sequence[int]], values: Sequence[Sequence[float]], capacity: int) -> list[int] | None:
    """Option indices minimising ``Σ values[g][i_g]`` with ``Σ costs[g][i_g] ≤ capacity`` (exact); None
    if no choice fits. Ties go to the option listed last (the larger kept count)."""
    if capacity < 0:
        return None
    best = np.zeros(capacity + 1)  # best[c]: min distortion of the groups so far with cost ≤ c
    choices = []
    for cost, value in zip(costs, values, strict=True):
        new = np.full(capacity + 1, np.inf)
        pick = np.full(capacity + 1, -1, dtype=np.int32)
        for i in range(len(cost) - 1, -1, -1):
            c = int(cost[i])
            if c > capacity:
                continue
            cand = np.full(capacity + 1, np.inf)
            cand[c:] = best[: capacity + 1 - c] + float(value[i])
            better = cand < new
            new[better], pick[better] = cand[better], i
        best = new
        choices.append(pick)
    if not np.isfinite(best[capacity]):
        return None
    out, c = [], capacity
    for cost, pick in zip(reversed(costs), reversed(choices), strict=True):
        i = int(pick[c])
        out.append(i)
        c -= int(cost[i])
    return out[::-1]
