"""The ``speed`` part of benchmarks/prune.py: pruned vs dense latency, and the latency budget's aim.

For demo:vit-digits (batch 8), demo:minilm (batch 8 × 128 tokens) and timm deit_small_patch16_224
with random weights at 224² (batch 1; calibration: digits resized to 224, uniform allocation, no
recovery — its weights are random, only its speed means anything): at each parameter budget the
pass prunes a copy of the model (activation importance; layer-adaptive with least squares on the two
demo models), then the pruned and the dense model are timed alternately in one run
(:func:`edgecompress.bench.run.bench_models`: PyTorch eager on one thread — on this shared CPU
multi-threaded eager calls of small ops wait for descheduled threads (measured: 490 ms for a
vit-digits batch that takes 2 ms in ORT) — and ONNX Runtime on freshly exported graphs with
``--speed-threads``, each checked against its model), and the ratio pruned / dense is recorded.

Latency budget: the same pass with ``budget: {latency: 0.5}`` measures its per-group ORT table
(:mod:`edgecompress.prune.latency`), allocates, and corrects the allocation on the whole model in ORT
for up to ``latency_rounds`` rounds (:mod:`edgecompress.prune.aim`; its rounds are in the row). The
target whole-model ratio is ``1 − 0.5 · s`` with ``s = (L − L₀) / L`` the prunable groups' share:
``L`` the dense model's ORT latency and ``L₀`` that of the model with every prunable branch removed,
both timed here in the same alternated run as the pruned model; it is hit when the measured ratio
is within 10 % of it. ``table_predicted_ratio`` is what the table alone predicts for the kept
allocation (``(L − S + its tabled cost) / L``, ``S`` the table's total).
"""

from __future__ import annotations

import copy
import dataclasses
import os

import torch

from edgecompress.bench.run import bench_models
from edgecompress.calib import make_context
from edgecompress.data.specs import load_samples
from edgecompress.models.loading import LoadedModel, load_model
from edgecompress.prune import PruneStructured
from edgecompress.prune.aim import shrunk_copy, target_ratio

MODELS = {
    "vit-digits": ("demo:vit-digits", 8, "layer_adaptive", "lstsq"),
    "minilm": ("demo:minilm", 8, "layer_adaptive", "lstsq"),
    "deit-s-224": ("timm:deit_small_patch16_224?pretrained=false", 1, "uniform", "none"),
}
SEQ = 128
TIMING = {"min_seconds": 4.0, "min_iters": 20, "warmup_s": 1.0, "max_seconds": 60.0}
LATENCY_BUDGET = 0.5


def _pruned(loaded: LoadedModel, p: PruneStructured, ctx, prep) -> tuple[LoadedModel, dict]:
    c = dataclasses.replace(ctx, notes=[], info={})
    model = p.execute(copy.deepcopy(loaded.model), c, prep)
    new = LoadedModel(
        model.eval(), loaded.spec, loaded.kind, loaded.base, loaded.data_cfg, loaded.tokenizer_dir
    )
    return new, c.info["prune"]


def _ratio(
    pruned: LoadedModel, dense: LoadedModel, backend: str, batch: int, threads: int, empty=None
) -> dict:
    models = {"pruned": pruned, "dense": dense, **({"empty": empty} if empty is not None else {})}
    res = bench_models(models, backend, batch, SEQ, threads, TIMING)
    med = {r["target"]: r["latency"]["median_ms"] for r in res["results"]}
    cvs = {r["target"]: r["latency"]["cv"] for r in res["results"]}
    return {"backend": backend, "batch": res["batch"], "pruned_ms": med["pruned"], "dense_ms": med["dense"],
            **({"empty_ms": med["empty"]} if empty is not None else {}),
            "ratio": round(med["pruned"] / med["dense"], 4), "cv": cvs, "warnings": res["warnings"]}  # fmt: skip


def _setup(spec: str, calib_n: int):
    loaded = load_model(spec)
    n = min(calib_n, 16) if "deit" in spec else calib_n
    calib = list(load_samples(None, loaded, "train", n, 16 if "deit" in spec else 32))
    return loaded, make_context(calib, loaded.call, torch.device("cpu"), kind=loaded.kind)


def model_rows(name: str, budgets, calib_n: int, threads: int) -> list[dict]:
    spec, batch, alloc, rec = MODELS[name]
    loaded, ctx = _setup(spec, calib_n)
    base = PruneStructured(
        importance="activation", allocation=alloc, recovery=rec, ridge=1.0, latency_batch=batch
    )
    prep = base.prepare(loaded.model, ctx)
    rows = []
    for b in budgets:
        pruned, info = _pruned(loaded, dataclasses.replace(base, budget={"params": b}), ctx, prep)
        for backend in ("torch", "onnxruntime"):
            load = os.getloadavg()[0]
            r = _ratio(pruned, loaded, backend, batch, 1 if backend == "torch" else threads)
            rows.append({"part": "speed", "model": name, "what": "params", "budget": b, "allocation": alloc,
                         "removed": round(info["removed"], 4), "params_after": info["params_after"], **r,
                         "speedup": round(1 / r["ratio"], 3), "load": [load, os.getloadavg()[0]]})  # fmt: skip
            print(rows[-1], flush=True)
    rows.append(latency_target_row(name, loaded, ctx, base, prep, batch, threads))
    print(rows[-1], flush=True)
    return rows


def latency_target_row(name, loaded, ctx, base, prep, batch: int, threads: int) -> dict:
    p = dataclasses.replace(base, budget={"latency": LATENCY_BUDGET})
    table = p.table(loaded.model, prep.groups, prep.stats, ctx)
    prep = dataclasses.replace(prep, table=table)
    pruned, info = _pruned(loaded, p, ctx, prep)
    no_branch = shrunk_copy(loaded.model, prep.groups, {g.name: [] for g in prep.groups}, prep.stats)
    empty = dataclasses.replace(loaded, model=no_branch.eval())
    load = os.getloadavg()[0]
    r = _ratio(pruned, loaded, "onnxruntime", batch, threads, empty)
    share = (r["dense_ms"] - r["empty_ms"]) / r["dense_ms"]
    target = target_ratio(LATENCY_BUDGET, share)
    by_table = (r["dense_ms"] - info["cost_total"] + info["cost_after"]) / r["dense_ms"]
    return {"part": "speed", "model": name, "what": "latency_target", "budget": LATENCY_BUDGET, **r,
            "table_dense_ms": round(info["cost_total"], 3), "table_pruned_ms": round(info["cost_after"], 3),
            "latency_aim": info.get("latency_aim"), "table_predicted_ratio": round(by_table, 4),
            "share": round(share, 4), "predicted_ratio": round(target, 4), "measured_over_predicted": round(r["ratio"] / target, 4),
            "within_10_percent": abs(r["ratio"] / target - 1) <= 0.10, "params_after": info["params_after"],
            "load": [load, os.getloadavg()[0]]}  # fmt: skip


def rows(models, budgets, calib_n: int, threads: int) -> list[dict]:
    out = []
    for name in models:
        out += model_rows(name, budgets, calib_n, threads)
    return out
