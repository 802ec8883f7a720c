"""Structured pruning (``prune_structured``) vs Torch-Pruning: quality, additivity, plan time, speed (CPU).

    python benchmarks/prune.py [--parts dense quality tp ft additivity timing acceptance speed]
                               [--parts acceptance-quality acceptance-split]
                               [--models vit-digits minilm] [--importances magnitude taylor activation]
                               [--budgets 0.3 0.5 0.7] [--calib 64] [--ft-steps 100] [--threads 2]
                               [--calib-data text|stdlib|text+stdlib] [--acceptance-calib 64]
                               [--acceptance-fields '{"ridge_folds": 4}']
    python benchmarks/prune.py --report [--merge OTHER.json ...]  # table, summary and PNG of the JSON

Untimed parts may run at low priority with ``--out`` elsewhere while a timed part holds the bench
lock; ``--merge`` then adds their rows (benchmarks/prune_report.py).

Parts (rows are merged into ``benchmarks/results/prune-<machine>-<date>.json``, saved after each part):

* ``dense`` — the unpruned models' metrics (top-1; the reference of the cosines).
* ``quality`` — demo:vit-digits (top-1 on the 450 test digits) and demo:minilm (mean embedding cosine
  to the dense model and nearest-neighbour agreement on the test texts) at 30 / 50 / 70 % fewer
  attention + MLP parameters: uniform vs layer_adaptive × magnitude / Taylor / activation importance
  × recovery none / lstsq, no training. Statistics and curves are measured once per (importance,
  recovery) (``prepare``) and every budget and allocation cut from them (``execute``), as the pass does.
* ``tp`` — Torch-Pruning (benchmarks/prune_tp.py: its ViT / BERT examples' settings, bottleneck
  mode, ratio matched to the budget) at the same budgets, no training.
* ``ft`` — both after the same ``--ft-steps`` of fine-tuning through ``edgecompress.train.fit``
  (labels on digits, distillation from the dense model on MiniLM): ours = activation +
  layer_adaptive + lstsq then ``recover_steps``; Torch-Pruning's model fine-tuned the same way.
* ``additivity`` — RD-prune's premise on our curves (activation, lstsq): the sum of single-group
  distortions vs the measured joint distortion, for the DP allocation at each budget and for
  ``--random`` random allocations near each budget (correlation and median joint/sum).
* ``timing`` — MiniLM with the shipped recipe's settings (plus ``--acceptance-fields``, on ``--calib``
  texts): the seconds of statistics + curves + DP (``prepare`` + the allocation), the acceptance's
  "under 5 minutes on these 2 cores".
* ``acceptance`` — MiniLM at 50 % with closed-form recovery only and ``--acceptance-calib`` texts of
  ``--calib-data`` (benchmarks/prune_calibset.py: the built-in train split, a disjoint stdlib set, or
  both): embedding cosine on the test texts (target ≥ 0.95) and ORT latency vs dense (target ≤ 0.65×),
  alternated in one run. ``acceptance-quality`` (untimed) prunes, measures the cosine and saves the
  model in a temporary cache, so that a later ``acceptance`` run (under the bench lock) restores it
  and only times (benchmarks/prune_acceptance.py). ``acceptance-split`` (untimed) splits that row's
  loss between attention and MLPs: the same widths with the attention, then the MLPs, kept whole.
* ``speed`` — benchmarks/prune_speed.py: pruned vs dense latency ratios in PyTorch and ONNX Runtime
  (each pair alternated in one run), and whether a ``latency`` budget lands within 10 % of its target.

Every row records the load average before and after it: the CPU is shared, so only ratios measured
in one run are comparable.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
# not this folder: its kernels.py would shadow the `kernels` package transformers looks for
sys.path = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

from benchmarks import prune_calibset, prune_speed  # noqa: E402
from benchmarks.prune_report import line as _line  # noqa: E402
from benchmarks.prune_report import merge, plot, summary, table  # noqa: E402
from benchmarks.prune_tp import tp_at_budget  # noqa: E402
from edgecompress.bench.env import environment  # noqa: E402
from edgecompress.calib import make_context  # noqa: E402
from edgecompress.data.metrics import evaluate, outputs  # noqa: E402
from edgecompress.data.specs import load_data, load_samples  # noqa: E402
from edgecompress.models.loading import load_model  # noqa: E402
from edgecompress.pipeline import make_teacher  # noqa: E402
from edgecompress.prune import PruneStructured  # noqa: E402
from edgecompress.prune.apply import joint_error  # noqa: E402
from edgecompress.prune.importance import IMPORTANCES as PASS_IMPORTANCES  # noqa: E402
from edgecompress.prune.importance import kept  # noqa: E402
from edgecompress.prune.recover import RECOVERIES  # noqa: E402
from edgecompress.train import TrainConfig, default_loss, fit  # noqa: E402

OUT = ROOT / "benchmarks" / "results"
RESULT = "prune-xeon-amx-2026-12-06.json"  # this machine (Xeon with AMX) and the session's date
SPECS = {"vit-digits": "demo:vit-digits", "minilm": "demo:minilm"}
IMPORTANCES = ("magnitude", "taylor", "activation")  # the default set; "obs" / "distortion" on request
SPEED = prune_speed.MODELS
FT = {"vit-digits": {"lr": 1e-4, "batch_size": 64}, "minilm": {"lr": 5e-5, "batch_size": 16}}


@dataclasses.dataclass
class Setup:
    name: str
    loaded: object
    calib: list
    test: object
    reference: list
    ctx: object
    dense: dict
    preps: dict = dataclasses.field(default_factory=dict)  # (importance, recovery) → (prepared, seconds)
    train_ref: tuple | None = None  # (all train texts, the dense embeddings): :func:`heldout`
    calib_data: str | None = None  # the calibration data spec (None: the built-in train split)

    def prepare(self, importance: str, recovery: str):
        """The statistics and curves of one (importance, recovery), measured once and reused by every part."""
        if (importance, recovery) not in self.preps:
            t0, p = time.perf_counter(), PruneStructured(importance=importance, recovery=recovery)
            prep = p.prepare(self.loaded.model, self.ctx)
            self.preps[importance, recovery] = (prep, time.perf_counter() - t0)
        return self.preps[importance, recovery]


def setup(name: str, calib_n: int, ft_steps: int, calib_data: str | None = None) -> Setup:
    loaded = load_model(SPECS[name])
    calib = list(load_samples(calib_data, loaded, "train", calib_n, 32))
    train = load_samples(None, loaded, "train", 0, FT[name]["batch_size"])
    test = load_data(None, loaded, "test", 0, 64)
    dense, reference = evaluate(loaded, loaded.model, test)
    cfg = TrainConfig(steps=max(ft_steps, 1), warmup_steps=max(1, ft_steps // 20), log_every=10, **FT[name])
    data = lambda split: calib if split == "calib" else train  # noqa: E731  (calib: the statistics; train: fine-tuning)
    ctx = make_context(calib, loaded.call, torch.device("cpu"), kind=loaded.kind, train=cfg, data=data)
    ctx = dataclasses.replace(ctx, teacher=make_teacher(loaded.model))
    return Setup(name, loaded, calib, test, reference, ctx, dense, calib_data=calib_data)


def _metrics(s: Setup, model) -> dict:
    m, _ = evaluate(s.loaded, model, s.test, reference=s.reference)
    keep = (
        ("top1", "top1_agreement")
        if s.loaded.kind == "image"
        else ("cosine_mean", "cosine_min", "nn_agreement")
    )
    return {k: m[k] for k in keep if k in m}


def _cut(s: Setup, p: PruneStructured, prep) -> tuple[torch.nn.Module, dict]:
    ctx = dataclasses.replace(s.ctx, notes=[], info={})
    model = p.execute(copy.deepcopy(s.loaded.model), ctx, prep)
    info = ctx.info["prune"]
    return model, {
        "removed": round(info["removed"], 4), "kept": [g["kept"] for g in info["groups"]],
        "additivity": info.get("additivity"), "calib_output_error": info["recovery"]["output_error"],
        "seconds": info["seconds"], **({"training": ctx.info["training"]} if "training" in ctx.info else {}),
    }  # fmt: skip


def heldout(s: Setup, model) -> dict:
    """Encoders: the mean embedding cosine on the calibration texts (the first ``--calib`` train texts)
    and on the other train texts — the gap is what the closed-form fits learnt of their few samples."""
    if s.loaded.kind != "encoder" or s.calib_data is not None:
        return {}
    if s.train_ref is None:
        s.train_ref = (load_data(None, s.loaded, "train", 0, 64), torch.cat(outputs(s.loaded, s.loaded.model, load_data(None, s.loaded, "train", 0, 64))))  # fmt: skip
    n = sum(len(b) for b in s.calib)
    cos = (torch.cat(outputs(s.loaded, model, s.train_ref[0])) * s.train_ref[1]).sum(-1)
    return {"cosine_calib_texts": round(float(cos[:n].mean()), 5), "cosine_other_train_texts": round(float(cos[n:].mean()), 5)}  # fmt: skip


def quality_rows(s: Setup, budgets, importances=IMPORTANCES, recoveries=("none", "lstsq")) -> list[dict]:
    rows = []
    for imp in importances:
        for rec in recoveries:
            base = PruneStructured(importance=imp, recovery=rec)
            prep, plan_s = s.prepare(imp, rec)
            for b in budgets:
                for alloc in ("uniform", "layer_adaptive"):
                    load = os.getloadavg()[0]
                    p = dataclasses.replace(base, budget={"params": b}, allocation=alloc)
                    model, info = _cut(s, p, prep)
                    rows.append({"part": "quality", "model": s.name, "method": "prune_structured", "importance": imp,
                                 "recovery": rec, "allocation": alloc, "budget": b, **_metrics(s, model), **info,
                                 **heldout(s, model), "calibration_samples": sum(len(x) for x in s.calib),
                                 "prepare_seconds": round(plan_s, 1), "load": [load, os.getloadavg()[0]]})  # fmt: skip
                    print(_line(rows[-1]), flush=True)
    return rows


def _finetune(s: Setup, model, steps: int) -> dict:
    c = s.ctx
    res = fit(
        model, default_loss(c.teacher, c.call, c.kind), c.batches("train"), c.train.override(steps=steps)
    )
    return {"steps": res.steps, "final_loss": res.final_loss, "seconds": round(res.seconds, 1)}


def tp_rows(s: Setup, budgets, ft_steps: int) -> list[dict]:
    rows = []
    for b in budgets:
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        model, ratio, removed = tp_at_budget(s.loaded, b, s.calib)
        row = {"part": "tp", "model": s.name, "method": "torch-pruning", "budget": b, "ratio": ratio,
               "removed": round(removed, 4), "seconds": round(time.perf_counter() - t0, 1), **_metrics(s, model)}  # fmt: skip
        rows.append({**row, "load": [load, os.getloadavg()[0]]})
        print(_line(rows[-1]), flush=True)
        if ft_steps:
            training = _finetune(s, model, ft_steps)
            rows.append(
                {**row, "part": "ft", "ft_steps": ft_steps, "training": training, **_metrics(s, model)}
            )
            print(_line(rows[-1]), flush=True)
    return rows


def ft_rows(s: Setup, budgets, ft_steps: int) -> list[dict]:
    base = PruneStructured(importance="activation", recovery="lstsq")
    prep, _ = s.prepare("activation", "lstsq")
    rows = []
    for b in budgets:
        p = dataclasses.replace(base, budget={"params": b}, recover_steps=ft_steps)
        model, info = _cut(s, p, prep)
        rows.append({"part": "ft", "model": s.name, "method": "prune_structured", "importance": "activation",
                     "recovery": "lstsq", "allocation": "layer_adaptive", "budget": b, "ft_steps": ft_steps,
                     **_metrics(s, model), **info})  # fmt: skip
        print(_line(rows[-1]), flush=True)
    return rows


def _random_keeps(prep, budget: float, gen: np.random.Generator) -> dict[str, list[int]]:
    """Random kept counts per group whose total cost is near ``(1 − budget)`` of the dense cost."""
    table = prep.table
    ratios = np.clip(gen.normal(1 - budget, 0.2, len(table.options)), 0.05, 1.0)
    keeps = {}
    for (name, opts), r in zip(table.options.items(), ratios):
        k = min(opts, key=lambda o: abs(o / opts[-1] - r))
        keeps[name] = kept(prep.orders[name], k)
    return keeps


def additivity_rows(s: Setup, budgets, n_random: int) -> list[dict]:
    rows = []
    for rec in ("none", "lstsq"):
        for b in budgets:
            rows.append(_additivity(s, rec, b, n_random, np.random.default_rng(int(b * 100))))
            print(_line(rows[-1]), flush=True)
    return rows


def _additivity(s: Setup, rec: str, budget: float, n_random: int, gen) -> dict:
    """Σ single-group distortions vs the joint one: the DP's allocation, then random ones near the budget."""
    p = PruneStructured(importance="activation", recovery=rec, budget={"params": budget})
    prep, _ = s.prepare("activation", rec)
    widths = p.allocate(prep.table, prep.curves)
    samples = [{n: kept(prep.orders[n], k) for n, k in widths.items()}]
    samples += [_random_keeps(prep, budget, gen) for _ in range(n_random)]
    pairs = []
    for keeps in samples:
        predicted = sum(prep.curves[g.name].at(len(keeps[g.name])) for g in prep.groups)
        joint = joint_error(s.loaded.model, prep.groups, keeps, prep.stats, prep.ref, p.recovery, p.ridge)
        pairs.append((predicted, joint))
    sums, joints = zip(*pairs)
    return {"part": "additivity", "model": s.name, "recovery": rec, "budget": budget, "dp_sum": sums[0],
            "dp_joint": joints[0], "random_pairs": pairs[1:], "random_corr": float(np.corrcoef(sums[1:], joints[1:])[0, 1]),
            "random_median_joint_over_sum": statistics.median(j / max(x, 1e-30) for x, j in pairs[1:])}  # fmt: skip


