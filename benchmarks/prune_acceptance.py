"""The ``acceptance`` / ``acceptance-quality`` parts of benchmarks/prune.py (MiniLM at 50 %, closed form only).

``acceptance-quality`` (untimed, low priority) prunes with the pass's defaults plus
``--acceptance-fields``, on ``--acceptance-calib`` texts of ``--calib-data``, measures the embedding
cosine on the built-in test texts and saves the model in a temporary cache; ``acceptance`` (under the
bench lock) restores that model and only times it against the dense model in ONNX Runtime.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from benchmarks import prune_calibset, prune_speed
from benchmarks.prune import Setup, _cut, _line, _metrics, _threads, setup
from edgecompress.models.loading import restore
from edgecompress.prune import PruneStructured
from edgecompress.structure import save

CACHE = Path(tempfile.gettempdir()) / "edgecompress-prune-acceptance"  # the pruned acceptance model


def _acceptance_model(args, fresh: bool) -> tuple[Setup, torch.nn.Module, dict]:
    """The acceptance setting on MiniLM: 50 % of the attention + MLP parameters, closed-form recovery
    only (the pass's defaults: activation, layer_adaptive, lstsq; plus ``--acceptance-fields``); pruned
    here, or restored from the cache where an (untimed, low-priority) ``acceptance-quality`` run with
    the same settings saved it, so that the bench lock is held only for the timing."""
    n, fields = args.acceptance_calib, args.acceptance_fields
    s = setup("minilm", n, 0, prune_calibset.spec(args.calib_data))
    folder = CACHE / f"{args.calib_data}-{n}-{json.dumps(fields, sort_keys=True)}".replace("/", "_")
    if fresh:  # an untimed run prunes anew: a cached model may come from older code
        shutil.rmtree(folder, ignore_errors=True)
    if (folder / "row.json").is_file():
        return s, restore(folder).eval(), json.loads((folder / "row.json").read_text())
    p = PruneStructured(budget={"params": 0.5}, **fields)
    model, info = _cut(s, p, p.prepare(s.loaded.model, s.ctx))
    row = {"model": "minilm", "calibration": f"{args.calib_data}:{n}", "fields": fields,
           "calibration_samples": sum(len(b) for b in s.calib), "budget": 0.5, **_metrics(s, model), **info}  # fmt: skip
    if not folder.exists():
        save(model, folder, {})
        (folder / "row.json").write_text(json.dumps(row, default=str))
    return s, model.eval(), row


def acceptance_rows(args, timed: bool = True) -> list[dict]:
    """The acceptance row: embedding cosine (target ≥ 0.95) and, when ``timed``, the ORT latency ratio
    (target ≤ 0.65×; batch 8 × 128 tokens, alternated with the dense model)."""
    load = os.getloadavg()[0]
    s, model, row = _acceptance_model(args, fresh=not timed)
    row = {**row, "cosine_target_met": row["cosine_mean"] >= 0.95, "load": [load, os.getloadavg()[0]]}
    if not timed:
        print(_line(row), flush=True)
        return [{"part": "acceptance_quality", **row}]
    threads = args.speed_threads
    with _threads(threads):
        load = os.getloadavg()[0]
        speed = prune_speed._ratio(dataclasses.replace(s.loaded, model=model), s.loaded, "onnxruntime", 8, threads)  # fmt: skip
        row["load"] = [load, os.getloadavg()[0]]  # around the timing
    row = {"part": "acceptance", **row, "ort": speed, "speedup": round(1 / speed["ratio"], 3),
           "latency_target_met": speed["ratio"] <= 0.65}  # fmt: skip
    print(_line(row), flush=True)
    return [row]
