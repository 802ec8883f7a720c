"""The main job: load → baseline metrics → calibrate → passes → metrics → save (one output folder)."""

from __future__ import annotations

import copy
import platform
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from edgecompress.bench.timing import unstable
from edgecompress.calib import make_context, to_device
from edgecompress.data.metrics import evaluate
from edgecompress.data.specs import load_data, load_samples
from edgecompress.errors import UserError
from edgecompress.models.loading import LoadedModel
from edgecompress.pipeline import make_teacher, run
from edgecompress.quantize.modules import deployed_size_bytes
from edgecompress.recipe import SECTION_DEFAULTS, Recipe, dump_recipe, recipe_to_dict, train_config
from edgecompress.report import report_figures, report_markdown
from edgecompress.structure import save, structure_of

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
    "merges.txt",
    "vocab.json",
)


@dataclass
class JobResult:
    out: Path
    report: dict


def environment() -> dict:
    import timm
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


LATENCY_BATCH = 8


def _batch_size(batch) -> int:
    return int((batch["input_ids"] if isinstance(batch, dict) else batch).shape[0])


def _latency_batch(batch):
    """The first ``LATENCY_BATCH`` samples of an eval batch: a quick, comparable latency probe."""
    if isinstance(batch, dict):
        return {k: v[:LATENCY_BATCH] for k, v in batch.items()}
    return batch[:LATENCY_BATCH]


LATENCY_TIMING = {"min_seconds": 3.0, "min_iters": 5, "warmup_s": 1.0, "max_seconds": 60.0}


def _latencies(loaded: LoadedModel, models: list, batch) -> list[dict]:
    """PyTorch latency of ``models`` on ``batch``, timed alternately (A, B, A, B, …) in one process
    after a time-based warm-up, ≥ 3 s: the ``bench`` method (:mod:`edgecompress.bench.timing`)."""
    from edgecompress.bench.timing import time_alternating

    fns = [lambda m=m: loaded.call(m, batch) for m in models]
    with torch.no_grad():
        return time_alternating(fns, **LATENCY_TIMING)


def _simulated(model: torch.nn.Module) -> bool:
    from edgecompress.export.forms import export_category

    return export_category(model) == "quantized"


def _latency_note(model: torch.nn.Module, dev: torch.device) -> str:
    timing = f"eager on {dev.type}, baseline and compressed alternated, ≥ 3 s"
    if not _simulated(model):
        return f"PyTorch: {timing}; the compressed model runs its own execution forms"
    return (
        f"PyTorch simulation: {timing}; fake-quantized layers compute in float (slower than the float "
        "model): not the deployed latency, which the ONNX Runtime row measures"
    )


def resolve_device(device: str) -> torch.device:
    """``cpu`` or ``cuda``; asking for CUDA without a GPU is a one-line error."""
    if device not in ("cpu", "cuda"):
        raise UserError(f"device {device!r}: choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda: no CUDA GPU is available here (use --device cpu)")
    return torch.device(device)


def _data_source(loaded: LoadedModel, recipe: Recipe):
    """``ctx.batches(split)``: the recipe's calib / eval / train data as SampleSets, loaded once each."""
    cal, ev, tr = recipe.calibration, recipe.eval, recipe.train or SECTION_DEFAULTS["train"]
    specs = {
        "calib": (cal["data"], "train", cal["samples"], cal["batch_size"]),
        "eval": (ev["data"], "test", ev["samples"], ev["batch_size"]),
        "train": (tr["data"], "train", tr["samples"], tr["batch_size"]),
    }
    cache: dict = {}

    def batches(split: str):
        if split not in specs:
            raise UserError(f"data split {split!r}: choose one of {sorted(specs)}")
        if split not in cache:
            spec, which, samples, batch_size = specs[split]
            cache[split] = load_samples(spec, loaded, which, samples, batch_size)
        return cache[split]

    return batches