def timing_rows(s: Setup, fields: dict) -> list[dict]:
    """The shipped recipe's plan on MiniLM (plus ``--acceptance-fields``): statistics + curves (prepare)
    + the DP, timed."""
    load = os.getloadavg()[0]
    p = PruneStructured(**fields)
    t0 = time.perf_counter()
    prep = p.prepare(s.loaded.model, s.ctx)
    t1 = time.perf_counter()
    p.allocate(prep.table, prep.curves)
    t2 = time.perf_counter()
    row = {"part": "timing", "model": s.name, "calibration_samples": sum(len(b) for b in s.calib),
           "curve_points": p.curve_points, **({"fields": fields} if fields else {}), "prepare_seconds": round(t1 - t0, 1), "dp_seconds": round(t2 - t1, 3),
           "total_seconds": round(t2 - t0, 1), "threads": torch.get_num_threads(), "load": [load, os.getloadavg()[0]]}  # fmt: skip
    print(_line(row), flush=True)
    return [row]


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["dense", "quality", "tp", "ft", "additivity", "timing", "acceptance", "speed"])  # fmt: skip
    p.add_argument(
        "--acceptance-calib", type=int, default=64, help="calibration texts of the acceptance row (0: all)"
    )
    p.add_argument(
        "--acceptance-fields", type=json.loads, default={}, help="JSON: other prune_structured fields"
    )
    p.add_argument("--calib-data", default="text", choices=list(prune_calibset.SETS),
                   help="calibration texts: the built-in train split, the stdlib set, or both (prune_calibset.py)")  # fmt: skip
    p.add_argument("--models", nargs="+", default=list(SPECS), choices=list(SPECS))
    p.add_argument("--importances", nargs="+", default=list(IMPORTANCES), choices=list(PASS_IMPORTANCES))
    p.add_argument("--recoveries", nargs="+", default=["none", "lstsq"], choices=list(RECOVERIES))
    p.add_argument("--budgets", type=float, nargs="*", default=[0.3, 0.5, 0.7])
    p.add_argument("--calib", type=int, default=64, help="calibration samples (train split)")
    p.add_argument("--ft-steps", type=int, default=100)
    p.add_argument("--random", type=int, default=8, help="random allocations per budget (additivity)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the passes (1: shared CPU)")
    p.add_argument("--speed-models", nargs="+", default=list(SPEED), choices=list(SPEED))
    p.add_argument("--speed-threads", type=int, default=2, help="threads of the timed runs (torch and ORT)")
    p.add_argument("--report", action="store_true", help="only the table, summary and PNG of the JSON")
    p.add_argument("--merge", type=Path, nargs="*", default=[], help="first merge these JSONs' rows")
    p.add_argument("--out", type=Path, default=OUT)
    return p.parse_args(argv)


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _model_part(part: str, s: Setup, args) -> list[dict]:
    if part == "quality":
        return quality_rows(s, args.budgets, args.importances, args.recoveries)
    if part == "tp":
        return tp_rows(s, args.budgets, 0)
    if part == "ft":
        return ft_rows(s, args.budgets, args.ft_steps) + tp_rows(s, args.budgets, args.ft_steps)
    if part == "additivity":
        return additivity_rows(s, args.budgets, args.random)
    if part == "dense":  # the unpruned model's metrics (the reference of cosine and NN agreement)
        dense = {k: v for k, v in s.dense.items() if k in ("top1", "cosine_mean")}
        return [{"part": "dense", "model": s.name, **dense}]
    return timing_rows(s, args.acceptance_fields) if s.name == "minilm" else []


