"""The files and fidelity of ``benchmarks/deploy.py``'s variants (its prepare stage; docs there).

Every variant of one model exported (or quantized by a peer's tool) into a work folder, then each
run on the evaluation data and compared with the FP32 ONNX model in ONNX Runtime. Nothing here is
timed; ``deploy.py --stage prepare`` runs it at low priority and ``--stage time`` reuses its files.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch

from edgecompress.bench.backends import openvino
from edgecompress.calib import make_context
from edgecompress.data.specs import load_data
from edgecompress.export.inputs import as_tuple, input_names
from edgecompress.export.onnx import export_onnx
from edgecompress.export.openvino import openvino_form
from edgecompress.export.runtime import ort_session, u8s8_saturates
from edgecompress.models.loading import LoadedModel, load_model
from edgecompress.pipeline import run
from edgecompress.recipe import load_recipe

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
    "ov-ours-ov-qk": ("ours-ov-qk", "f32"),
    "ov-ours-ov-qk-bf16": ("ours-ov-qk", "bf16"),
    "ov-ours-ov-sym-qk": ("ours-ov-sym-qk", "f32"),
    "ov-ours-ov-sym-qk-bf16": ("ours-ov-sym-qk", "bf16"),
    "ov-nncf": ("nncf", "f32"),
    "ov-nncf-bf16": ("nncf", "bf16"),
}
VARIANTS = ("fp32", "ours", "ours-linear", "ort-default", "ort-tuned", "ort-dynamic", *OV_VARIANTS)
OV_RECIPE = "uniform_w8a8_openvino"  # ours for OpenVINO: `compress --recipe` it, `export --format openvino`
# q·kᵀ in INT8 as NNCF quantizes transformers (q, k symmetric; softmax·v stays float); every
# variant spells its attention and symmetry settings out, whatever the recipe's defaults
QK_SETS = [
    "passes.0.quantize_attention=true",
    "passes.0.attention_inputs=[q,k]",
    "passes.0.symmetric_attention=true",
]
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
        ("ours-ov-attn", [*QK_SETS, "passes.0.attention_inputs=[q,k,v,probs]", "passes.0.symmetric=true"]),
        ("ours-ov-qk", [*QK_SETS, "passes.0.symmetric=false"]),
        ("ours-ov-sym-qk", [*QK_SETS, "passes.0.symmetric=true"]),
    ):
        if key in wanted:
            notes[key] = {
                "recipe": OV_RECIPE,
                "set": sets,
                "weight_dtype": "int8",
                "export": "--format openvino",
            }
            timed(key, lambda k=key, o=sets: export_onnx(  # the model `export --format openvino` exports
                openvino_form(_ours(loaded, batches, o, OV_RECIPE))[0], work / f"{name}-{k}.onnx", batch=BATCH,
                weight_dtype="int8",
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


def variant_file(variant: str, files: dict[str, Path]) -> Path:
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
    outs = {v: _outputs(_predictor(v, variant_file(v, files)), loaded, batches) for v in variants}
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