def _context(loaded: LoadedModel, recipe: Recipe, eval_data, dev: torch.device):
    """The passes' context and what calibration really used (``report["calibration"]``)."""
    cal = recipe.calibration
    needs = any(p.needs_data for p in recipe.passes)
    used = {"data": cal["data"], "samples_requested": cal["samples"], "samples_used": 0}
    if needs:
        calib = load_data(cal["data"], loaded, "train", cal["samples"], cal["batch_size"])
        ctx_batches, used["samples_used"], used["data"] = calib.batches, calib.count, calib.spec
    else:  # no pass reads calibration data: the first eval batch only traces the model
        ctx_batches, used["data"] = [eval_data.batches[0]], None
    train = train_config(recipe.train or SECTION_DEFAULTS["train"])
    data = _data_source(loaded, recipe)
    return make_context(ctx_batches, loaded.call, dev, cal["seed"], loaded.kind, data, train), used


def coverage(model: torch.nn.Module) -> dict:
    """How much of the model's weight (parameters of ≥ 2 dims) sits in layers a pass changed (a
    chain element, inside a dynamic module such as an ACM, class attribute ``DYNAMIC``, or resized
    by structured pruning)."""
    total, done, left = 0, 0, {}
    owned = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            owned.setdefault(id(p), mod)
    rebuilt = {id(m) for d in model.modules() if getattr(d, "DYNAMIC", False) for m in d.modules()}
    resized = {op["name"] for op in structure_of(model)["ops"] if op["op"] == "resize"}
    rebuilt |= {id(m) for n, m in model.named_modules() if n in resized}
    seen = set()
    for p in model.parameters():
        if p.dim() < 2 or id(p) in seen:
            continue
        seen.add(id(p))
        mod = owned[id(p)]
        total += p.numel()
        if len(getattr(mod, "weight_chain", ())) or id(mod) in rebuilt:
            done += p.numel()
        else:
            left[type(mod).__name__] = left.get(type(mod).__name__, 0) + p.numel()
    top = sorted(left, key=left.get, reverse=True)[:3]
    return {
        "weights": total,
        "compressed": done,
        "fraction": round(done / max(total, 1), 4),
        "untouched": top,
    }


COVERAGE_WARN = 0.5


def coverage_warning(cov: dict) -> str | None:
    """A warning line when the passes changed less than half of the model's weights."""
    if cov["fraction"] >= COVERAGE_WARN:
        return None
    return (
        f"the passes changed only {cov['fraction'] * 100:.1f}% of the model's weights; the rest is in "
        f"{', '.join(cov['untouched'])} layers, which they leave as they are"
    )


def implicit_deploy(model: torch.nn.Module) -> tuple[dict, dict] | None:
    """The ``export:`` / ``bench:`` sections ``compress`` adds for a quantized model when the recipe
    has neither and ONNX Runtime is installed: a verified INT8 ONNX file at batch 8 and its ORT
    latency against the FP32 ONNX, timed alternately — the deployable artifact, not the PyTorch
    simulation. None when it does not apply."""
    from edgecompress.export.forms import export_category

    if export_category(model) != "quantized":
        return None
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    export = {**SECTION_DEFAULTS["export"], "batch": LATENCY_BATCH}
    bench = {**SECTION_DEFAULTS["bench"], "backend": "onnxruntime", "batch": LATENCY_BATCH}
    return export, bench


