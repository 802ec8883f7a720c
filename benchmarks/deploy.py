"""INT8 deployment on this CPU: ONNX Runtime and OpenVINO side by side, FP32 vs ours vs their own quantizers.

    python benchmarks/deploy.py [--models minilm deit] [--threads 2] [--seconds 3] [--iterations 100]
                                [--samples 128] [--max-seconds 900] [--variants ...] [--quick]

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
  (symmetric per-channel INT8 weights, asymmetric per-tensor activations; the recipe's attention
  setting) exported as ``export --format openvino`` writes it (INT8 weight codes), with the f32 /
  bf16 precision hint (bf16: what stays float runs on AMX);
* ``ov-ours-ov-attn`` / ``-bf16``: the same recipe with ``quantize_attention: true`` and
  ``symmetric: true`` (q, k, v symmetric, the softmax output unsigned: zero-point 0 on both sides
  of both attention matmuls, which OpenVINO needs to run them in INT8; Linear inputs symmetric too);
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
# run as a script, benchmarks/ is sys.path[0]: its kernels.py would shadow the `kernels` package
# that transformers probes for (ImportError on import of any BERT model)
sys.path = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

from edgecompress.bench.backends import Runner, openvino, ort_runner, ov_runner  # noqa: E402
from edgecompress.bench.env import environment  # noqa: E402
from edgecompress.bench.timing import time_alternating  # noqa: E402
from edgecompress.calib import make_context  # noqa: E402
from edgecompress.data.specs import load_data  # noqa: E402
from edgecompress.export.inputs import as_tuple, input_names  # noqa: E402
from edgecompress.export.onnx import export_onnx  # noqa: E402
from edgecompress.export.openvino import gemm_summary  # noqa: E402
from edgecompress.export.runtime import optimized_ops, ort_session, u8s8_saturates  # noqa: E402
from edgecompress.models.loading import LoadedModel, load_model  # noqa: E402
from edgecompress.pipeline import run  # noqa: E402
from edgecompress.recipe import load_recipe  # noqa: E402

MODELS = {"minilm": "demo:minilm", "deit": "timm:deit_small_patch16_224?pretrained=false"}
BATCH, SEQ, CALIB = 8, 128, 32
ORT_DEFAULTS = {"ort-default", "ort-dynamic"}  # variants run with ORT's default session settings
# OpenVINO rows: variant -> (file it runs, INFERENCE_PRECISION_HINT)
OV_VARIANTS = {
    "ov-fp32": ("fp32", "f32"),
    "ov-bf16": ("fp32", "bf16"),
    "ov-ours": ("ours", "f32"),
    "ov-ours-ov": ("ours-ov", "f32"),
    "ov-ours-ov-bf16": ("ours-ov", "bf16"),
    "ov-ours-ov-attn": ("ours-ov-attn", "f32"),
    "ov-ours-ov-attn-bf16": ("ours-ov-attn", "bf16"),
    "ov-nncf": ("nncf", "f32"),
    "ov-nncf-bf16": ("nncf", "bf16"),
}
VARIANTS = ("fp32", "ours", "ours-linear", "ort-default", "ort-tuned", "ort-dynamic", *OV_VARIANTS)
OV_RECIPE = "uniform_w8a8_openvino"  # ours for OpenVINO: `compress --recipe` it, `export --format openvino`
NNCF_SETTINGS = {
    "model_type": "TRANSFORMER",
    "preset": "NNCF default (MIXED for transformers: symmetric weights, asymmetric activations)",
    "target_device": "ANY",
    "calibration": f"the same {CALIB} samples as ours, {CALIB // BATCH} batches of {BATCH}",
    "other": "NNCF defaults (SmoothQuant, fast bias correction, overflow fix)",
}
OV_INT8_PATTERN = (
    "OpenVINO's CPU plugin runs a MatMul in INT8 only when its low-precision transformations (LPT) "
    "accept it: activations u8/i8 per tensor (a zero-point is fine when the other input is a constant), "
    "weights i8 with zero-point 0. Asymmetric per-channel weights (our uniform_w8a8: DequantizeLinear "
    "with a non-zero zero-point) and UINT8 weights fail that test; the plugin then treats the "
    "i8/u8 -> Convert -> Subtract -> Multiply weight chain as weight-only compression "
    "(FullyConnectedCompressed: weights unpacked, f32 GEMM) and the activation Q/DQ as float "
    "FakeQuantize. Attention matmuls (both inputs activations) need zero-point 0 on both sides."
)


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
    args = p.parse_args()
    args.variants = ["fp32"] + [v for v in VARIANTS if v in args.variants and v != "fp32"]
    return args


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


def _ours(
    loaded: LoadedModel, batches: list, overrides: list[str], recipe: str = "uniform_w8a8"
) -> LoadedModel:
    model = copy.deepcopy(loaded.model)
    ctx = make_context(batches, loaded.call, torch.device("cpu"))
    model, _ = run(model, load_recipe(recipe, overrides).passes, ctx)
    return LoadedModel(
        model.eval(), loaded.spec, loaded.kind, loaded.base, loaded.data_cfg, loaded.tokenizer_dir
    )


def _feeds(loaded: LoadedModel, batches: list) -> list[dict[str, np.ndarray]]:
    return [{n: t.numpy() for n, t in zip(input_names(loaded), as_tuple(loaded, b))} for b in batches]


def _pre_processed(fp32: Path) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = fp32.with_suffix(".pre.onnx")
    if not pre.exists():
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    return pre


def _ort_quantized(loaded: LoadedModel, fp32: Path, batches: list, out: Path, tuned: bool) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    feeds = _feeds(loaded, batches)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    tuning = (
        {"op_types_to_quantize": ["MatMul", "Gemm"], "extra_options": {"DedicatedQDQPair": True}}
        if tuned
        else {}
    )
    quantize_static(
        str(_pre_processed(fp32)), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, **tuning,
    )  # fmt: skip
    return out


def _ort_dynamic(fp32: Path, out: Path) -> tuple[Path, dict]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    settings = {"weight_type": "QInt8", "per_channel": True, "reduce_range": u8s8_saturates()}
    quantize_dynamic(
        str(_pre_processed(fp32)), str(out), weight_type=QuantType.QInt8,
        per_channel=settings["per_channel"], reduce_range=settings["reduce_range"],
    )  # fmt: skip
    return out, settings


def _nncf_quantized(loaded: LoadedModel, fp32: Path, batches: list, out: Path) -> Path:
    """``nncf.quantize`` of the FP32 ONNX model as OpenVINO reads it, saved as OpenVINO IR."""
    import nncf

    ov = openvino()
    feeds = _feeds(loaded, batches)
    model = ov.Core().read_model(str(fp32))
    quantized = nncf.quantize(
        model, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(feeds)
    )
    ov.save_model(quantized, str(out), compress_to_fp16=False)
    return out


def export_variants(
    name: str, work: Path, variants: list[str]
) -> tuple[LoadedModel, dict[str, Path], dict, dict]:
    """Every file the ``variants`` of one model run, how long each step took, and what was done."""
    torch.manual_seed(0)  # the same random DeiT weights in every run
    loaded = load_model(MODELS[name])
    batches = _calibration(loaded)
    wanted = {OV_VARIANTS[v][0] if v in OV_VARIANTS else v for v in variants}
    files, seconds, notes = {}, {}, {}

    def timed(key, make):
        t = time.perf_counter()
        files[key] = make()
        seconds[key] = round(time.perf_counter() - t, 1)

    t0 = time.perf_counter()
    timed("fp32", lambda: export_onnx(_float_explicit(loaded), work / f"{name}-fp32.onnx", batch=BATCH).path)
    if "ours" in wanted:
        exported = {}
        timed("ours", lambda: exported.setdefault("r", export_onnx(
            _ours(loaded, batches, []), work / f"{name}-ours.onnx", batch=BATCH)).path)  # fmt: skip
        notes["ours"] = {"weight_dtype": exported["r"].weight_dtype, "why": exported["r"].weight_dtype_reason}
    if "ours-linear" in wanted:
        timed("ours-linear", lambda: export_onnx(
            _ours(loaded, batches, ["passes.0.quantize_attention=false"]), work / f"{name}-ours-linear.onnx",
            batch=BATCH).path)  # fmt: skip
    for key, sets in (
        ("ours-ov", []),
        ("ours-ov-attn", ["passes.0.quantize_attention=true", "passes.0.symmetric=true"]),
    ):
        if key in wanted:
            notes[key] = {
                "recipe": OV_RECIPE,
                "set": sets,
                "weight_dtype": "int8",
                "export": "--format openvino",
            }
            timed(key, lambda k=key, o=sets: export_onnx(
                _ours(loaded, batches, o, OV_RECIPE), work / f"{name}-{k}.onnx", batch=BATCH, weight_dtype="int8",
            ).path)  # fmt: skip
    for variant, tuned in (("ort-default", False), ("ort-tuned", True)):
        if variant in wanted:
            timed(variant, lambda v=variant, tu=tuned: _ort_quantized(
                loaded, files["fp32"], batches, work / f"{name}-{v}.onnx", tu))  # fmt: skip
    if "ort-dynamic" in wanted:
        t = time.perf_counter()
        files["ort-dynamic"], notes["ort-dynamic"] = _ort_dynamic(
            files["fp32"], work / f"{name}-ort-dynamic.onnx"
        )
        seconds["ort-dynamic"] = round(time.perf_counter() - t, 1)
    if "nncf" in wanted:
        timed("nncf", lambda: _nncf_quantized(loaded, files["fp32"], batches, work / f"{name}-nncf.xml"))
        notes["nncf"] = NNCF_SETTINGS
    seconds["all"] = round(time.perf_counter() - t0, 1)
    return loaded, files, seconds, notes


def _file(variant: str, files: dict[str, Path]) -> Path:
    return files[OV_VARIANTS[variant][0] if variant in OV_VARIANTS else variant]


def _pool(y: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    e = (y * m).sum(1) / np.maximum(m.sum(1), 1)
    return e / np.linalg.norm(e, axis=-1, keepdims=True)


def _predictor(variant: str, path: Path):
    """``feeds -> first output`` for one variant, on inputs of any sequence length."""
    if variant not in OV_VARIANTS:
        sess = ort_session(path, ort_defaults=variant in ORT_DEFAULTS)
        return lambda feeds: sess.run(None, feeds)[0]
    core = openvino().Core()
    compiled = core.compile_model(
        core.read_model(str(path)), "CPU",
        {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": OV_VARIANTS[variant][1]},
    )  # fmt: skip
    return lambda feeds: compiled(feeds)[0]


def _outputs(predict, loaded: LoadedModel, batches: list) -> list[np.ndarray]:
    outs = []
    for b in batches:
        tensors = as_tuple(loaded, b)
        if tensors[0].shape[0] != BATCH:
            continue  # static batch graphs: skip a short last batch
        feeds = {n: t.numpy() for n, t in zip(input_names(loaded), tensors)}
        outs.append(np.asarray(predict(feeds), np.float64))
    return outs


def fidelity(loaded: LoadedModel, files: dict[str, Path], variants: list[str], samples: int) -> dict:
    """Agreement of every variant with the FP32 ONNX model (in ORT) on the evaluation data."""
    batches = load_data(None, loaded, "test", samples, BATCH).batches
    outs = {v: _outputs(_predictor(v, _file(v, files)), loaded, batches) for v in variants}
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


def runners(files: dict[str, Path], variants: list[str], threads: int) -> dict[str, Runner]:
    """One prepared runner per variant (the ``edgecompress bench`` backends), on the static shapes."""
    out = {}
    for v in variants:
        path = _file(v, files)
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
            ops = optimized_ops(_file(v, files), ort_defaults=v in ORT_DEFAULTS)
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
        if args.work:
            args.work.mkdir(parents=True, exist_ok=True)
            tmp = str(args.work)
        for name in args.models:
            loaded, files, seconds, notes = export_variants(name, Path(tmp), args.variants)
            res = {"model": MODELS[name], "threads": args.threads, "prepare_seconds": seconds, "notes": notes}
            res["fidelity"] = fidelity(loaded, files, args.variants, args.samples)
            print(f"{name}: fidelity {json.dumps(res['fidelity'])}", flush=True)
            runs_on = runners(files, args.variants, args.threads)
            res["runtime"] = {v: {"label": _runtime_label(v, r.info), **r.info} for v, r in runs_on.items()}
            res["inputs"] = next(iter(runs_on.values())).shapes
            res["kernels"] = kernels(files, runs_on)
            res["load_average_before"] = environment(args.threads)["cpu"]["load_average"]
            res["latency"] = latency(runs_on, timing)
            del runs_on
            if "ours" in files:
                res["repeat_check_ours"] = repeat_check(files["ours"], args.threads, timing)
            res["load_average_after"] = environment(args.threads)["cpu"]["load_average"]
            results[name] = res
            note = []
            if rc := res.get("repeat_check_ours"):
                note = [
                    f"two separate bench runs of ours: medians {rc['medians_ms']} ms, IQR {rc['iqr_ms']}, stable {rc['stable']}"
                ]
            lines += [*table(name, res), *note]
            print("\n".join(table(name, res) + note), flush=True)
    meta = {
        "machine": args.machine,
        "hostname": socket.gethostname(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
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