def _run_part(part: str, args, cache: dict) -> list[dict]:
    if part in ("acceptance", "acceptance-quality", "acceptance-split"):
        from benchmarks.prune_acceptance import acceptance_rows, split_rows  # it imports this module

        if part == "acceptance-split":
            return split_rows(args)
        return acceptance_rows(args, timed=part == "acceptance")
    if part == "speed":
        with _threads(args.speed_threads):
            return prune_speed.rows(args.speed_models, args.budgets, args.calib, args.speed_threads)
    rows = []
    for name in args.models:
        if name not in cache:
            cache[name] = setup(name, args.calib, args.ft_steps, prune_calibset.spec(args.calib_data, name))
        rows += _model_part(part, cache[name], args)
    return rows


def main(argv=None) -> int:
    args = _args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / RESULT
    data = json.loads(path.read_text()) if path.is_file() else {"runs": [], "rows": []}
    for other in args.merge:  # rows of runs written elsewhere (e.g. untimed parts at low priority)
        theirs = json.loads(other.read_text())
        data = merge(data, theirs["rows"], [{**r, "merged_from": str(other)} for r in theirs["runs"]])
    if not args.report:
        data["runs"].append({"date": datetime.datetime.now().isoformat(timespec="seconds"),
                             "command": "python benchmarks/prune.py " + " ".join(argv or sys.argv[1:]),
                             "environment": environment(args.threads), "load_at_start": os.getloadavg()})  # fmt: skip
        cache: dict = {}
        for part in args.parts:
            data = merge(data, _run_part(part, args, cache))
            data["summary"] = summary(data["rows"])
            path.write_text(
                json.dumps(data, indent=1, default=str)
            )  # partial results survive an interruption
    data["summary"] = summary(data["rows"])
    data["plot"] = plot(data["rows"], path.with_suffix(".png"))
    path.write_text(json.dumps(data, indent=1, default=str))
    print(table(data["rows"]))
    print(json.dumps(data["summary"], indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
