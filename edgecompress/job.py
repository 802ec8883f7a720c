"""The main job: load → baseline metrics → calibrate → passes → metrics → save (one output folder)."""

from __future__ import annotations

import copy
import platform
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from edgecompress.calib import make_context
from edgecompress.data.metrics import evaluate
from edgecompress.data.specs import load_data
from edgecompress.models.loading import LoadedModel
from edgecompress.pipeline import run, save
from edgecompress.quantize.modules import deployed_size_bytes
from edgecompress.recipe import Recipe, dump_recipe, recipe_to_dict

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


def _latency(loaded: LoadedModel, model, batch) -> dict:
    from edgecompress.bench.timing import time_callable

    with torch.no_grad():
        return time_callable(lambda: loaded.call(model, batch), min_seconds=0.5, min_iters=5, warmup_s=0.2)


def compress(loaded: LoadedModel, recipe: Recipe, out: Path, device: str = "cpu") -> JobResult:
    """Run ``recipe`` on ``loaded`` and write the output folder atomically; returns its report."""
    if recipe.export is not None or recipe.bench is not None:
        from edgecompress.export.deploy import preflight

        preflight(recipe.export, recipe.bench)  # e.g. TensorRT missing: say so before any work
    dev = torch.device(device)
    model = loaded.model.to(dev)
    cal, ev = recipe.calibration, recipe.eval
    eval_data = load_data(ev["data"], loaded, "test", ev["samples"], ev["batch_size"])
    base_metrics, base_out = evaluate(loaded, model, eval_data)
    base_size = deployed_size_bytes(model)
    baseline_model = copy.deepcopy(model)  # timed after compression, back to back with the result
    needs = any(p.needs_data for p in recipe.passes)
    ctx_batches = (
        load_data(cal["data"], loaded, "train", cal["samples"], cal["batch_size"]).batches
        if needs
        else [eval_data.batches[0]]
    )
    ctx = make_context(ctx_batches, loaded.call, dev, cal["seed"])
    torch.manual_seed(cal["seed"])
    t0 = time.perf_counter()
    model, records = run(model, recipe.passes, ctx)
    seconds = time.perf_counter() - t0
    comp_metrics, _ = evaluate(loaded, model, eval_data, reference=base_out)
    batch0 = _latency_batch(eval_data.batches[0])
    base_lat, comp_lat = _latency(loaded, baseline_model, batch0), _latency(loaded, model, batch0)
    baseline = replace(loaded, model=baseline_model) if recipe.bench is not None else None
    del baseline_model
    report = {
        "model": loaded.spec,
        "recipe": recipe_to_dict(recipe),
        "metrics": {"baseline": base_metrics, "compressed": comp_metrics},
        "size_bytes": {"baseline": base_size, "compressed": deployed_size_bytes(model)},
        "latency_ms": {
            "note": "PyTorch eager on this CPU; fake-quantized layers compute in float, so they are not faster here",
            "batch": _batch_size(batch0),
            "baseline": base_lat,
            "compressed": comp_lat,
        },
        "compress_seconds": round(seconds, 2),
        "passes": records,
        "environment": environment(),
    }
    files = {"recipe.yaml": dump_recipe(recipe), "report.json": report, "report.md": report_markdown(report)}
    extra = None
    if recipe.export is not None or recipe.bench is not None:
        extra = _deploy_files(replace(loaded, model=model), baseline, recipe, report, Path(out))
    out = save(model, out, files, extra)
    _copy_tokenizer(loaded, out)
    loaded.model = model
    return JobResult(out, report)


def _deploy_files(
    compressed: LoadedModel, baseline: LoadedModel | None, recipe: Recipe, report: dict, out: Path
):
    """``save``'s ``extra`` callback: export/verify/bench into the temporary folder, then the report."""

    def extra(tmp: Path) -> dict:
        from edgecompress.export.deploy import deploy_stage

        report["deploy"] = deploy_stage(compressed, baseline, recipe.export, recipe.bench, tmp, out)
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


def summary_rows(report: dict) -> list[tuple[str, str, str]]:
    """(what, baseline, compressed) rows for the console table and report.md."""
    b, c = report["metrics"]["baseline"], report["metrics"]["compressed"]
    rows = []
    for key in ("top1", "top1_agreement", "cosine_mean", "nn_agreement", "perplexity"):
        if key in b or key in c:
            rows.append((key, str(b.get(key, "—")), str(c.get(key, "—"))))
    sb, sc = report["size_bytes"]["baseline"], report["size_bytes"]["compressed"]
    rows.append(("size (MB)", f"{sb / 1e6:.3f}", f"{sc / 1e6:.3f} ({sb / max(sc, 1):.2f}x smaller)"))
    lat = report["latency_ms"]
    rows.append(
        (
            f"latency CPU b{lat['batch']} (ms, median)",
            str(lat["baseline"]["median_ms"]),
            str(lat["compressed"]["median_ms"]),
        )
    )
    return rows + _deploy_rows(report.get("deploy") or {})


def _deploy_rows(deploy: dict) -> list[tuple[str, str, str]]:
    """Rows for the ``export:`` / ``bench:`` recipe sections (absent when they did not run)."""
    rows = []
    if "bench" in deploy:
        b = deploy["bench"]
        med = {r["target"]: r["latency"]["median_ms"] for r in b["results"]}
        what = f"latency {b['backend']} b{b['batch']} (ms, median)"
        rows.append((what, str(med["baseline"]), f"{med['compressed']} ({b['speedup']:.2f}x faster)"))
    if "export" in deploy:
        v = deploy["export"]["verification"]
        fid = (
            f"top-1 agree {v['top1_agreement']}%"
            if "top1_agreement" in v
            else f"cosine min {v['cosine_min']}"
        )
        rows.append(("ONNX export (verified vs PyTorch)", "—", f"{deploy['export']['file']}: {fid}"))
    return rows


def report_markdown(report: dict) -> str:
    lines = [
        f"# edgecompress report: {report['model']}",
        "",
        "| metric | baseline | compressed |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in summary_rows(report)]
    lines += ["", f"Latency: {report['latency_ms']['note']}.", ""]
    for rec in report["passes"]:
        lines += [
            f"## pass `{rec['pass']}` ({rec['seconds']} s)",
            "",
            "| module | what | bits | SQNR (dB) |",
            "|---|---|---|---|",
        ]
        for row in rec["layers"]:
            bits = row.get("bits", row.get("w_bits", ""))
            what = row.get("quantizer", row.get("layer", ""))
            sq = row.get("sqnr_db", row.get("weight_sqnr_db", ""))
            lines.append(f"| {row['name']} | {what} {row.get('role', '')} | {bits} | {sq} |")
        lines.append("")
    env = report["environment"]
    lines.append(
        f"Environment: torch {env['torch']}, {env['cpu']}, {env['threads']} threads, CUDA: {env['cuda']}."
    )
    return "\n".join(lines) + "\n"
