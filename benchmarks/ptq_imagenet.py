"""ImageNet top-1 of the ViT PTQ methods beside the papers' figures (needs ImageNet; not run here).

    python benchmarks/ptq_imagenet.py --val /data/imagenet/val --train /data/imagenet/train \
        --arch deit_small_patch16_224 --checkpoint deit_small.safetensors [--bits 4 6] \
        [--methods uniform repq_vit adalog dopq_vit] [--eval-samples 50000] [--device cuda]

``--val`` / ``--train`` are image folders (one sub-folder per class, sorted class names = labels,
the layout torchvision's ImageFolder reads); calibration takes the first 32 images of ``--train``
as the papers do (32 images, one batch). The checkpoint must be safetensors with timm's key
names (or omit it to use timm's local cache). Prints our top-1 next to the published ones
(METHODS.md §2–3: AdaLog's README, RepQ-ViT as quoted by AdaLog, DopQ-ViT with block
reconstruction — not comparable with our calibration-only numbers) and writes
``benchmarks/results/ptq-imagenet-<arch>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.ptq import METHODS, _meta  # noqa: E402
from edgecompress.calib import make_context  # noqa: E402
from edgecompress.data.metrics import evaluate  # noqa: E402
from edgecompress.data.specs import load_data  # noqa: E402
from edgecompress.models.loading import load_model  # noqa: E402
from edgecompress.pipeline import load_builtin_passes, run  # noqa: E402

COLUMNS = ("ViT-S", "ViT-B", "DeiT-T", "DeiT-S", "DeiT-B", "Swin-S", "Swin-B")
ARCH_COLUMN = {
    "vit_small_patch16_224": "ViT-S",
    "vit_base_patch16_224": "ViT-B",
    "deit_tiny_patch16_224": "DeiT-T",
    "deit_small_patch16_224": "DeiT-S",
    "deit_base_patch16_224": "DeiT-B",
    "swin_small_patch4_window7_224": "Swin-S",
    "swin_base_patch4_window7_224": "Swin-B",
}
# Published ImageNet top-1 (METHODS.md): {(method, bits): [one per COLUMNS]}
PAPERS = {
    ("fp32", 32): [81.39, 84.54, 72.21, 79.85, 81.80, 83.23, 85.27],
    ("adalog", 3): [13.88, 37.91, 31.56, 24.47, 57.45, 64.41, 69.75],
    ("adalog", 4): [72.75, 79.68, 63.52, 72.06, 78.03, 80.77, 82.47],
    ("adalog", 6): [80.91, 84.80, 71.38, 79.39, 81.55, 83.19, 85.09],
    ("repq_vit", 4): [65.05, 68.48, 57.43, 69.03, 75.61, 79.45, 78.32],
    ("repq_vit", 6): [80.43, 83.62, 70.76, 78.90, 81.27, 82.79, 84.57],
    ("ptq4vit", 4): [42.57, 30.69, 36.96, 34.08, 64.39, 76.09, 74.02],
    ("fq-vit", 4): [0.10] * 7,
    ("dopq_vit (block reconstruction)", 3): [54.72, 65.76, 44.71, 59.26, 74.91, 74.77, 69.63],
    ("dopq_vit (block reconstruction)", 4): [75.69, 80.95, 65.54, 75.84, 80.13, 81.71, 83.34],
    ("dopq_vit (block reconstruction)", 6): [80.52, 84.02, 71.17, 79.30, 81.69, 82.95, 84.97],
}


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--val", required=True, type=Path)
    p.add_argument("--train", required=True, type=Path)
    p.add_argument("--arch", default="deit_small_patch16_224")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 6])
    p.add_argument(
        "--methods", nargs="+", default=["uniform", "repq_vit", "adalog", "dopq_vit"], choices=list(METHODS)
    )
    p.add_argument("--eval-samples", type=int, default=0, help="0: the whole --val folder")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return p.parse_args(argv)


def published(method: str, bits: int, arch: str) -> float | None:
    col = ARCH_COLUMN.get(arch)
    vals = PAPERS.get((method, bits))
    return None if col is None or vals is None else vals[COLUMNS.index(col)]


def main(argv=None) -> int:
    args = _parse(argv)
    load_builtin_passes()
    spec = f"timm:{args.arch}"
    base = load_model(spec, checkpoint=args.checkpoint)
    dev = torch.device(args.device)
    val = load_data(f"imagefolder:{args.val}", base, "test", args.eval_samples, args.batch_size)
    calib = load_data(f"imagefolder:{args.train}", base, "train", 32, 32)
    fp, fp_out = evaluate(base, base.model.to(dev), val)
    rows = [{"method": "fp32", "bits": 32, "top1": fp.get("top1"), "paper": published("fp32", 32, args.arch)}]
    for b in args.bits:
        for name in args.methods:
            loaded = load_model(spec, checkpoint=args.checkpoint)
            ctx = make_context(calib.batches, loaded.call, dev)
            t0 = time.perf_counter()
            model, _ = run(loaded.model.to(dev), [METHODS[name](b, {"threads": args.threads})], ctx)
            secs = round(time.perf_counter() - t0, 1)
            m, _ = evaluate(loaded, model, val, reference=fp_out)
            rows.append(
                {
                    "method": name,
                    "bits": b,
                    "top1": m.get("top1"),
                    "paper": published(name, b, args.arch),
                    "calib_s": secs,
                }
            )
            print(
                f"W{b}A{b} {name}: top-1 {m.get('top1')} (paper {rows[-1]['paper']}) calib {secs}s",
                flush=True,
            )
    print(f"| {args.arch} | W/A | ours top-1 | paper top-1 |\n|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['bits']} | {r['top1']} | {r['paper'] if r['paper'] is not None else '—'} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"ptq-imagenet-{args.arch}-{datetime.date.today().isoformat()}.json"
    path.write_text(
        json.dumps(
            {"meta": _meta(args.threads), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
            indent=1,
        )
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
