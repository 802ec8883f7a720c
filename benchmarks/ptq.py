"""PTQ accuracy and calibration time of the ViT PTQ methods on the built-in demo models (CPU).

    python benchmarks/ptq.py [--bits 4 6 3 8] [--models vit-digits minilm] [--threads N]
                             [--max-tokens N] [--deit-small] [--quick]

Rows: ``uniform`` (uniform_ptq, min/max), ``log2-softmax`` (repq_vit with FQ-ViT's log2 softmax),
``repq_vit``, ``adalog``, ``dopq_vit`` (+ ``dopq_vit-mad``, our reading of v3). Columns: W/A bits.

* demo:vit-digits: top-1 on the whole digits test split (450 images), agreement of the top-1 with
  FP32 and the logits' SQNR against FP32; calibration = the first 32 train images.
* demo:minilm: mean cosine of the mean-pooled embeddings to FP32 and nearest-neighbour agreement
  on the built-in test texts; calibration = the first 32 train texts.
* calibration seconds: wall time of ``pipeline.run`` (the pass alone), with the torch thread count
  used (``--threads``, default: torch's) and the machine's load average printed beside it — on a
  shared CPU, multi-threaded small ops can wait for a descheduled thread (see vit_ptq.calibrate_).
* ``--deit-small``: calibration time of adalog W4A4 on timm:deit_small_patch16_224 with random
  weights and 32 random 224×224 images (accuracy is meaningless there, the time is the point).
  ``--deit-blocks N`` keeps only its first N of 12 blocks (identical shapes), for CPUs where the
  whole model at the default (every calibration token) does not fit the time at hand; the row
  says how many blocks ran.

The table is printed and written, with the machine, torch/timm versions and date, to
``benchmarks/results/ptq-<machine>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgecompress.calib import make_context  # noqa: E402
from edgecompress.data.metrics import evaluate  # noqa: E402
from edgecompress.data.specs import load_data  # noqa: E402
from edgecompress.models.loading import load_model  # noqa: E402
from edgecompress.pipeline import load_builtin_passes, run  # noqa: E402
from edgecompress.quantize.ptq import UniformPTQ  # noqa: E402
from edgecompress.quantize.vit_ptq import AdaLogPTQ, DopQViTPTQ, RepQViTPTQ  # noqa: E402

METHODS = {
    "uniform": lambda b, kw: UniformPTQ(w_bits=b, a_bits=b, observer="minmax"),
    "log2-softmax": lambda b, kw: RepQViTPTQ(w_bits=b, a_bits=b, softmax_quantizer="log2", **kw),
    "repq_vit": lambda b, kw: RepQViTPTQ(w_bits=b, a_bits=b, **kw),
    "adalog": lambda b, kw: AdaLogPTQ(w_bits=b, a_bits=b, **kw),
    "dopq_vit": lambda b, kw: DopQViTPTQ(w_bits=b, a_bits=b, **kw),
    "dopq_vit-mad": lambda b, kw: DopQViTPTQ(w_bits=b, a_bits=b, reparam="mad", **kw),
}
CALIB_SAMPLES = 32


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, nargs="+", default=[4, 6])
    p.add_argument("--models", nargs="*", default=["vit-digits", "minilm"], choices=["vit-digits", "minilm"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--threads", type=int, default=0, help="intra-op threads for the passes (0: torch's)")
    p.add_argument("--max-tokens", type=int, default=None, help="subsample calibration tokens (default: all)")
    p.add_argument("--deit-small", action="store_true", help="also time adalog W4A4 on deit_small (random)")
    p.add_argument("--deit-blocks", type=int, default=None, help="time only deit_small's first N blocks")
    p.add_argument("--quick", action="store_true", help="W4A4 only, vit-digits only")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return p.parse_args(argv)


def _logit_sqnr(ref: list[torch.Tensor], out: list[torch.Tensor]) -> float:
    r, o = torch.cat(ref).double(), torch.cat(out).double()
    return round(float(10 * torch.log10(r.pow(2).sum() / (r - o).pow(2).sum().clamp_min(1e-30))), 2)


def bench_model(spec: str, methods: list[str], bits: list[int], kw: dict) -> list[dict]:
    base = load_model(spec)
    test = load_data(None, base, "test", 0, 64)
    calib = load_data(None, base, "train", CALIB_SAMPLES, CALIB_SAMPLES)
    fp_metrics, fp_out = evaluate(base, base.model, test)
    rows = [{"model": spec, "method": "fp32", "bits": 32, **fp_metrics, "calib_s": 0.0}]
    print(f"{spec} fp32 {fp_metrics}", flush=True)
    for b in bits:
        for name in methods:
            loaded = load_model(spec)
            ctx = make_context(calib.batches, loaded.call, torch.device("cpu"))
            p = METHODS[name](b, kw)
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            model, _ = run(loaded.model, [p], ctx)
            secs = time.perf_counter() - t0
            metrics, out = evaluate(loaded, model, test, reference=fp_out)
            row = {
                "model": spec,
                "method": name,
                "bits": b,
                **metrics,
                "calib_s": round(secs, 1),
                "load_avg": load,
                "threads": kw["threads"],
                "max_tokens": None if name == "uniform" else kw["max_tokens"],
            }
            if loaded.kind == "image":
                row["logit_sqnr_db"] = _logit_sqnr(fp_out, out)
            rows.append(row)
            print(f"{spec} W{b}A{b} {name}: {metrics} calib {secs:.1f}s (load {load:.1f})", flush=True)
    return rows


def bench_deit_small(kw: dict, blocks: int | None) -> dict:
    loaded = load_model("timm:deit_small_patch16_224?pretrained=false")
    total = len(loaded.model.blocks)
    if blocks is not None:
        loaded.model.blocks = loaded.model.blocks[:blocks]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(CALIB_SAMPLES, 3, 224, 224, generator=gen)]
    ctx = make_context(batches, loaded.call, torch.device("cpu"))
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    run(loaded.model, [AdaLogPTQ(w_bits=4, a_bits=4, **kw)], ctx)
    secs = time.perf_counter() - t0
    ran = len(loaded.model.blocks)
    print(
        f"deit_small_patch16_224 (random, {ran}/{total} blocks) adalog W4A4: calib {secs:.1f}s (load {load:.1f})"
    )
    return {
        "model": "timm:deit_small_patch16_224 (random weights)",
        "blocks": f"{ran}/{total}",
        "method": "adalog",
        "bits": 4,
        "calib_s": round(secs, 1),
        "load_avg": load,
        "threads": kw["threads"],
        "max_tokens": kw["max_tokens"],
    }


def table(rows: list[dict]) -> str:
    keys = ("top1", "top1_agreement", "logit_sqnr_db", "cosine_mean", "nn_agreement")
    lines = ["| model | method | W/A | " + " | ".join(keys) + " | calib s |", "|" + "---|" * (len(keys) + 4)]
    for r in rows:
        cells = [str(r.get(k, "")) for k in keys]
        lines.append(
            f"| {r['model']} | {r['method']} | {r['bits']} | "
            + " | ".join(cells)
            + f" | {r.get('calib_s', '')} |"
        )
    return "\n".join(lines)


def _merge(path: Path, rows: list[dict]) -> list[dict]:
    """Keep the rows of an earlier run today for (model, method, bits, max_tokens, blocks) this run did not
    measure (each row names the commit that produced it)."""
    if not path.is_file():
        return rows

    def key(r: dict) -> tuple:
        return r["model"], r["method"], r["bits"], r.get("max_tokens"), r.get("blocks")

    mine = {key(r) for r in rows}
    old = [r for r in json.loads(path.read_text()).get("rows", []) if key(r) not in mine]
    return old + rows


def _commit() -> str:
    """The checked-out commit (``+dirty`` with uncommitted changes), or ``unknown`` outside git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "edgecompress"], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _meta(threads: int) -> dict:
    import timm
    import transformers

    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": socket.gethostname(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def main(argv=None) -> int:
    args = _parse(argv)
    load_builtin_passes()
    bits, models = ([4], ["vit-digits"]) if args.quick else (args.bits, args.models)
    kw = {"threads": args.threads, "max_tokens": args.max_tokens}
    rows = []
    for m in models:
        rows += bench_model(f"demo:{m}", args.methods, bits, kw)
    if args.deit_small:
        rows.append(bench_deit_small(kw, args.deit_blocks))
    commit = _commit()
    rows = [{**r, "commit": commit} for r in rows]
    meta = _meta(args.threads)
    print(table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"ptq-{meta['machine']}-{datetime.date.today().isoformat()}.json"
    rows = _merge(path, rows)
    path.write_text(
        json.dumps({"meta": meta, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1)
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
