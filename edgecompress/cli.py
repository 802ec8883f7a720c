"""Command line: ``edgecompress compress | eval | inspect | passes | train-demo | export | bench``.

Thin: parse, call the library, print. Every user error is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
import typing
from pathlib import Path

from edgecompress.errors import UserError

DEFAULT_MODEL = "demo:vit-digits"
DEFAULT_RECIPE = "uniform_w8a8"


def _model_args(p: argparse.ArgumentParser, model_default: str | None) -> None:
    p.add_argument(
        "--model", default=model_default, help="timm:<arch>, hf:<dir>, demo:<name> or a compressed folder"
    )
    p.add_argument("--checkpoint", help="weights for a timm: model (.safetensors only)")
    p.add_argument(
        "--random-init", action="store_true", help="random weights for timm:/hf: models (explicit)"
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="edgecompress", description="Compress trained transformers with one YAML recipe."
    )
    from edgecompress import __version__

    ap.add_argument("--version", action="version", version=f"edgecompress {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    c = sub.add_parser("compress", help="run a recipe on a model and write an output folder")
    _model_args(c, None)
    c.add_argument(
        "--recipe", default=DEFAULT_RECIPE, help="recipe file or shipped recipe name (default %(default)s)"
    )
    c.add_argument("--out", help="output folder (must not exist; default runs/<model>-<recipe>-<time>)")
    c.add_argument("--calib", help="calibration data: digits, imagefolder:PATH, text, text:FILE")
    c.add_argument("--eval", dest="eval_data", help="evaluation data (same forms as --calib)")
    c.add_argument(
        "--no-export",
        action="store_true",
        help="skip the verified INT8 ONNX export and its ONNX Runtime timing that compress adds for "
        "quantized models (and the recipe's export:/bench: sections)",
    )
    c.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. passes.0.w_bits=4",
    )
    c.add_argument(
        "--device",
        default=None,
        choices=["cpu", "cuda"],
        help="where the passes run (default: the recipe's device:, cpu)",
    )
    e = sub.add_parser("eval", help="evaluate a model spec or a compressed folder")
    _model_args(e, DEFAULT_MODEL)
    e.add_argument("--data", help="digits, imagefolder:PATH, text, text:FILE (default by model kind)")
    e.add_argument("--samples", type=int, default=0, help="limit the number of samples (0 = all)")
    i = sub.add_parser("inspect", help="what a compression did, per layer (and which layer cost what)")
    i.add_argument("dir", help="a folder written by compress")
    i.add_argument(
        "--sensitivity",
        action="store_true",
        help="per-layer quantization sensitivity: one layer's quantizers on at a time, the rest bypassed "
        "(writes DIR/sensitivity.json, .png)",
    )
    i.add_argument(
        "--profile",
        action="store_true",
        help="ONNX Runtime time per module of DIR/model.onnx (or a temporary export; writes DIR/profile.json, .png)",
    )
    i.add_argument("--data", help="--sensitivity: eval data (default: the recipe's eval data)")
    i.add_argument(
        "--samples",
        type=int,
        default=None,
        help="--sensitivity: samples (default: the recipe's, at most 128 images / 64 texts; 0 = all)",
    )
    i.add_argument("--batch", type=int, default=1, help="--profile: static batch (default %(default)s)")
    i.add_argument(
        "--seq", type=int, default=128, help="--profile: tokens per text sample (default %(default)s)"
    )
    i.add_argument("--runs", type=int, default=20, help="--profile: timed runs (default %(default)s)")
    i.add_argument("--warmup", type=int, default=5, help="--profile: warm-up runs (default %(default)s)")
    i.add_argument("--threads", type=int, default=0, help="--profile: intra-op threads (0 = ORT's default)")
    i.add_argument("--top", type=int, default=15, help="rows to print (default %(default)s)")
    sub.add_parser("passes", help="every registered pass with its fields")
    t = sub.add_parser("train-demo", help="train the demo:vit-digits weights (deterministic)")
    t.add_argument("--out", default="runs/vit_digits.safetensors")
    t.add_argument("--epochs", type=int, default=300)
    t.add_argument("--seed", type=int, default=0)
    _export_parser(sub)
    _bench_parser(sub)
    return ap


def _export_parser(sub) -> None:
    x = sub.add_parser(
        "export", help="export a model or compressed folder to a verified ONNX file (or TensorRT engine)"
    )
    x.add_argument(
        "model", metavar="SPEC_OR_DIR", help="timm:<arch>, hf:<dir>, demo:<name> or a compressed folder"
    )
    x.add_argument(
        "--format",
        default="onnx",
        help="onnx (default), tensorrt, or openvino / openvino:bf16 (the ONNX file verified in OpenVINO "
        "with that precision hint)",
    )
    x.add_argument(
        "--out",
        help="ONNX file (default: DIR/model.onnx for a folder, else runs/<model>.onnx; options other than the defaults name it, e.g. model-tensorrt-b8.onnx)",
    )
    x.add_argument(
        "--opset", type=int, default=20, help="ONNX opset (default %(default)s; 17 for TensorRT 8.6)"
    )
    x.add_argument(
        "--dynamic-batch",
        action="store_true",
        help="dynamic batch axis (text models: sequence is always dynamic)",
    )
    x.add_argument(
        "--batch", type=int, default=1, help="static batch size of the graph (default %(default)s)"
    )
    x.add_argument(
        "--samples",
        type=int,
        default=64,
        help="samples of eval data for the verification (default %(default)s)",
    )
    x.add_argument(
        "--data", help="verification data (default: a folder's recipe eval data, else digits / built-in text)"
    )
    x.add_argument(
        "--weight-dtype",
        default="auto",
        choices=["auto", "int8", "uint8"],
        help="integer weight codes: int8 (fastest with VNNI), uint8 (exact on every x86 CPU in ONNX Runtime); "
        "auto: uint8 where this CPU lacks VNNI (default %(default)s)",
    )
    x.add_argument("--checkpoint", help="weights for a timm: model (.safetensors only)")
    x.add_argument(
        "--debug-compare",
        action="store_true",
        help="after a verified export, compare every quantizer's input in ONNX Runtime and PyTorch "
        "(end to end and segment by segment) and write <name>.compare.json",
    )


def _bench_parser(sub) -> None:
    b = sub.add_parser(
        "bench", help="latency of a model, compressed folder or .onnx file (median, p90, p99, CV)"
    )
    b.add_argument(
        "model", metavar="MODEL_OR_FILE", help="model spec, compressed folder, .onnx or .engine file"
    )
    b.add_argument(
        "--backend",
        default="torch",
        help="torch (default), onnxruntime, openvino (openvino:bf16 for its bf16 precision hint; "
        "pip install 'edgecompress[openvino]') or tensorrt",
    )
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--seq", type=int, default=128, help="tokens per text sample (default %(default)s)")
    b.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = the runtime's default)")
    b.add_argument("--device", default="cpu", help="torch backend: cpu or cuda")
    b.add_argument("--vs", metavar="OTHER", help="time OTHER alternately with MODEL and print the speed-up")
    b.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds (default %(default)s)")
    b.add_argument("--iterations", type=int, default=100, help="minimum timed runs (default %(default)s)")
    b.add_argument("--json", metavar="OUT", help="write the full result (stats, environment) as JSON")


def _load(args):
    from edgecompress.models.loading import load_model

    return load_model(args.model, checkpoint=args.checkpoint, random_init=args.random_init)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:60]


def cmd_compress(args) -> int:
    from edgecompress.job import compress, resolve_device
    from edgecompress.recipe import load_recipe
    from edgecompress.report import summary_rows

    recipe = load_recipe(args.recipe, args.set)
    if args.device:
        recipe.device = args.device
    resolve_device(recipe.device)  # no GPU: say so before loading anything
    args.model = args.model or recipe.model or DEFAULT_MODEL
    recipe.model = args.model
    if args.calib:
        recipe.calibration["data"] = args.calib
    if args.eval_data:
        recipe.eval["data"] = args.eval_data
    name = Path(args.recipe).stem
    out = Path(args.out or f"runs/{_slug(args.model)}-{_slug(name)}-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists():
        raise UserError(f"output folder {out} already exists (choose another --out)")
    loaded = _load(args)
    result = compress(loaded, recipe, out, deploy=False if args.no_export else True)
    from edgecompress.train import process_rank

    if process_rank() == 0:  # under torchrun, rank 0 speaks for all
        _print_table(summary_rows(result.report), ("", "baseline", "compressed"))
        for w in result.report.get("warnings", []):
            print(f"warning: {w}")
        print(f"compress time: {result.report['compress_seconds']} s; output: {result.out}")
    return 0


def _print_table(rows, header) -> None:
    rows = [tuple(map(str, header))] + [tuple(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for k, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def cmd_eval(args) -> int:
    from edgecompress.data.metrics import evaluate
    from edgecompress.data.specs import load_data

    loaded = _load(args)
    data = load_data(args.data, loaded, "test", args.samples)
    reference = None
    if loaded.kind == "encoder":  # fidelity needs a reference: the uncompressed base model
        reference = _encoder_reference(loaded, data)
    metrics, _ = evaluate(loaded, loaded.model, data, reference)
    print(json.dumps({"model": loaded.spec, **metrics}))
    return 0


def _encoder_reference(loaded, data):
    from edgecompress.data.metrics import outputs
    from edgecompress.models.loading import load_model

    spec = loaded.base.get("spec", loaded.spec)
    if spec == loaded.spec:
        return None
    base = load_model(spec)
    return outputs(base, base.model, data)


def cmd_inspect(args) -> int:
    folder = Path(args.dir)
    if not (folder / "structure.json").is_file():
        raise UserError(f"{folder} is not an edgecompress output folder (no structure.json)")
    if args.sensitivity or args.profile:
        return _inspect_diagnostics(args, folder)
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}/report.json is missing or corrupt ({e})") from None
    from edgecompress.report import LAYER_COLUMNS, layer_rows

    print(f"model: {report['model']}  passes: {', '.join(p['pass'] for p in report['passes'])}")
    for rec in report["passes"]:
        for note in rec.get("notes", []):
            print(f"{rec['pass']}: {note}")
    _print_table(layer_rows(report), LAYER_COLUMNS)
    sb, sc = report["size_bytes"]["baseline"], report["size_bytes"]["compressed"]
    print(f"size: {sb / 1e6:.3f} MB -> {sc / 1e6:.3f} MB")
    return 0


def _inspect_diagnostics(args, folder: Path) -> int:
    """``inspect --sensitivity`` / ``--profile``: :mod:`edgecompress.diagnostics`, printed."""
    from edgecompress import diagnostics as dg

    done = []
    if args.sensitivity:
        result = dg.sensitivity(folder, args.data, args.samples)
        lines, header, rows = dg.sensitivity_table(result, args.top)
        done.append((result, lines, header, rows, "sensitivity"))
    if args.profile:
        result = dg.profile(folder, args.batch, args.seq, args.runs, args.warmup, args.threads or None)
        lines, header, rows = dg.profile_table(result, args.top)
        done.append((result, lines, header, rows, "profile"))
    for result, lines, header, rows, name in done:
        print("\n".join(lines))
        _print_table(rows, header)
        for note in result["notes"]:
            print(f"note: {note}")
        png = folder / f"{name}.png"
        print(f"written: {folder / (name + '.json')}" + (f", {png}" if png.is_file() else ""))
    print(f"report: {folder / 'report.md'} (section Diagnostics)")
    return 0


def _type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "|".join(map(str, typing.get_args(tp)))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def cmd_passes(args) -> int:
    from edgecompress.pipeline import PASSES, load_builtin_passes

    load_builtin_passes()
    for name in sorted(PASSES):
        cls = PASSES[name]
        hints = typing.get_type_hints(cls)
        print(f"{name} ({cls.family}, version {cls.VERSION}): {(cls.__doc__ or '').strip().splitlines()[0]}")
        for what, why in cls.cannot_follow.items():
            print(f"    cannot follow {what}: {why}")
        if getattr(cls, "EXAMPLE", None):
            print(f"    example: {cls.EXAMPLE}")
        for f in dataclasses.fields(cls):
            if f.init:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                print(f"    {f.name}: {_type_name(hints[f.name])} = {default!r}")
    return 0


def cmd_train_demo(args) -> int:
    from edgecompress.models.demo import train_vit_digits

    acc = train_vit_digits(Path(args.out), epochs=args.epochs, seed=args.seed)
    print(f"test top-1 {acc * 100:.2f}%  weights: {args.out}")
    return 0


def _default_export_path(args) -> Path:
    """``DIR/model.onnx`` (``runs/<model>.onnx`` for a spec), named after the options that differ
    from the defaults (``model-tensorrt-b8.onnx``), so each documented export has its own file."""
    tags = [args.format.replace(":", "-")] if args.format != "onnx" else []
    tags += ["dynamic"] if args.dynamic_batch else ([f"b{args.batch}"] if args.batch != 1 else [])
    folder = Path(args.model)
    stem = "model" if folder.is_dir() else _slug(args.model)
    name = "-".join([stem, *tags]) + ".onnx"
    return folder / name if folder.is_dir() else Path("runs") / name


def cmd_export(args) -> int:
    from edgecompress.export.deploy import export_verified, saved_eval_data, summary_line
    from edgecompress.models.loading import load_model

    out = Path(args.out) if args.out else _default_export_path(args)
    if out.exists():
        raise UserError(f"{out} already exists (choose another --out)")
    loaded = load_model(args.model, checkpoint=args.checkpoint)
    data, source = args.data, "--data"
    if data is None and saved_eval_data(args.model):
        data, source = saved_eval_data(args.model), "the folder's recipe.yaml (eval data)"
    record = export_verified(
        loaded, out, args.format, args.opset, args.dynamic_batch, args.batch, args.samples, data,
        args.weight_dtype, data_source=source if data else "", debug_compare=args.debug_compare,
    )  # fmt: skip
    print(summary_line(record))
    engine = f"; engine: {record['engine']['engine']} (unverified build)" if "engine" in record else ""
    print(f"verification: {record['json']}{engine}")
    return 0


def cmd_bench(args) -> int:
    from edgecompress.bench.run import bench, format_lines

    if args.device not in ("cpu", "cuda"):
        raise UserError(f"--device {args.device!r}: choose cpu or cuda")
    timing = {"min_seconds": args.seconds, "min_iters": args.iterations}
    result = bench(
        args.model, args.backend, args.batch, args.seq, args.threads or None, args.device, args.vs, timing
    )
    for line in format_lines(result):
        print(line)
    for w in result["warnings"]:
        print(f"edgecompress: warning: {w}", file=sys.stderr)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 0


COMMANDS = {
    "compress": cmd_compress,
    "eval": cmd_eval,
    "inspect": cmd_inspect,
    "passes": cmd_passes,
    "train-demo": cmd_train_demo,
    "export": cmd_export,
    "bench": cmd_bench,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        args = build_parser().parse_args(["compress"])
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"edgecompress: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgecompress: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `edgecompress inspect DIR | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
