"""The ``latency`` budget's whole-model correction (:mod:`edgecompress.prune.aim`), without timing.

Oracles: a known latency law stands in for the runtime — the measured ratio an affine function of the
effective budget, ``m(f) = c − a·f`` (what the table cannot see: a fixed cost ``c − 1`` and a saving
``a`` that differs from the table's) — so the right budget is known in closed form. Tolerances: the
rounds' rules are exact arithmetic (1e-12); the kept round within :data:`TOLERANCE` of the target.
The pass-level test checks the plumbing (rounds recorded, the kept allocation meets its effective
budget) and never asserts a time.
"""

from __future__ import annotations

import copy

import pytest
import torch

from edgecompress.prune.aim import TOLERANCE, Round, _target, aim, next_budget, target_ratio, timing_inputs
from edgecompress.prune.plan import Table, allocate_widths, feasible_max, max_removable

SHARE = 0.9  # the prunable groups' share of the dense latency: target 1 − 0.5 · 0.9 = 0.55


def _law(c: float, a: float):
    calls = []

    def measure(f: float) -> tuple[float, float, float]:
        calls.append(f)
        return c - a * f, SHARE, 7.0

    return measure, calls


def test_target_removes_the_budget_of_the_groups_share():
    assert target_ratio(0.5, 0.6) == pytest.approx(0.7, abs=1e-12)
    assert target_ratio(0.5, 1.3) == pytest.approx(0.5, abs=1e-12)  # a share is at most 1 (and at least 0)
    assert target_ratio(0.5, -0.1) == pytest.approx(1.0, abs=1e-12)


def test_first_correction_is_proportional_then_secant():
    t = target_ratio(0.5, SHARE)  # 0.55: ask for a saving of 0.45
    f1 = next_budget([Round(0.5, 0.7, SHARE)], t, 0.9)
    assert f1 == pytest.approx(0.5 * 0.45 / 0.3, abs=1e-12)
    f2 = next_budget([Round(0.5, 0.7, SHARE), Round(0.75, 0.6, SHARE)], t, 0.9)
    assert f2 == pytest.approx(0.75 + (0.55 - 0.6) / ((0.6 - 0.7) / 0.25), abs=1e-12)  # 0.875


def test_a_bracket_is_narrowed_by_regula_falsi_or_bisection():
    deit = [Round(0.5, 0.347, 0.89), Round(0.341, 0.747, 0.89), Round(0.417, 0.465, 0.89)]  # measured
    want = 0.341 + (0.747 - 0.555) * (0.417 - 0.341) / (0.747 - 0.465)
    assert next_budget(deit, 0.555, 0.9) == pytest.approx(want, abs=1e-12)
    crossed = [Round(0.3, 0.5, SHARE), Round(0.5, 0.7, SHARE)]  # noise: the larger budget ran slower
    assert next_budget(crossed, 0.6, 0.9) == pytest.approx(0.4, abs=1e-12)


@pytest.mark.parametrize("c,a", [(1.08, 0.55), (1.0, 0.6), (0.97, 1.1), (1.2, 1.0)])
def test_affine_latency_law_hits_target(c, a):
    measure, calls = _law(c, a)
    budget, record = aim(0.5, 0.95, measure, rounds=3)
    target = target_ratio(0.5, SHARE)
    assert abs((c - a * budget) / target - 1) <= TOLERANCE
    assert calls[0] == 0.5 and len(record["rounds"]) == len(calls) <= 3
    exact = (c - target) / a  # the secant is exact on an affine law
    if len(calls) == 3:
        assert calls[2] == pytest.approx(exact, abs=1e-12)


def test_target_takes_the_median_share_of_the_rounds():
    done = [Round(0.5, 0.8, 0.7), Round(0.6, 0.7, 0.2), Round(0.7, 0.6, 0.8)]  # a noisy timing in round 2
    assert _target(0.5, done) == pytest.approx(target_ratio(0.5, 0.7), abs=1e-12)


def test_a_hit_in_the_first_round_stops():
    measure, calls = _law(1.0, 0.9)  # the table is right: m = 1 − 0.9 f
    budget, rounds = aim(0.5, 0.95, measure, rounds=3)
    assert calls == [0.5] and budget == 0.5 and rounds["target"] == pytest.approx(0.55, abs=1e-4)


def test_unreachable_target_keeps_the_closest_round_within_limits():
    measure, calls = _law(1.3, 0.2)  # even the most a plan can remove is far too slow
    budget, _ = aim(0.5, 0.8, measure, rounds=3)
    assert all(1e-3 <= f <= 0.8 for f in calls) and budget == 0.8 and len(calls) == 2


def test_feasible_max_is_the_edge_of_the_allocation():
    table = Table({"a": [1, 2, 4], "b": [2, 4]}, {"a": [1.0, 2.0, 4.0], "b": [3.0, 6.0]})
    values = {"a": [3.0, 1.0, 0.0], "b": [2.0, 0.0]}
    top = feasible_max(table, values)  # the DP: every group at its smallest option, less the cost rounding
    assert top == pytest.approx(max_removable(table), abs=1e-3) and allocate_widths(table, top, values)
    assert allocate_widths(table, top + 1e-3, values) is None
    top = feasible_max(table, None)  # uniform: ratio 0.5 at most (b has no option at 0.25) → 1 − 5/10
    assert top == pytest.approx(0.5, abs=1e-6) and top < max_removable(table)


def test_timing_inputs_take_the_table_shape():
    ids = torch.arange(3 * 5).reshape(3, 5)
    ex = {"input_ids": ids, "attention_mask": torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 5])}
    out = timing_inputs(ex, 7, 11, text=True)
    assert out["input_ids"].shape == (7, 11) and torch.equal(out["input_ids"][:3, :5], ids)
    assert torch.equal(out["input_ids"][3:6, 5:10], ids) and bool(out["attention_mask"].all())
    img = torch.randn(2, 3, 9, 9)
    got = timing_inputs(img, 5, 11, text=False)["pixel_values"]
    assert got.shape == (5, 3, 9, 9) and torch.equal(got[4], img[0])


def _check_rounds(info, budget: float, rounds: int) -> None:
    aimed = info["latency_aim"]
    assert 1 <= len(aimed["rounds"]) <= rounds and aimed["rounds"][0]["budget"] == budget
    assert aimed["budget"] in [r["budget"] for r in aimed["rounds"]]
    assert all(r["ratio"] > 0 and r["dense_ms"] > 0 and r["share"] <= 1 for r in aimed["rounds"])
    assert info["cost_after"] <= (1 - aimed["budget"]) * info["cost_total"] + 1e-9


def test_pass_records_the_rounds_and_meets_its_effective_budget():
    from tests.prune.test_prune_pass import _run, tiny_timm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    fields = dict(budget={"latency": 0.4}, latency_seconds=0.05, latency_points=3, curve_points=3)
    try:
        loaded = tiny_timm("vit_tiny_patch16_224", mlp_ratio=2.0)
        _, info, _ = _run(copy.deepcopy(loaded), latency_rounds=1, **fields)
        _, plain, _ = _run(loaded, latency_rounds=0, **fields)
    finally:
        torch.set_num_threads(threads)
    _check_rounds(info, 0.4, 1)
    assert "latency_aim" not in plain
