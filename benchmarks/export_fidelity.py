"""Do exported non-uniform quantizers reproduce PyTorch? AdaLog / TanQ / log√2 on the digits test split.

    python benchmarks/export_fidelity.py [--recipes adalog_w4a4 dopq_vit_w4a4 ...] [--samples 450]

For each recipe: ``edgecompress compress --model demo:vit-digits --recipe R`` (32 calibration
images, the recipe's own settings), then ``edgecompress export OUT --samples N`` — the verification
runs the ONNX file in ONNX Runtime (our session settings) against the fake-quantized PyTorch model
on the first N images of the digits test split (450 = all of it) and reports the top-1 agreement,
the per-image logits cosine (min / mean) and the max-abs error. The PyTorch top-1 accuracy from
the compress report is printed beside it. The table is printed and written, with the machine and
date, to ``benchmarks/results/export-fidelity-<machine>-<date>.json``. Issue 4 asks for top-1
agreement ≥ 99.5 % for the AdaLog and TanQ (dopq_vit) exports.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgecompress.cli import main as cli  # noqa: E402

RECIPES = ["adalog_w4a4", "adalog_w6a6", "adalog_w3a3", "dopq_vit_w4a4", "dopq_vit_w6a6", "repq_vit_w4a4"]


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="+", default=RECIPES)
    p.add_argument("--samples", type=int, default=450, help="digits test images for the verification")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return p.parse_args(argv)


def _run(argv: list[str], must_pass: bool = True) -> str:
    """Run the CLI in-process; returns its error line ('' on success)."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = cli(argv)
    if code != 0 and must_pass:
        raise SystemExit(f"edgecompress {' '.join(argv)} failed: {err.getvalue().strip()}")
    return err.getvalue().strip() if code else ""


def one(recipe: str, samples: int, work: Path) -> dict:
    out = work / recipe
    t0 = time.perf_counter()
    _run(["compress", "--model", "demo:vit-digits", "--recipe", recipe, "--out", str(out)])
    t1 = time.perf_counter()
    onnx_path = work / f"{recipe}.onnx"
    # a failed verification exits 2 (and removes the ONNX file) but keeps its JSON: report it anyway
    error = _run(
        ["export", str(out), "--out", str(onnx_path), "--samples", str(samples), "--batch", "50"], False
    )
    record = json.loads((work / f"{recipe}.verification.json").read_text())
    report = json.loads((out / "report.json").read_text())
    v = record["verification"]
    return {
        "recipe": recipe,
        "pytorch_top1": report["metrics"]["compressed"].get("top1"),
        "forms": record["export"]["forms"],
        **v["metrics"],
        "passed": v["passed"],
        "error": error or None,
        "compress_s": round(t1 - t0, 1),
        "export_verify_s": round(time.perf_counter() - t1, 1),
    }


def table(rows: list[dict]) -> str:
    head = (
        "| recipe | PyTorch top-1 % | ONNX vs PyTorch top-1 agreement % | cosine min | cosine mean "
        "| images with cosine < 0.99 | max-abs err | images | verification |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['pytorch_top1']} | {r['top1_agreement']} | {r['cosine_min']} | "
            f"{r['cosine_mean']} | {r['samples_below_cosine_floor']} | {r['max_abs_error']:.3g} | "
            f"{r['samples']} | {'passed' if r['passed'] else 'FAILED'} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes:
            rows.append(one(recipe, args.samples, Path(tmp)))
            print(f"{recipe}: {rows[-1]}", flush=True)
    print(table(rows))
    meta = {
        "machine": socket.gethostname(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "command": "python benchmarks/export_fidelity.py " + " ".join(argv or sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"export-fidelity-{meta['machine']}-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps({**meta, "rows": rows, "table": table(rows)}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
