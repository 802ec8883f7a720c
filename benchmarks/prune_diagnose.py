"""Diagnosis of the closed-form recovery on MiniLM (untimed; run with ``nice -n 19``).

    python benchmarks/prune_diagnose.py [--calib 64] [--budgets 0.5] [--ridges 1 0.1 0.01]
                                        [--recoveries lstsq scale] [--importances activation]
                                        [--allocations uniform] [--granularity heads mlp]
                                        [--curve-folds 1 2] [--steps 1] [--no-baseline] [--out F]

Per (importance, allocation, recovery, ridge, budget), after a no-recovery baseline: the embedding
cosine / NN agreement on the test texts, the mean cosine on the calibration texts and on the other
train texts (what the fit learnt of its few samples), the calibration output error before and after
the recovery, and per reconstructed layer the squared error before and after its refit relative to
the target's energy. Prints one line per setting and the per-layer table; ``--out`` writes the rows.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

from benchmarks.prune import _metrics, heldout, setup  # noqa: E402
from edgecompress.prune import PruneStructured  # noqa: E402


def _steps(s, p: PruneStructured, prep, budget: float, steps: int):
    """Prune to ``budget`` in ``steps`` equal steps of the original prunable parameters; from the second
    step on, statistics, curves and the recovery's target are re-measured on the current (pruned and
    recovered) model, as RD-prune re-measures against the current model in its iterations."""
    model = copy.deepcopy(s.loaded.model)
    for i in range(steps):
        step = (budget / steps) / (1 - budget * i / steps)
        pb = dataclasses.replace(p, budget={"params": step})
        ctx = dataclasses.replace(s.ctx, notes=[], info={})
        model = pb.execute(model, ctx, prep if i == 0 else pb.prepare(model, ctx))
    return model, ctx


def run(args) -> list[dict]:
    s = setup("minilm", args.calib, 0)
    rows = []
    for imp in args.importances:
        for alloc in args.allocations:
            settings = [(r, x, f) for r in args.recoveries for x in args.ridges for f in args.curve_folds]
            for rec, ridge, folds in ([] if args.no_baseline else [("none", 0.0, 1)]) + settings:
                p = PruneStructured(
                    importance=imp,
                    allocation=alloc,
                    recovery=rec,
                    ridge=ridge,
                    curve_folds=folds,
                    granularity=tuple(args.granularity),
                )
                prep = p.prepare(s.loaded.model, s.ctx)
                for b in args.budgets:
                    model, ctx = _steps(s, p, prep, b, args.steps)
                    rec_info = ctx.info["prune"]["recovery"]
                    layers = {n: (round(v["before"] / v["target"], 4), round(v["after"] / v["target"], 4))
                              for n, v in rec_info.get("layers", {}).items()}  # fmt: skip
                    row = {"importance": imp, "allocation": alloc, "recovery": rec, "ridge": ridge, "curve_folds": folds, "steps": args.steps, "budget": b, "granularity": args.granularity,
                           **_metrics(s, model), **heldout(s, model), "calib_error": rec_info["output_error"],
                           "calib_error_before": rec_info.get("output_error_before_lstsq"), "layers": layers}  # fmt: skip
                    rows.append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "layers"}), flush=True)
                    for n, (a, c) in layers.items():
                        print(f"    {n:45s} rel err before {a:.4f} after {c:.4f}", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5])
    ap.add_argument("--ridges", type=float, nargs="+", default=[1.0, 0.1, 0.01])
    ap.add_argument("--recoveries", nargs="+", default=["lstsq"])
    ap.add_argument("--importances", nargs="+", default=["activation"])
    ap.add_argument("--allocations", nargs="+", default=["uniform"])
    ap.add_argument("--granularity", nargs="+", default=["heads", "mlp"])
    ap.add_argument("--curve-folds", type=int, nargs="+", default=[1], help="the pass's curve_folds")
    ap.add_argument("--steps", type=int, default=1, help="prune in this many steps (re-measured each)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the no-recovery baseline")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = run(args)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
