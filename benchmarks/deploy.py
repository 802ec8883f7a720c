"""INT8 deployment on this CPU: ONNX Runtime and OpenVINO side by side, FP32 vs ours vs their own quantizers.

    python benchmarks/deploy.py [--models minilm deit] [--threads 2] [--seconds 3] [--iterations 100]
                                [--samples 128] [--max-seconds 900] [--variants ...] [--quick]
                                [--work DIR --stage prepare|time]

On a shared machine, run the untimed part apart from the timing: ``--stage prepare`` exports every
variant and measures its fidelity into ``--work`` (low priority, no lock), ``--stage time`` then
times those files (under the bench lock); ``--stage all`` (default) does both in one run. The
preparation lives in ``benchmarks/deploy_variants.py``.

For each model (``demo:minilm`` at batch 8 × 128 tokens; ``timm:deit_small_patch16_224`` with
random weights at batch 8), all ONNX files exported with ``edgecompress`` (opset 20, static batch 8).
In ONNX Runtime (``ort_runner``: our session settings for Q/DQ graphs, spinning off):

* ``fp32``: the float model, with the same explicit attention as the INT8 models (for MiniLM
  that graph is ~3 % faster in ORT than the SDPA export, so it is the stronger baseline);
* ``ours``: ``uniform_ptq`` W8A8 (recipe ``uniform_w8a8``: per-channel asymmetric INT8 weights,
  per-tensor activations at every Linear input and both attention matmuls), INT8 Q/DQ graph,
  weight codes as ``export`` picks them for this CPU (``auto``: UINT8 without VNNI);
* ``ours-linear``: the same with ``quantize_attention: false`` (only the Linear layers in INT8);
* ``ort-default``: ``onnxruntime.quantization.quantize_static`` on the FP32 file (after
  ``quant_pre_process``; QDQ, INT8 activations and weights, per-channel), run with ORT defaults;
* ``ort-tuned``: the same quantizer restricted to MatMul and Gemm (``op_types_to_quantize``, as ORT
  recommends for transformers) with ``DedicatedQDQPair``, run with the session settings we use
  for Q/DQ graphs (``MatMulAddFusion`` and CSE off): ORT's static quantizer at its best here;
* ``ort-dynamic``: ``onnxruntime.quantization.quantize_dynamic`` on the FP32 file (INT8 weights
  per channel, activations quantized at run time, no calibration; ``reduce_range`` (7-bit weights)
  where this CPU has no VNNI, as ORT recommends against u8×s8 saturation), ORT defaults.

In OpenVINO (``ov_runner``: ``read_model`` of the ONNX file, CPU plugin, ``PERFORMANCE_HINT``
LATENCY, ``--threads`` inference threads, reshaped to the static shapes it is fed):

* ``ov-fp32`` / ``ov-bf16``: the FP32 ONNX with ``INFERENCE_PRECISION_HINT`` f32 / bf16; the row
  records the precision the compiled model reports (bf16 needs AVX512-BF16 or AMX, else f32);
* ``ov-ours``: our INT8 file of ``ours`` (the same bytes): asymmetric weights, which OpenVINO runs
  as weight-only decompression (float GEMMs; see ``OV_INT8_PATTERN``);
* ``ov-ours-ov`` / ``ov-ours-ov-bf16``: ours for OpenVINO — recipe ``uniform_w8a8_openvino``
  (symmetric per-channel INT8 weights, per-tensor activations, SmoothQuant, attention as the
  recipe sets it; before 2026-12-06 asymmetric activations and attention float) exported as ``export --format openvino`` writes it (INT8 weight codes), with the f32 /
  bf16 precision hint (bf16: what stays float runs on AMX);
* ``ov-ours-ov-attn`` / ``-bf16``: the same recipe with all four attention inputs quantized and
  ``symmetric: true`` (q, k, v symmetric, the softmax output unsigned: zero-point 0 on both sides
  of both attention matmuls, which OpenVINO needs to run them in INT8; Linear inputs symmetric too);
* ``ov-ours-ov-qk`` / ``-bf16``: q·kᵀ quantized as NNCF does for transformers (``attention_inputs:
  [q, k]``, ``symmetric_attention: true``; softmax·v stays float), Linear inputs asymmetric
  (``symmetric: false``); ``ov-ours-ov-sym-qk`` / ``-bf16``: the same with every activation
  symmetric (``symmetric: true``), which is the recipe's own setting since 2026-12-06;
* ``ov-nncf`` / ``ov-nncf-bf16``: ``nncf.quantize`` of the FP32 model (read by OpenVINO) with
  ``model_type=TRANSFORMER`` and NNCF's defaults otherwise, calibrated on the same batches as
  ours, f32 / bf16 hint.

All INT8 variants calibrate on the same data: the first 32 samples of the default calibration
split (digits train images / built-in train texts), in batches of 8. Fidelity is measured for
every variant against the FP32 ONNX model in ORT on ``--samples`` evaluation samples (digits test /
built-in test texts): cosine of the mean-pooled embeddings (MiniLM) or top-1 agreement and logits
cosine (DeiT). Each row also lists its GEMMs in INT8 vs float (ORT: integer kernels vs float
MatMul/Gemm after its fusions; OpenVINO: FullyConnected/MatMul layers whose kernel is an integer one).

Latency: every variant of a model in one process, timed round-robin (``time_alternating``:
1 s warm-up, then ≥ ``--iterations`` runs and ≥ ``--seconds`` per variant, a round stopping at
``--max-seconds``), on the same synthetic inputs of the static shapes. The round is run twice;
``stable`` says whether the two medians differ by less than the reported spread (the
interquartile range). Speed-ups are ratios to ORT FP32 in the same round: on a shared machine
they, not the absolute milliseconds, are the result (the load average is recorded before and
after). ``repeat_check_ours`` does the same with two separate ``edgecompress bench`` runs (the
public API) of our INT8 file. Results go to ``benchmarks/results/deploy-<machine>-<date>.json``
with the environment (CPU flags, load, OpenVINO/NNCF versions).
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# run as a script, benchmarks/ is sys.path[0]: its kernels.py would shadow the `kernels` package
# that transformers probes for (ImportError on import of any BERT model)
sys.path = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

from benchmarks.deploy_variants import (  # noqa: E402
    BATCH,
    CALIB,
    MODELS,
    ORT_DEFAULTS,
    OV_INT8_PATTERN,
    OV_VARIANTS,
    SEQ,
    VARIANTS,
    export_variants,
    fidelity,
    variant_file,
)
from edgecompress.bench.backends import Runner, ort_runner, ov_runner  # noqa: E402
from edgecompress.bench.env import environment  # noqa: E402
from edgecompress.bench.timing import time_alternating  # noqa: E402
from edgecompress.export.openvino import gemm_summary  # noqa: E402
from edgecompress.export.runtime import optimized_ops  # noqa: E402


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                   help="rows to run (fp32, the baseline, is always run)")  # fmt: skip
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--max-seconds", type=float, default=900.0, help="cap of one timing round")
    p.add_argument("--samples", type=int, default=128, help="evaluation samples for fidelity")
    p.add_argument("--quick", action="store_true", help="10 iterations, 16 samples (a smoke run)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--suffix", default="", help="appended to the result file name (e.g. -t1)")
    p.add_argument("--machine", default=socket.gethostname(), help="machine name in the result file name")
    p.add_argument("--file", help="result file name (default deploy-<machine>-<date><suffix>.json)")
    p.add_argument(
        "--work", type=Path, help="keep the exported files in this folder (default: a temporary one)"
    )
    p.add_argument("--stage", choices=("all", "prepare", "time"), default="all",
                   help="prepare: files + fidelity into --work, untimed (run it at low priority); "
                   "time: the timing of what prepare left in --work (run it under the bench lock)")  # fmt: skip
    args = p.parse_args()
    if args.stage != "all" and args.work is None:
        p.error(f"--stage {args.stage} needs --work (the folder the two stages share)")
    args.variants = ["fp32"] + [v for v in VARIANTS if v in args.variants and v != "fp32"]
    return args


def runners(files: dict[str, Path], variants: list[str], threads: int) -> dict[str, Runner]:
    """One prepared runner per variant (the ``edgecompress bench`` backends), on the static shapes."""
    out = {}
    for v in variants:
        path = variant_file(v, files)
        if v in OV_VARIANTS:
            out[v] = ov_runner(path, BATCH, SEQ, threads, OV_VARIANTS[v][1])
        else:
            out[v] = ort_runner(path, BATCH, SEQ, threads, ort_defaults=v in ORT_DEFAULTS)
    shapes = {v: r.shapes for v, r in out.items()}
    if len({str(list(s.values())) for s in shapes.values()}) != 1:
        raise SystemExit(f"variants run on different input shapes: {shapes}")
    return out


def latency(runs_on: dict[str, Runner], timing: dict, rounds: int = 2) -> dict:
    """Round-robin timing of all variants, ``rounds`` times; medians, p90, speed-ups, stability."""
    calls = [r.call for r in runs_on.values()]
    runs = [time_alternating(calls, **timing) for _ in range(rounds)]
    out = {}
    for k, variant in enumerate(runs_on):
        first, second = runs[0][k], runs[-1][k]
        spread = max(first["iqr_ms"], second["iqr_ms"])
        out[variant] = {
            **first,
            "median_ms_round2": second["median_ms"],
            "stable": abs(first["median_ms"] - second["median_ms"]) < spread,
            "speedup_vs_fp32": round(runs[0][0]["median_ms"] / first["median_ms"], 3),
            "speedup_vs_fp32_round2": round(runs[-1][0]["median_ms"] / second["median_ms"], 3),
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


def kernels(files: dict[str, Path], runs_on: dict[str, Runner]) -> dict:
    """INT8 vs float GEMMs in the graph each runtime actually runs, per variant."""
    out = {}
    for v, r in runs_on.items():
        if v in OV_VARIANTS:
            out[v] = gemm_summary(r.info["matmul_precisions"])
        else:
            ops = optimized_ops(variant_file(v, files), ort_defaults=v in ORT_DEFAULTS)
            out[v] = {
                "int8_gemms": sum(ops["integer_kernels"].values()),
                "float_gemms": ops["float_matmuls"],
                "integer_kernels": ops["integer_kernels"],
            }
    return out


def _runtime_label(variant: str, info: dict) -> str:
    if variant not in OV_VARIANTS:
        return "ORT (defaults)" if variant in ORT_DEFAULTS else "ORT"
    asked, got = info["config"]["INFERENCE_PRECISION_HINT"], info["compiled"]["INFERENCE_PRECISION_HINT"]
    return f"OpenVINO {got}" if asked == got else f"OpenVINO {asked} hint → ran {got}"


def table(name: str, res: dict) -> list[str]:
    lines = [
        f"\n{name} (batch {BATCH}{f', {SEQ} tokens' if name == 'minilm' else ''}, {res['threads']} threads; "
        f"load {res['load_average_before']} before, {res['load_average_after']} after)"
    ]
    lines.append(
        "| variant | runtime | median ms | p90 ms | vs ORT FP32 (round 2) | fidelity vs FP32 | INT8 / float GEMMs | stable |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    for v, lat in res["latency"].items():
        fid = res["fidelity"][v]
        f = f"cos {fid['cosine_mean']} (min {fid['cosine_min']})" if "cosine_mean" in fid else (
            f"top-1 {fid['top1_agreement']}%, cos {fid['logits_cosine_mean']}")  # fmt: skip
        k = res["kernels"][v]
        lines.append(
            f"| {v} | {res['runtime'][v]['label']} | {lat['median_ms']:.1f} | {lat['p90_ms']:.1f} | "
            f"{lat['speedup_vs_fp32']:.2f}x ({lat['speedup_vs_fp32_round2']:.2f}x) | {f} | "
            f"{k['int8_gemms']} / {k['float_gemms']} | {lat['stable']} "
            f"({lat['median_ms_round2']:.1f}, IQR {lat['iqr_ms']:.1f}) |"
        )
    return lines


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for lib in ("openvino", "nncf"):
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    return out


def prepared(name: str, work: Path, args: argparse.Namespace) -> dict:
    """The variants' files, preparation times, notes and fidelity: made now (and kept in ``work``
    as ``<name>-prepared.json``), or with ``--stage time`` read back from there."""
    cache = work / f"{name}-prepared.json"
    if args.stage == "time":
        if not cache.is_file():
            raise SystemExit(f"--stage time: no {cache}; run --stage prepare with this --work first")
        prep = json.loads(cache.read_text())
        if missing := [v for v in args.variants if v not in prep["fidelity"]]:
            raise SystemExit(f"--stage time: {cache} has no {missing}; prepare them first")
        prep["files"] = {k: Path(v) for k, v in prep["files"].items()}
        return prep
    loaded, files, seconds, notes = export_variants(name, work, args.variants)
    fid = fidelity(loaded, files, args.variants, args.samples)
    prep = {
        "files": files,
        "prepare_seconds": seconds,
        "notes": notes,
        "fidelity": fid,
        "samples": args.samples,
    }
    cache.write_text(json.dumps(prep, indent=1, default=str))
    print(f"{name}: fidelity {json.dumps(fid)}", flush=True)
    return prep


def timed(name: str, prep: dict, args: argparse.Namespace, timing: dict) -> dict:
    """Latency of every variant of one model (round-robin, two rounds), kernels, repeat check."""
    files = prep["files"]
    res = {"model": MODELS[name], "threads": args.threads, **{k: v for k, v in prep.items() if k != "files"}}
    runs_on = runners(files, args.variants, args.threads)
    res["runtime"] = {v: {"label": _runtime_label(v, r.info), **r.info} for v, r in runs_on.items()}
    res["inputs"] = next(iter(runs_on.values())).shapes
    res["kernels"] = kernels(files, runs_on)
    res["load_average_before"] = environment(args.threads)["cpu"]["load_average"]
    res["latency"] = latency(runs_on, timing)
    del runs_on
    if "ours" in args.variants:
        res["repeat_check_ours"] = repeat_check(files["ours"], args.threads, timing)
    res["load_average_after"] = environment(args.threads)["cpu"]["load_average"]
    return res


def main() -> None:
    args = _args()
    if args.quick:
        args.iterations, args.samples, args.seconds = 10, 16, 0.5
    timing = {
        "min_seconds": args.seconds, "min_iters": args.iterations, "warmup_s": 1.0,
        "max_seconds": args.max_seconds,
    }  # fmt: skip
    results, lines = {}, []
    env_before = environment(args.threads)
    with tempfile.TemporaryDirectory(prefix="ec-deploy-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            prep = prepared(name, work, args)
            if args.stage == "prepare":
                continue
            results[name] = res = timed(name, prep, args, timing)
            note = []
            if rc := res.get("repeat_check_ours"):
                note = [
                    f"two separate bench runs of ours: medians {rc['medians_ms']} ms, IQR {rc['iqr_ms']}, stable {rc['stable']}"
                ]
            lines += [*table(name, res), *note]
            print("\n".join(table(name, res) + note), flush=True)
    if args.stage == "prepare":
        return
    meta = {
        "machine": args.machine,
        "hostname": socket.gethostname(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "method": {**timing, "rounds": 2, "batch": BATCH, "seq": SEQ, "calibration_samples": CALIB},
        "environment": {**env_before, "runtimes": _versions()},
        "openvino_int8_pattern": OV_INT8_PATTERN,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = args.file or f"deploy-{meta['machine']}-{datetime.date.today().isoformat()}{args.suffix}.json"
    path = args.out / name
    path.write_text(json.dumps({**meta, "results": results, "table": lines}, indent=1, default=str))
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
