"""Where OpenVINO spends the time: per-layer-type profile of prepared deploy files.

    python benchmarks/deploy_ov_profile.py --work DIR --model deit --variants ours-ov ours-ov-qk nncf
                                           [--hint bf16] [--threads 2] [--iterations 20]

Reads the files ``benchmarks/deploy.py --stage prepare`` wrote into ``--work`` (``<model>-<variant>
.onnx`` or NNCF's ``.xml``), compiles each for the CPU with ``PERF_COUNT`` and the precision hint,
runs ``--iterations`` inferences on one fixed random batch of the model's static shapes after three
warm-up runs, and sums OpenVINO's per-node ``real_time`` (median over the iterations) by (layer
type, kernel). The variants alternate per iteration in one process, so a load change hits all of
them. Appends one row per variant to ``benchmarks/results/deploy-ov-profile-<machine>-<date>.json``.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

from edgecompress.bench.env import append_rows, results_file

SHAPES = {"deit": {"x": (8, 3, 224, 224)}, "minilm": {"input_ids": (8, 128), "attention_mask": (8, 128)}}


def _file(work: Path, model: str, variant: str) -> Path:
    xml = work / f"{model}-{variant}.xml"
    return xml if xml.exists() else work / f"{model}-{variant}.onnx"


def _request(core, path: Path, model: str, hint: str, threads: int):
    m = core.read_model(str(path))
    shapes = SHAPES[model]
    m.reshape(
        {i.get_any_name(): list(shapes.get(i.get_any_name(), next(iter(shapes.values())))) for i in m.inputs}
    )
    cfg = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads, "PERF_COUNT": True}
    compiled = core.compile_model(m, "CPU", cfg)
    rng = np.random.default_rng(0)
    feeds = []
    for i in compiled.inputs:
        shape, name = list(i.get_shape()), i.get_any_name()
        if model == "minilm":
            feeds.append(np.ones(shape, np.int64) if "mask" in name else rng.integers(1000, 2000, shape))
        else:
            feeds.append(rng.standard_normal(shape).astype(np.float32))
    return compiled.create_infer_request(), feeds


def main() -> None:
    import openvino as ov

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--model", choices=list(SHAPES), default="deit")
    p.add_argument("--variants", nargs="+", default=["ours-ov", "ours-ov-qk", "nncf"])
    p.add_argument("--hint", default="bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    path, data, meta = results_file(args.out, "deploy-ov-profile", args.threads)
    core = ov.Core()
    reqs = {
        v: _request(core, _file(args.work, args.model, v), args.model, args.hint, args.threads)
        for v in args.variants
    }
    times: dict[str, dict] = {v: defaultdict(list) for v in args.variants}
    for it in range(3 + args.iterations):
        for v, (req, feeds) in reqs.items():
            req.infer(feeds)
            if it >= 3:
                per = defaultdict(float)
                for node in req.profiling_info:
                    per[f"{node.node_type} / {node.exec_type}"] += node.real_time.total_seconds() * 1e3
                for key, ms in per.items():
                    times[v][key].append(ms)
    rows = []
    for v in args.variants:
        by_type = {k: round(float(np.median(x)), 3) for k, x in times[v].items()}
        by_type = dict(sorted(((k, x) for k, x in by_type.items() if x > 0.01), key=lambda kv: -kv[1]))
        rows.append({"model": args.model, "variant": v, "hint": args.hint, "threads": args.threads,
                     "total_ms": round(sum(by_type.values()), 2), "ms_by_layer_type": by_type})  # fmt: skip
        print(
            f"{v}: total {rows[-1]['total_ms']} ms;",
            "; ".join(f"{k} {x}" for k, x in list(by_type.items())[:8]),
        )
    append_rows(path, data, meta, rows)


if __name__ == "__main__":
    main()
