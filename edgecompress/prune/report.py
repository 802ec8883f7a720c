"""What ``prune_structured`` did, for the pass record: notes (report.md lines) and ``info`` (report.json).

Per group: units kept of total, the option's cost, the distortion curve (measured points); totals:
the budget's measure before/after, parameters of the prunable groups and of the whole model; the
additivity check; the recovery errors; the time of the plan (statistics, latency table, curves, DP).
"""

from __future__ import annotations

from torch import nn


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _group_rows(groups, keeps, table, curves) -> list[dict]:
    rows = []
    for g in groups:
        k = len(keeps[g.name])
        opts, costs = table.options[g.name], table.costs[g.name]
        row = {"name": g.name, "kind": g.kind, "unit": g.label, "units": g.units, "kept": k,
               "cost": costs[opts.index(k)], "cost_dense": costs[-1]}  # fmt: skip
        if curves is not None:
            row["curve"] = {str(x): v for x, v in sorted(curves[g.name].measured.items())}
        if table.measured is not None:
            row["latency_measured_widths"] = table.measured[g.name]
        rows.append(row)
    return rows


def _note(g, k: int) -> str:
    if k == g.units:
        return f"{g.name}: {g.units} {g.label}s (kept all)"
    if k == 0:
        return f"{g.name}: branch removed ({g.units} {g.label}s → a constant)"
    return f"{g.name}: {g.units} → {k} {g.label}s"


def summarise(ctx, model, groups, keeps, table, curves, info, p, seconds) -> None:
    """Fill ``ctx.notes`` and ``ctx.info["prune"]``."""
    widths = {g.name: len(keeps[g.name]) for g in groups}
    total, after = table.total(), table.cost(widths)
    removed = 1 - after / total if total else 0.0
    ctx.notes.extend(_note(g, widths[g.name]) for g in groups)
    ctx.notes.append(
        f"{p.measure}: {removed:.1%} of the prunable groups' {p.measure} removed (budget {p.budget[p.measure]}); "
        f"model parameters now {_params(model):,}"
    )
    add = info.get("additivity")
    if add and add["joint_over_sum"] is not None:
        ctx.notes.append(
            f"additivity: joint distortion {add['joint']:.4g} vs sum of single-group distortions "
            f"{add['sum_of_single']:.4g} (ratio {add['joint_over_sum']:.2f})"
        )
    rec = info.get("recovery", {})
    if "output_error_before_lstsq" in rec:
        ctx.notes.append(
            f"least-squares recovery: calibration output MSE {rec['output_error_before_lstsq']:.4g} → "
            f"{rec['output_error']:.4g}"
        )
    if aim := info.get("latency_aim"):
        kept = next(r for r in aim["rounds"] if r["budget"] == aim["budget"])
        ctx.notes.append(
            f"latency measured on the whole model in ORT: {kept['ratio']:.3f} of dense (target {aim['target']:.3f}) "
            f"with the allocation at budget {aim['budget']:.3f}, {len(aim['rounds'])} round(s)"
        )
    ctx.info["prune"] = {
        "budget": dict(p.budget), "removed": removed, "cost_total": total, "cost_after": after,
        "params_after": _params(model), "groups": _group_rows(groups, keeps, table, curves),
        "seconds": seconds, **info,
    }  # fmt: skip
