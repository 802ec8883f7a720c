"""INT8 deployment on this CPU with ONNX Runtime: FP32 vs our INT8 vs ORT's own static quantizer.

    python benchmarks/deploy.py [--models minilm deit] [--threads 2] [--seconds 3] [--iterations 100]
                                [--samples 128] [--quick]

For each model (``demo:minilm`` at batch 8 × 128 tokens; ``timm:deit_small_patch16_224`` with
random weights at batch 8), all ONNX files exported with ``edgecompress`` (opset 20, static batch 8):

* ``fp32``: the float model, with the same explicit attention as the INT8 models (for MiniLM
  that graph is ~3 % faster in ORT than the SDPA export, so it is the stronger baseline);
* ``ours``: ``uniform_ptq`` W8A8 (recipe ``uniform_w8a8``: per-channel asymmetric INT8 weights,
  per-tensor activations at every Linear input and both attention matmuls), INT8 Q/DQ graph;
* ``ours-linear``: the same with ``quantize_attention: false`` (only the Linear layers in INT8);
* ``ort-default``: ``onnxruntime.quantization.quantize_static`` on the FP32 file (after
  ``quant_pre_process``; QDQ, INT8 activations and weights, per-channel), run with ORT defaults;
* ``ort-tuned``: the same quantizer restricted to MatMul and Gemm (``op_types_to_quantize``, as ORT
  recommends for transformers) with ``DedicatedQDQPair``, run with the session settings we use
  for Q/DQ graphs (``MatMulAddFusion`` and CSE off): ORT's quantizer at its best here.

All INT8 variants calibrate on the same data: the first 32 samples of the default calibration
split (digits train images / built-in train texts). Fidelity is measured against the FP32 ONNX
model on ``--samples`` evaluation samples (digits test / built-in test texts): cosine of the
mean-pooled embeddings (MiniLM) or top-1 agreement and logits cosine (DeiT).

Latency: every variant of a model in one process, timed round-robin (``time_alternating``:
1 s warm-up, then ≥ ``--iterations`` runs and ≥ ``--seconds`` per variant), ``--threads``
intra-op threads, spinning off. The round is run twice; ``stable`` says whether the two medians
differ by less than the reported spread (the interquartile range). ``repeat_check_ours`` does
the same with two separate ``edgecompress bench`` runs (the public API) of our INT8 file. Results go to
``benchmarks/results/deploy-<machine>-<date>.json`` with the environment (CPU flags, load).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgecompress.bench.backends import feeds_for  # noqa: E402
from edgecompress.bench.env import environment  # noqa: E402
from edgecompress.bench.timing import time_alternating  # noqa: E402
from edgecompress.calib import make_context  # noqa: E402
from edgecompress.data.specs import load_data  # noqa: E402
from edgecompress.export.inputs import as_tuple, input_names  # noqa: E402
from edgecompress.export.onnx import export_onnx  # noqa: E402
from edgecompress.export.runtime import optimized_ops, ort_session  # noqa: E402
from edgecompress.models.loading import LoadedModel, load_model  # noqa: E402
from edgecompress.pipeline import run  # noqa: E402
from edgecompress.recipe import load_recipe  # noqa: E402

MODELS = {"minilm": "demo:minilm", "deit": "timm:deit_small_patch16_224?pretrained=false"}
BATCH, SEQ, CALIB = 8, 128, 32
ORT_DEFAULTS = {"ort-default"}  # variants run with ORT's default session settings


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--samples", type=int, default=128, help="evaluation samples for fidelity")
    p.add_argument("--quick", action="store_true", help="10 iterations, 16 samples (a smoke run)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--suffix", default="", help="appended to the result file name (e.g. -t1)")
    return p.parse_args()


def _float_explicit(loaded: LoadedModel) -> LoadedModel:
    """The float model with the explicit attention the INT8 models have (its FP32 graph is the faster)."""
    from edgecompress.models.attention import explicit_attention_

    model = copy.deepcopy(loaded.model)
    explicit_attention_(model)
    return LoadedModel(
        model.eval(), loaded.spec, loaded.kind, loaded.base, loaded.data_cfg, loaded.tokenizer_dir
    )


def _calibration(loaded: LoadedModel) -> list:
    return load_data(None, loaded, "train", CALIB, BATCH).batches


def _ours(loaded: LoadedModel, batches: list, overrides: list[str]) -> LoadedModel:
    model = copy.deepcopy(loaded.model)
    ctx = make_context(batches, loaded.call, torch.device("cpu"))
    model, _ = run(model, load_recipe("uniform_w8a8", overrides).passes, ctx)
    return LoadedModel(
        model.eval(), loaded.spec, loaded.kind, loaded.base, loaded.data_cfg, loaded.tokenizer_dir
    )


def _ort_quantized(loaded: LoadedModel, fp32: Path, batches: list, out: Path, tuned: bool) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    feeds = [{n: t.numpy() for n, t in zip(input_names(loaded), as_tuple(loaded, b))} for b in batches]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    tuning = (
        {"op_types_to_quantize": ["MatMul", "Gemm"], "extra_options": {"DedicatedQDQPair": True}}
        if tuned
        else {}
    )
    quantize_static(
        str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, **tuning,
    )  # fmt: skip
    return out


def export_variants(name: str, work: Path) -> tuple[LoadedModel, dict[str, Path], dict]:
    """Every ONNX file of one model, and how long each step took."""
    torch.manual_seed(0)  # the same random DeiT weights in every run
    loaded = load_model(MODELS[name])
    batches = _calibration(loaded)
    files, seconds = {}, {}
    t0 = time.perf_counter()
    files["fp32"] = export_onnx(_float_explicit(loaded), work / f"{name}-fp32.onnx", batch=BATCH).path
    for variant, overrides in (("ours", []), ("ours-linear", ["passes.0.quantize_attention=false"])):
        t = time.perf_counter()
        files[variant] = export_onnx(
            _ours(loaded, batches, overrides), work / f"{name}-{variant}.onnx", batch=BATCH
        ).path
        seconds[variant] = round(time.perf_counter() - t, 1)
    for variant, tuned in (("ort-default", False), ("ort-tuned", True)):
        t = time.perf_counter()
        files[variant] = _ort_quantized(
            loaded, files["fp32"], batches, work / f"{name}-{variant}.onnx", tuned
        )
        seconds[variant] = round(time.perf_counter() - t, 1)
    seconds["all"] = round(time.perf_counter() - t0, 1)
    return loaded, files, seconds


def _pool(y: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    e = (y * m).sum(1) / np.maximum(m.sum(1), 1)
    return e / np.linalg.norm(e, axis=-1, keepdims=True)


def _outputs(sess, loaded: LoadedModel, batches: list) -> list[np.ndarray]:
    names = [i.name for i in sess.get_inputs()]
    outs = []
    for b in batches:
        tensors = as_tuple(loaded, b)
        if tensors[0].shape[0] != BATCH:
            continue  # static batch graphs: skip a short last batch
        outs.append(np.asarray(sess.run(None, {n: t.numpy() for n, t in zip(names, tensors)})[0], np.float64))
    return outs


def fidelity(loaded: LoadedModel, files: dict[str, Path], samples: int) -> dict:
    """Agreement of every variant with the FP32 ONNX model on the evaluation data."""
    batches = load_data(None, loaded, "test", samples, BATCH).batches
    outs = {
        v: _outputs(ort_session(p, ort_defaults=v in ORT_DEFAULTS), loaded, batches) for v, p in files.items()
    }
    ref = outs["fp32"]
    result = {}
    for variant, ys in outs.items():
        if loaded.kind == "encoder":
            masks = [b["attention_mask"].numpy() for b in batches if b["input_ids"].shape[0] == BATCH]
            cos = np.concatenate([(_pool(y, m) * _pool(r, m)).sum(-1) for y, r, m in zip(ys, ref, masks)])
            result[variant] = {
                "cosine_mean": round(float(cos.mean()), 5),
                "cosine_min": round(float(cos.min()), 5),
            }
        else:
            y, r = np.concatenate(ys), np.concatenate(ref)
            cos = (y * r).sum(-1) / (np.linalg.norm(y, axis=-1) * np.linalg.norm(r, axis=-1))
            agree = float((y.argmax(-1) == r.argmax(-1)).mean()) * 100
            result[variant] = {
                "top1_agreement": round(agree, 2),
                "logits_cosine_mean": round(float(cos.mean()), 5),
            }
        result[variant]["samples"] = int(sum(len(y) for y in ys))
    return result


def latency(files: dict[str, Path], threads: int, timing: dict, rounds: int = 2) -> dict:
    """Round-robin timing of all variants, ``rounds`` times; medians, p90, speed-ups, stability."""
    sessions = {
        v: ort_session(p, threads, ort_defaults=v in ORT_DEFAULTS, spinning=False) for v, p in files.items()
    }
    feeds = {v: feeds_for(s, BATCH, SEQ) for v, s in sessions.items()}
    calls = [lambda s=s, f=feeds[v]: s.run(None, f) for v, s in sessions.items()]
    runs = [time_alternating(calls, **timing) for _ in range(rounds)]
    out = {}
    for k, variant in enumerate(sessions):
        first, second = runs[0][k], runs[-1][k]
        spread = max(first["iqr_ms"], second["iqr_ms"])
        out[variant] = {
            **first,
            "median_ms_round2": second["median_ms"],
            "stable": abs(first["median_ms"] - second["median_ms"]) < spread,
            "speedup_vs_fp32": round(runs[0][0]["median_ms"] / first["median_ms"], 3),
        }
    return out


def repeat_check(path: Path, threads: int, timing: dict) -> dict:
    """Two separate ``edgecompress bench`` runs of one file: do their medians differ by less than the spread?"""
    from edgecompress.bench.run import bench

    runs = [
        bench(str(path), "onnxruntime", BATCH, SEQ, threads, timing=timing)["results"][0]["latency"]
        for _ in range(2)
    ]
    spread = max(r["iqr_ms"] for r in runs)
    delta = abs(runs[0]["median_ms"] - runs[1]["median_ms"])
    return {"medians_ms": [r["median_ms"] for r in runs], "iqr_ms": [r["iqr_ms"] for r in runs],
            "cv": [r["cv"] for r in runs], "delta_ms": round(delta, 3), "stable": delta < spread}  # fmt: skip


def kernels(files: dict[str, Path]) -> dict:
    """Integer kernels and remaining float MatMuls in the graph ORT runs, per variant."""
    out = {}
    for v, p in files.items():
        ops = optimized_ops(p, ort_defaults=v in ORT_DEFAULTS)
        out[v] = {"integer_kernels": ops["integer_kernels"], "float_matmuls": ops["float_matmuls"]}
    return out


def table(name: str, res: dict) -> list[str]:
    lines = [
        f"\n{name} (batch {BATCH}{f', {SEQ} tokens' if name == 'minilm' else ''}, ORT {res['threads']} threads)"
    ]
    lines.append(
        "| variant | median ms | p90 ms | speed-up vs FP32 | fidelity vs FP32 | int8 / float matmuls | stable |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for v, lat in res["latency"].items():
        fid = res["fidelity"][v]
        f = f"cos {fid['cosine_mean']} (min {fid['cosine_min']})" if "cosine_mean" in fid else (
            f"top-1 {fid['top1_agreement']}%, cos {fid['logits_cosine_mean']}")  # fmt: skip
        k = res["kernels"][v]
        lines.append(
            f"| {v} | {lat['median_ms']:.1f} | {lat['p90_ms']:.1f} | {lat['speedup_vs_fp32']:.2f}x | {f} | "
            f"{sum(k['integer_kernels'].values())} / {k['float_matmuls']} | {lat['stable']} "
            f"({lat['median_ms_round2']:.1f}, IQR {lat['iqr_ms']:.1f}) |"
        )
    return lines


def main() -> None:
    args = _args()
    if args.quick:
        args.iterations, args.samples, args.seconds = 10, 16, 0.5
    timing = {"min_seconds": args.seconds, "min_iters": args.iterations, "warmup_s": 1.0}
    results, lines = {}, []
    env_before = environment(args.threads)
    with tempfile.TemporaryDirectory(prefix="ec-deploy-") as tmp:
        for name in args.models:
            loaded, files, seconds = export_variants(name, Path(tmp))
            res = {"model": MODELS[name], "threads": args.threads, "prepare_seconds": seconds}
            res["fidelity"] = fidelity(loaded, files, args.samples)
            res["kernels"] = kernels(files)
            res["latency"] = latency(files, args.threads, timing)
            res["repeat_check_ours"] = repeat_check(files["ours"], args.threads, timing)
            res["load_average_after"] = environment(args.threads)["cpu"]["load_average"]
            results[name] = res
            rc = res["repeat_check_ours"]
            note = f"two separate bench runs of ours: medians {rc['medians_ms']} ms, IQR {rc['iqr_ms']}, stable {rc['stable']}"
            lines += [*table(name, res), note]
            print("\n".join(table(name, res) + [note]), flush=True)
    meta = {
        "machine": socket.gethostname(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "method": {**timing, "rounds": 2, "batch": BATCH, "seq": SEQ, "calibration_samples": CALIB},
        "environment": env_before,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"deploy-{meta['machine']}-{datetime.date.today().isoformat()}{args.suffix}.json"
    path.write_text(json.dumps({**meta, "results": results, "table": lines}, indent=1, default=str))
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
