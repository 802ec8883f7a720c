"""One call for the CLI and the compress job: export → check → verify → JSON (→ TensorRT engine)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from edgecompress.errors import UserError
from edgecompress.export.onnx import DEFAULT_OPSET, export_onnx
from edgecompress.export.runtime import optimized_ops, u8s8_saturates
from edgecompress.export.tensorrt import build_engine, check_tensorrt_ready, require_tensorrt
from edgecompress.export.verify import DEFAULT_SAMPLES, check_verification, verify_onnx, write_verification
from edgecompress.models.loading import LoadedModel

FORMATS = ("onnx", "tensorrt", "openvino", "openvino:bf16")
MAX_ISSUES = 50  # TensorRT-readiness issues kept in the JSON (the count is always there)


def verification_path(onnx_path: str | Path) -> Path:
    """``model.onnx`` → ``model.verification.json`` (next to it)."""
    p = Path(onnx_path)
    return p.with_name(p.stem + ".verification.json")


def saved_eval_data(spec_or_dir: str) -> str | None:
    """The evaluation data a compressed folder's ``recipe.yaml`` names (None: not a folder, or
    the default data): what ``export`` verifies on unless ``--data`` says otherwise."""
    import yaml

    recipe = Path(spec_or_dir) / "recipe.yaml"
    if not recipe.is_file():
        return None
    try:
        saved = yaml.safe_load(recipe.read_text())
    except yaml.YAMLError:
        return None  # loading the folder reports a broken recipe in its own words
    ev = saved.get("eval") if isinstance(saved, dict) else None
    return ev.get("data") if isinstance(ev, dict) else None


def export_verified(
    loaded: LoadedModel,
    out: str | Path,
    fmt: str = "onnx",
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    batch: int = 1,
    samples: int = DEFAULT_SAMPLES,
    data: str | None = None,
    weight_dtype: str = "auto",
    data_source: str = "",
    debug_compare: bool = False,
) -> dict:
    """Export ``loaded`` to ``out`` (an ``.onnx`` path), verify it against PyTorch, write the JSON.

    ``fmt="tensorrt"`` exports the zero-point-0 form, checks TensorRT readiness and then builds an
    engine next to the ONNX file (unverified: see :mod:`edgecompress.export.tensorrt`).
    ``fmt="openvino"`` / ``"openvino:bf16"`` exports the ONNX Runtime form with INT8 weight codes
    (OpenVINO's INT8 path needs them) and verifies it in OpenVINO's CPU plugin with that precision
    hint, same bounds; the JSON records the kernels the plugin picked (:mod:`edgecompress.export.openvino`).
    ``debug_compare``: also compare every quantizer's input in both runtimes (:func:`layer_compare`),
    print the table and keep ``<name>.compare.json`` — passed or failed. The files
    are written into a temporary sibling folder and moved into place only after verification, so an
    error or Ctrl-C never leaves an unverified ``.onnx``; a failed verification keeps the JSON and
    raises :class:`UserError`.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if batch < 1 or samples < 1:
        raise UserError("batch and samples must be ≥ 1")
    onnx_path = Path(out)
    if onnx_path.suffix != ".onnx":
        raise UserError(f"--out {out}: the ONNX file name must end in .onnx")
    if fmt == "tensorrt":
        require_tensorrt()  # fail in one line before spending minutes on the export
    weight_dtype = _openvino_weights(fmt, weight_dtype)
    explicit = []
    if fmt.startswith("openvino"):
        from edgecompress.export.openvino import openvino_form

        loaded, explicit = openvino_form(loaded)  # attention OpenVINO fuses into its MHA kernel
    import onnx

    final = onnx_path
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    onnx_path = work / final.name  # written and verified here, moved into place only when it passed
    try:
        target = "tensorrt" if fmt == "tensorrt" else "onnxruntime"
        result = export_onnx(
            loaded, onnx_path, opset, dynamic_batch, batch, target, weight_dtype=weight_dtype
        )
        if fmt.startswith("openvino"):
            result.weight_dtype_reason = "OpenVINO's INT8 path takes INT8 weights (zero-point 0)"
        record = {"model": loaded.spec, "format": fmt, "export": result.to_dict()}
        if explicit:
            record["attention_made_explicit"] = {
                "modules": len(explicit),
                "why": "OpenVINO fuses explicit attention into its MHA kernel, not the SDPA export",
            }
        record["tensorrt"] = tensorrt_record(onnx.load(str(onnx_path)), fmt)
        record["onnxruntime"] = optimized_ops(onnx_path)
        # a TensorRT file keeps INT8 weights; where ORT's u8×s8 kernels saturate, check its function in float
        integer = not (fmt == "tensorrt" and result.weight_dtype == "int8" and u8s8_saturates())
        runtime = fmt if fmt.startswith("openvino") else "onnxruntime"
        record["verification"] = verify_onnx(
            loaded, onnx_path, samples, data, batch, integer_kernels=integer, runtime=runtime
        )
        record["verification"]["data_source"] = data_source or (
            "--data" if data else "the model's default data"
        )
        if fmt == "tensorrt" and record["verification"]["passed"]:
            record["engine"] = build_engine(onnx_path, onnx_path.with_suffix(".engine"), batch=batch)
        if debug_compare:
            b = record["verification"]["batch"]
            cmp = layer_compare(loaded, onnx_path, b if isinstance(b, int) else 8, data)
            cmp_path = final.with_name(final.stem + ".compare.json")
            write_verification(_relocate(cmp["result"], str(work), str(final.parent)), cmp_path)
            print(cmp["table"])
            print(f"{cmp['verdict']}; {cmp_path}")
            record["compare"] = {"json": str(cmp_path), "verdict": cmp["verdict"]}
        record = _relocate(record, str(work), str(final.parent))
        json_path = write_verification(record, verification_path(final))  # kept even when it failed
        if not record["verification"]["passed"]:
            check_verification(record["verification"])
        for f in work.iterdir():
            os.replace(f, final.parent / f.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record["json"] = str(json_path)
    return record


def _openvino_weights(fmt: str, weight_dtype: str) -> str:
    """The weight codes of an ``openvino`` export: INT8 (its LPT takes no UINT8 weights)."""
    if not fmt.startswith("openvino"):
        return weight_dtype
    from edgecompress.export.openvino import openvino

    openvino()  # fail in one line before the export when it is missing
    if weight_dtype == "uint8":
        raise UserError(
            "--format openvino needs INT8 weight codes (OpenVINO's INT8 path takes no UINT8 weights)"
        )
    return "int8"


def layer_compare(
    loaded: LoadedModel, onnx_path: Path, batch: int, data: str | None, samples: int = 16
) -> dict:
    """:func:`edgecompress.export.compare.compare_layers` on ``samples`` of the verification data:
    the result, its table and a one-line verdict."""
    from edgecompress.export.compare import compare_layers, format_table
    from edgecompress.export.inputs import sample_batches

    batches, rows = sample_batches(loaded, samples, batch, data)
    res = compare_layers(loaded, onnx_path, batches)
    first = res["first_departure"]
    verdict = (
        f"first departure: {first['module']} (segment relative error {first['segment_rel_err']:.2e})"
        if first else f"no departure: every segment agrees within {res['depart_rel_err']:g} (float rounding)"
    )  # fmt: skip
    verdict = f"{res['compared']} quantizers compared on {sum(rows)} samples; {verdict}"
    return {"result": res, "table": format_table(res), "verdict": verdict}


def tensorrt_record(model, fmt: str = "onnx") -> dict:
    """TensorRT readiness of an ONNX model for the JSON: a verdict, the count, the first issues; for
    the onnxruntime form also whether ``--format tensorrt`` (activation offsets rewritten) would be."""
    problems = check_tensorrt_ready(model)
    out = {"ready": not problems, "issue_count": len(problems), "issues": problems[:MAX_ISSUES]}
    if fmt != "tensorrt" and problems:
        out["ready_with_format_tensorrt"] = not check_tensorrt_ready(model, offsets_rewritten=True)
    return out


def summary_line(record: dict) -> str:
    """One console line: file, exporter, Q/DQ, integer kernels, verification metrics."""
    ex, v = record["export"], record["verification"]["metrics"]
    ints = sum(record["onnxruntime"]["integer_kernels"].values())
    kernels = f"ORT integer kernels {ints}/{ex['qdq']['matmuls']} matmuls"
    if ov := record["verification"].get("openvino"):
        kernels = (
            f"verified in OpenVINO {ov['compiled']['INFERENCE_PRECISION_HINT']}: INT8 kernels for "
            f"{ov['int8_gemms']} of {ov['int8_gemms'] + ov['float_gemms']} GEMM layers"
        )
    fid = f"top-1 agreement {v['top1_agreement']}%, " if "top1_agreement" in v else ""
    t = record["tensorrt"]
    if t["ready"]:
        trt = "yes"
    elif t.get("ready_with_format_tensorrt"):
        trt = (
            f"with --format tensorrt (this onnxruntime form keeps {t['issue_count']} activation "
            "zero-points ≠ 0, which that form rewrites)"
        )
    else:
        trt = f"no ({t['issue_count']} issues, e.g. {t['issues'][0]})"
    how = ""
    if "sensitivity" in record["verification"]:
        sens = record["verification"]["sensitivity"]
        own, noise = sens["own_metrics"]["cosine_mean"], sens["relative_input_noise"]["max"]
        how = (
            f" (below the strict gates: within the model's own rounding sensitivity, cosine {own} "
            f"under the rounding differences measured per segment, ≤ {noise:.1e}, and every segment "
            "agrees — see the JSON)"
        )
    return (
        f"{ex['path']}: {ex['exporter']} exporter, opset {ex['opset']}, {ex['qdq']['QuantizeLinear']} Q / "
        f"{ex['qdq']['DequantizeLinear']} DQ, {ex['qdq']['integer_weight_initializers']} {ex['weight_dtype'].upper()} weights; "
        f"{kernels}; verified on {v['samples']} samples: {fid}cosine min "
        f"{v['cosine_min']}, mean {v['cosine_mean']}, max-abs err {v['max_abs_error']:.3g}{how}; TensorRT-ready: {trt}"
    )


def _relocate(obj, old: str, new: str):
    """Replace the temporary folder in every path string of a JSON-like object."""
    if isinstance(obj, dict):
        return {k: _relocate(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relocate(v, old, new) for v in obj]
    return obj.replace(old, new) if isinstance(obj, str) else obj


def deploy_stage(
    compressed: LoadedModel,
    baseline: LoadedModel | None,
    export: dict | None,
    bench: dict | None,
    tmp: Path,
    out: Path,
) -> dict:
    """The ``export:`` / ``bench:`` recipe sections of ``compress``: files go into ``tmp`` (the
    job's temporary output folder, renamed to ``out`` afterwards); returns the report section."""
    import json

    section: dict = {}
    if export is not None:
        rec = export_verified(
            compressed, tmp / "model.onnx", export["format"], export["opset"], export["dynamic_batch"],
            export["batch"], export["samples"], export["data"], export["weight_dtype"],
        )  # fmt: skip
        rec = _relocate(rec, str(tmp), str(out))
        Path(tmp / Path(rec["json"]).name).write_text(json.dumps(rec, indent=1, default=str))
        section["export"] = {
            "file": "model.onnx",
            "summary": summary_line(rec),
            "verification": rec["verification"]["metrics"] | {"passed": rec["verification"]["passed"]},
            "tensorrt": rec["tensorrt"],
            "details": Path(rec["json"]).name,
        }
    if bench is not None and baseline is not None:
        from edgecompress.bench.run import bench_models

        timing = {"min_seconds": bench["seconds"], "min_iters": bench["iterations"]}
        models = {"compressed": compressed, "baseline": baseline}
        reuse = export is not None and export["format"] == "onnx" and export["batch"] == bench["batch"]
        reuse = reuse and not export["dynamic_batch"]  # the verified file has the benchmark's shapes
        files = {"compressed": tmp / "model.onnx"} if reuse else None
        section["bench"] = bench_models(
            models, bench["backend"], bench["batch"], bench["seq"], bench["threads"] or None, timing, files
        )
    return section


def preflight(export: dict | None, bench: dict | None) -> None:
    """Fail before any work when a recipe's ``export:`` / ``bench:`` section cannot run here."""
    if (export or {}).get("format") == "tensorrt" or (bench or {}).get("backend") == "tensorrt":
        require_tensorrt()
