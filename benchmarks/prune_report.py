"""The report of benchmarks/prune.py's JSON: the table, the acceptance summary, the quality curves (PNG),
and the merge of rows written by runs elsewhere (untimed parts run at low priority into another
folder while a timed part holds the bench lock, then merged: ``prune.py --merge other.json``)."""

from __future__ import annotations

from pathlib import Path

KEY = (
    "part",
    "model",
    "method",
    "importance",
    "recovery",
    "allocation",
    "budget",
    "ft_steps",
    "backend",
    "what",
    "calibration",
    "fields",
    "cut",
)
SHOWN = ("part", "model", "cut", "method", "importance", "recovery", "allocation", "budget", "removed", "top1",
         "cosine_mean", "loss", "nn_agreement", "dp_sum", "dp_joint", "random_corr", "total_seconds", "speedup")  # fmt: skip


def line(r: dict) -> str:
    return "  ".join(
        f"{k}={r[k]:.4g}" if isinstance(r.get(k), float) else f"{k}={r[k]}" for k in SHOWN if k in r
    )


def table(rows: list[dict]) -> str:
    return "\n".join(line(r) for r in rows)


def key(r: dict) -> tuple:
    return tuple(str(r.get(k)) for k in KEY)


def merge(data: dict, new_rows: list[dict], runs: list[dict] = ()) -> dict:
    """``data`` with ``new_rows`` replacing the rows of the same key, and ``runs`` appended."""
    mine = {key(r) for r in new_rows}
    rows = [r for r in data["rows"] if key(r) not in mine] + list(new_rows)
    return {**data, "runs": data["runs"] + list(runs), "rows": rows}


def _metric(r: dict) -> float | None:
    return r.get("top1", r.get("cosine_mean"))


def _vs_torch_pruning(rows: list[dict], q: dict) -> dict:
    """Ours minus Torch-Pruning at equal training: none (our activation + layer_adaptive + lstsq quality
    row vs its ``tp`` row) and the same ``ft_steps`` (both ``ft`` rows, matched by their steps)."""
    ours = {
        (r["model"], r["budget"], r["ft_steps"]): _metric(r)
        for r in rows
        if r["part"] == "ft" and r.get("method") != "torch-pruning"
    }
    theirs = {
        (r["model"], r["budget"], r["part"], r.get("ft_steps")): _metric(r)
        for r in rows
        if r.get("method") == "torch-pruning"
    }
    out = {}
    for (m, b, part, steps), v in sorted(theirs.items(), key=str):
        mine = (
            q.get((m, "activation", "lstsq", "layer_adaptive", b))
            if part == "tp"
            else ours.get((m, b, steps))
        )
        if mine is not None:
            out[f"{m}/{b}/{'no-training' if part == 'tp' else f'finetuned-{steps}'}"] = round(mine - v, 4)
    return out


def summary(rows: list[dict]) -> dict:
    """The acceptance comparisons, from the rows: layer_adaptive vs uniform (same importance and
    recovery), ours vs Torch-Pruning at equal training, the latency budget's aim, the acceptance row."""
    q = {(r["model"], r["importance"], r["recovery"], r["allocation"], r["budget"]): _metric(r)
         for r in rows if r["part"] == "quality"}  # fmt: skip
    la_vs_u = {f"{m}/{i}/{rec}/{b}": round(v - q[(m, i, rec, "uniform", b)], 4)
               for (m, i, rec, a, b), v in q.items() if a == "layer_adaptive" and (m, i, rec, "uniform", b) in q}  # fmt: skip
    vs_tp = _vs_torch_pruning(rows, q)
    return {
        "layer_adaptive_minus_uniform": la_vs_u,
        "layer_adaptive_not_worse_everywhere": all(v >= 0 for v in la_vs_u.values()),
        "ours_minus_torch_pruning": vs_tp,
        "ahead_of_torch_pruning_everywhere": all(v > 0 for v in vs_tp.values()),
        "latency_targets": {r["model"]: r["measured_over_predicted"] for r in rows if r.get("what") == "latency_target"},
        "acceptance": [{k: r.get(k) for k in ("calibration", "fields", "calibration_samples", "cosine_mean", "speedup", "cosine_target_met",
                                          "latency_target_met")} for r in rows if r["part"] == "acceptance"],
        "acceptance_split": {r["cut"]: {"removed": r["removed"], "loss": r["loss"]} for r in rows if r["part"] == "acceptance_split"},
    }  # fmt: skip


def _series(rows: list[dict], model: str) -> dict[str, list[tuple[float, float]]]:
    """Quality against the removed fraction, one series per setting drawn."""
    out: dict[str, list] = {}
    for r in rows:
        if r.get("model") != model or _metric(r) is None or "removed" not in r:
            continue
        if r["part"] == "quality" and r["importance"] == "activation":
            label = f"{r['allocation']}, {r['recovery']}"
        elif r["part"] in ("tp", "ft"):
            label = (
                "torch-pruning" if r.get("method") == "torch-pruning" else "ours (layer_adaptive, lstsq)"
            ) + (f" + {r['ft_steps']} steps" if r["part"] == "ft" else ", no training")
        else:
            continue
        out.setdefault(label, []).append((r["removed"], _metric(r)))
    return {k: sorted(v) for k, v in out.items()}  # fmt: skip


def plot(rows: list[dict], path: Path) -> str | None:
    """One panel per model: quality (top-1 / embedding cosine) against the removed fraction of the
    attention + MLP parameters, uniform vs layer_adaptive (activation importance) and Torch-Pruning."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = sorted({r["model"] for r in rows if r["part"] in ("quality", "tp", "ft")})
    if not models:
        return None
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, name in zip(axes[0], models):
        for label, pts in _series(rows, name).items():
            ax.plot(*zip(*pts), marker="o", linestyle="--" if "torch" in label else "-", label=label)
        ax.set(title=name, xlabel="removed fraction of attention + MLP parameters",
               ylabel="top1" if name == "vit-digits" else "embedding cosine to dense")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("prune_structured vs Torch-Pruning (closed-form recovery only unless steps are given)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