def compress(
    loaded: LoadedModel, recipe: Recipe, out: Path, device: str | None = None, deploy: bool | None = None
) -> JobResult:
    """Run ``recipe`` on ``loaded`` and write the output folder atomically; returns its report.

    ``device`` (default: the recipe's ``device:``) holds the model, the batches and every
    captured tensor of the passes. ``deploy``: None (default) runs the recipe's ``export:`` /
    ``bench:`` sections; True (the CLI's default) also gives a quantized model whose recipe has
    neither the :func:`implicit_deploy` sections, where a failed verification is a warning in the
    report (the checkpoint is still written, without ``model.onnx``), not an error; False (the
    CLI's ``--no-export``) runs neither.
    """
    if deploy is False:
        recipe = replace(recipe, export=None, bench=None)
    if recipe.export is not None or recipe.bench is not None:
        from edgecompress.export.deploy import preflight

        preflight(recipe.export, recipe.bench)  # e.g. TensorRT missing: say so before any work
    dev = resolve_device(device or recipe.device)
    model = loaded.model.to(dev)
    ev = recipe.eval
    eval_data = load_data(ev["data"], loaded, "test", ev["samples"], ev["batch_size"])
    base_metrics, base_out = evaluate(loaded, model, eval_data)
    base_size = deployed_size_bytes(model)
    baseline_model = copy.deepcopy(model)  # timed after compression, back to back with the result
    ctx, calib_used = _context(loaded, recipe, eval_data, dev)
    if any(p.needs_teacher for p in recipe.passes):
        ctx = replace(ctx, teacher=make_teacher(baseline_model))
    torch.manual_seed(recipe.calibration["seed"])
    t0 = time.perf_counter()
    model, records = run(model, recipe.passes, ctx)
    seconds = time.perf_counter() - t0
    comp_metrics, _ = evaluate(loaded, model, eval_data, reference=base_out)
    batch0 = to_device(_latency_batch(eval_data.batches[0]), dev)
    base_lat, comp_lat = _latencies(loaded, [baseline_model, model], batch0)
    export_sec, bench_sec, implicit = recipe.export, recipe.bench, False
    if deploy and export_sec is None and bench_sec is None and (auto := implicit_deploy(model)):
        (export_sec, bench_sec), implicit = auto, True
        export_sec["data"] = ev["data"]  # verified on the data the user evaluates with
    baseline = replace(loaded, model=baseline_model) if bench_sec is not None else None
    del baseline_model, ctx
    cov = coverage(model)
    warnings = [w for w in (coverage_warning(cov),) if w]
    for name, lat in (("baseline", base_lat), ("compressed", comp_lat)):
        if (w := unstable(lat)) is not None:
            warnings.append(f"PyTorch latency of the {name} model: {w}")
    report = {
        "model": loaded.spec,
        "recipe": recipe_to_dict(recipe),
        "metrics": {"baseline": base_metrics, "compressed": comp_metrics},
        "size_bytes": {"baseline": base_size, "compressed": deployed_size_bytes(model)},
        "latency_ms": {
            "note": _latency_note(model, dev),
            "simulated": _simulated(model),
            "method": LATENCY_TIMING,
            "batch": _batch_size(batch0),
            "baseline": base_lat,
            "compressed": comp_lat,
        },
        "compress_seconds": round(seconds, 2),
        "calibration": calib_used,
        "coverage": cov,
        "warnings": warnings,
        "passes": records,
        "environment": environment(),
    }
    files = {"recipe.yaml": dump_recipe(recipe), "report.json": report, "report.md": report_markdown(report)}
    files.update(report_figures(report))
    stage = None
    if export_sec is not None or bench_sec is not None:
        report["deploy_sections"] = {"export": export_sec, "bench": bench_sec, "implicit": implicit}
        stage = _deploy_files(
            replace(loaded, model=model), baseline, export_sec, bench_sec, implicit, report, Path(out)
        )
    out = save(model, out, files, _with_tokenizer(loaded, stage))
    loaded.model = model
    return JobResult(out, report)


def _with_tokenizer(loaded: LoadedModel, deploy):
    """``save``'s ``extra``: the tokenizer files (inside the atomic folder), then the deploy stage."""

    def extra(tmp: Path) -> dict:
        _copy_tokenizer(loaded, tmp)
        return deploy(tmp) if deploy is not None else {}

    return extra


def _deploy_files(
    compressed: LoadedModel,
    baseline: LoadedModel | None,
    export,
    bench,
    implicit: bool,
    report: dict,
    out: Path,
):
    """``save``'s ``extra`` callback: export/verify/bench into the temporary folder, then the report."""

    def extra(tmp: Path) -> dict:
        from edgecompress.export.deploy import deploy_stage

        try:
            report["deploy"] = deploy_stage(compressed, baseline, export, bench, tmp, out)
        except UserError as e:
            if not implicit:  # the recipe asked for it: its failure is the job's
                raise
            report["deploy"] = {}
            report["warnings"].append(f"no model.onnx and no ONNX Runtime timing: {e}")
        timed = report["deploy"].get("bench") or {}
        report["warnings"] += [f"bench: {w}" for w in timed.get("warnings", [])]
        return {"report.json": report, "report.md": report_markdown(report)}

    return extra


def _copy_tokenizer(loaded: LoadedModel, out: Path) -> None:
    if not loaded.tokenizer_dir:
        return
    dst = out / "tokenizer"
    dst.mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        src = Path(loaded.tokenizer_dir) / name
        if src.is_file():
            shutil.copy2(src, dst / name)
