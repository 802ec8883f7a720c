"""``edgecompress bench``: latency of a model spec / compressed folder / .onnx file on one backend.

A model spec runs as is on ``torch``; on ``onnxruntime`` and ``openvino`` it is exported on the fly
(static batch, the compressed model's Q/DQ graph; ``compress`` passes the file it just exported
and verified instead) and sanity-checked against PyTorch on the benchmark inputs before it is
timed (cosine ≥ 0.999 for float graphs, ≥ 0.95 for quantized ones, whose fidelity the export's
verification judges: on synthetic inputs a quantized graph may legitimately sit lower). ``openvino:bf16`` asks OpenVINO's CPU plugin
for bf16 inference (``INFERENCE_PRECISION_HINT``; what it really used is recorded). ``vs`` times a
second target round-robin with the first in the same process and reports
``speedup = median(vs) / median(model)``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from edgecompress.bench.backends import (
    BACKENDS,
    OV_PRECISIONS,
    Runner,
    ort_runner,
    ov_runner,
    torch_runner,
    trt_runner,
)
from edgecompress.bench.env import environment
from edgecompress.bench.timing import time_alternating, unstable
from edgecompress.errors import UserError
from edgecompress.export.openvino import split_runtime as split_backend

SANITY_COSINE = 0.999
# A quantized graph on synthetic inputs: code flips cascade under the runtimes' different float
# rounding (export verification measures that on real data); a broken graph is far below this.
SANITY_COSINE_QUANTIZED = 0.95


def _sanity(loaded, runner: Runner, sess_inputs: list[str]) -> float:
    """Cosine between the exported graph's and PyTorch's outputs on the benchmark inputs."""
    from edgecompress.export.inputs import as_batch

    feeds = runner.feeds
    tensors = tuple(torch.from_numpy(feeds[n]) for n in sess_inputs)
    with torch.no_grad():
        ref = loaded.call(loaded.model.eval(), as_batch(loaded, tensors)).float().flatten().numpy()
    out = runner.output().astype(np.float64).flatten()
    cos = float(out @ ref / max(np.linalg.norm(out) * np.linalg.norm(ref), 1e-30))
    from edgecompress.export.forms import export_category

    floor = SANITY_COSINE_QUANTIZED if export_category(loaded.model) == "quantized" else SANITY_COSINE
    if cos < floor:
        raise UserError(
            f"the on-the-fly ONNX export of {loaded.spec}, run in {runner.info.get('backend')}, "
            f"disagrees with PyTorch (cosine {cos:.5f})"
        )
    return cos


def _from_file(path: Path, backend: str, batch: int, seq: int, threads: int | None, work: Path) -> Runner:
    from edgecompress.export.onnx import check_onnx

    backend, precision = split_backend(backend)
    if path.suffix == ".engine":
        if backend != "tensorrt":
            raise UserError(f"{path} is a TensorRT engine: use --backend tensorrt")
        return trt_runner(path, batch, seq)
    if backend == "torch":
        raise UserError(f"{path} is an ONNX file: use --backend onnxruntime, openvino (or tensorrt)")
    check_onnx(path)
    if backend == "onnxruntime":
        return ort_runner(path, batch, seq, threads)
    if backend == "openvino":
        return ov_runner(path, batch, seq, threads, precision)
    from edgecompress.export.tensorrt import build_engine

    engine = work / f"{path.stem}.engine"
    build_engine(path, engine, batch=batch, seq=seq)
    return trt_runner(engine, batch, seq)


def prepare_loaded(
    loaded, backend: str, batch: int, seq: int, threads: int | None, device: str, work: Path
) -> Runner:
    """A :class:`Runner` for an in-memory model (exported on the fly for onnxruntime / tensorrt)."""
    from edgecompress.export.onnx import export_onnx

    if backend == "torch":
        return torch_runner(loaded, batch, seq, threads, device)
    if split_backend(backend)[0] == "openvino":
        from edgecompress.export.openvino import openvino_form

        loaded, _ = openvino_form(loaded)  # the attention form its MHA kernel fuses
    onnx_path = work / f"model{len(list(work.glob('*.onnx')))}.onnx"
    result = export_onnx(
        loaded, onnx_path, batch=batch, target="tensorrt" if backend == "tensorrt" else "onnxruntime"
    )
    runner = _from_file(onnx_path, backend, batch, seq, threads, work)
    if split_backend(backend)[0] in ("onnxruntime", "openvino"):
        runner.info["sanity_cosine"] = round(_sanity(loaded, runner, result.inputs), 6)
    runner.info["exported_on_the_fly"] = {
        "exporter": result.exporter,
        "opset": result.opset,
        "qdq": result.qdq,
    }
    return runner


def prepare(
    target: str, backend: str, batch: int, seq: int, threads: int | None, device: str, work: Path
) -> Runner:
    """A ready-to-time :class:`Runner` for ``target`` (spec, folder, .onnx or .engine file)."""
    from edgecompress.models.loading import load_model

    path = Path(target)
    if path.suffix in (".onnx", ".engine"):
        if not path.is_file():
            raise UserError(f"file not found: {path}")
        return _from_file(path, backend, batch, seq, threads, work)
    if path.is_file():
        raise UserError(f"{path} is not a model spec, a compressed folder, or an .onnx / .engine file")
    return prepare_loaded(load_model(target), backend, batch, seq, threads, device, work)


def _check_args(backend: str, batch: int, seq: int, threads: int | None) -> None:
    name, precision = split_backend(backend)
    if name not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if name == "openvino":
        if precision not in OV_PRECISIONS:
            raise UserError(
                f"--backend {backend}: the openvino precision hint is one of {', '.join(OV_PRECISIONS)} "
                "(e.g. openvino:bf16)"
            )
        from edgecompress.bench.backends import openvino

        openvino()  # before any export
    if batch < 1 or seq < 1 or (threads is not None and threads < 0):
        raise UserError("--batch and --seq must be ≥ 1 and --threads ≥ 0")
    if backend == "tensorrt":
        from edgecompress.export.tensorrt import require_tensorrt

        require_tensorrt()  # before any export


def shape_label(shapes: dict[str, list[int]]) -> str:
    """``input_ids 8×128, attention_mask 8×128``: the shapes a runner is fed."""
    return ", ".join(f"{k} {'×'.join(map(str, v))}" for k, v in shapes.items())


def check_same_work(names: list[str], runners: list[Runner]) -> None:
    """``--vs`` compares latencies only of runs on inputs of the same shapes (one line otherwise)."""
    if len(runners) < 2:
        return
    first = [list(v) for v in runners[0].shapes.values()]
    for name, r in zip(names[1:], runners[1:]):
        if [list(v) for v in r.shapes.values()] != first:
            raise UserError(
                f"--vs: {names[0]} runs on [{shape_label(runners[0].shapes)}] but {name} on "
                f"[{shape_label(r.shapes)}]: they do different work, so their latencies do not compare "
                "(a graph's static dimensions override --batch / --seq)"
            )


def _timed(
    names: list[str], runners: list[Runner], backend: str, batch: int, seq: int, threads, timing
) -> dict:
    check_same_work(names, runners)
    stats = time_alternating([r.call for r in runners], cuda=runners[0].cuda, **timing)
    results, warnings = [], []
    for name, runner, st in zip(names, runners, stats):
        ran = runner.batch or batch
        results.append(
            {
                "target": name,
                **runner.info,
                "inputs": runner.shapes,
                "batch": ran,
                "latency": st,
                "throughput_per_s": round(ran * 1e3 / st["median_ms"], 3),
            }
        )
        if ran != batch:
            warnings.append(f"{name}: its graph has a static batch of {ran}; --batch {batch} was not used")
        if (w := unstable(st)) is not None:
            warnings.append(f"{name}: {w}")
    out = {
        "backend": backend,
        "batch": results[0]["batch"],
        "batch_requested": batch,
        "seq": seq,
        "method": {**timing, "what": "one inference call, inputs already in place; round-robin when several"},
        "results": results,
        "environment": environment(threads),
        "warnings": warnings,
    }
    if len(stats) == 2:
        out["speedup"] = round(stats[1]["median_ms"] / stats[0]["median_ms"], 3)
    return out


def _timing(timing: dict | None) -> dict:
    return {"min_seconds": 3.0, "min_iters": 100, "warmup_s": 1.0, **(timing or {})}


def bench(
    target: str,
    backend: str = "torch",
    batch: int = 1,
    seq: int = 128,
    threads: int | None = None,
    device: str = "cpu",
    vs: str | None = None,
    timing: dict | None = None,
) -> dict:
    """Time ``target`` (and ``vs``, alternately). ``timing``: keyword overrides for
    :func:`~edgecompress.bench.timing.time_alternating` (min_seconds, min_iters, warmup_s, max_seconds)."""
    _check_args(backend, batch, seq, threads)
    with tempfile.TemporaryDirectory(prefix="ec-bench-") as tmp:
        names = [target] + ([vs] if vs else [])
        runners = [prepare(t, backend, batch, seq, threads, device, Path(tmp)) for t in names]
        return _timed(names, runners, backend, batch, seq, threads, _timing(timing))


def bench_models(
    models: dict,
    backend: str,
    batch: int,
    seq: int,
    threads: int | None = None,
    timing: dict | None = None,
    files: dict | None = None,
) -> dict:
    """Time in-memory models (``{name: LoadedModel}``, e.g. baseline and compressed) alternately.

    ``files`` (``{name: .onnx path}``) gives a model's already exported and verified graph (of
    this batch size) for the onnxruntime / openvino backends, so it is not exported again; its
    outputs are still sanity-checked against the model."""
    _check_args(backend, batch, seq, threads)
    files = files if split_backend(backend)[0] in ("onnxruntime", "openvino") else {}
    with tempfile.TemporaryDirectory(prefix="ec-bench-") as tmp:
        runners = [
            _from_exported(m, Path(files[n]), backend, batch, seq, threads, Path(tmp))
            if n in (files or {})
            else prepare_loaded(m, backend, batch, seq, threads, "cpu", Path(tmp))
            for n, m in models.items()
        ]
        return _timed(list(models), runners, backend, batch, seq, threads, _timing(timing))


def _from_exported(loaded, path: Path, backend: str, batch: int, seq: int, threads, work: Path) -> Runner:
    from edgecompress.export.inputs import input_names

    runner = _from_file(path, backend, batch, seq, threads, work)
    runner.info["sanity_cosine"] = round(_sanity(loaded, runner, input_names(loaded)), 6)
    runner.info["onnx_file"] = path.name
    return runner


def format_lines(result: dict) -> list[str]:
    """Console lines: one per timed target, then the ratio."""
    lines = []
    for r in result["results"]:
        s = r["latency"]
        lines.append(
            f"{r['target']} [{result['backend']}, {shape_label(r['inputs']) or 'batch ' + str(r['batch'])}]: "
            f"median {s['median_ms']:.3f} ms, "
            f"p90 {s['p90_ms']:.3f}, p99 {s['p99_ms']:.3f}, mean {s['mean_ms']:.3f}, min {s['min_ms']:.3f}, "
            f"CV {s['cv'] * 100:.1f}% over {s['iterations']} runs; {r['throughput_per_s']:.1f} items/s"
        )
    if "speedup" in result:
        a, b = result["results"][0]["target"], result["results"][1]["target"]
        lines.append(
            f"speed-up of {a} over {b}: {result['speedup']:.2f}x (median {b} / median {a}, alternated)"
        )
    cpu = result["environment"]["cpu"]
    lines.append(
        f"on {cpu['model']} ({cpu['logical_cores']} cores, load {cpu['load_average']}), threads {result['environment']['threads'] or 'default'}"
    )
    return lines
