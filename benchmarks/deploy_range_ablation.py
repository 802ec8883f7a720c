"""Does NNCF's activation range estimator explain its remaining fidelity edge on MiniLM?

    python benchmarks/deploy_range_ablation.py [--samples 64]

NNCF sets a per-tensor activation range as the mean, over its calibration batches, of each
batch's min and max (``RangeEstimatorParametersSet.MEAN_MINMAX``, read in nncf 3.4's
``min_max/algorithm.py``); ``uniform_ptq``'s ``minmax`` observer takes the global min and max.
This script compresses ``demo:minilm`` with ``uniform_w8a8_openvino`` on the 32 built-in
calibration texts, then re-sets every activation quantizer from the mean of per-batch min/max
over the same texts in NNCF's 4 batches of 8 (statistics taken on the compressed model's
quantizer inputs), and prints the pooled-embedding cosine to FP32 of both on the built-in test
texts (PyTorch). Untimed; no package code changes.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
import torch.nn.functional as F

from edgecompress.calib import make_context, real_tokens, tracking_mask
from edgecompress.data.specs import load_data
from edgecompress.export.verify import activation_quantizers
from edgecompress.models.loading import load_model
from edgecompress.pipeline import run
from edgecompress.quantize.uniform import params_from_range
from edgecompress.recipe import load_recipe


def _embeddings(loaded, model, batches) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for b in batches:
            y, m = loaded.call(model, b), b["attention_mask"].unsqueeze(-1).float()
            out.append(F.normalize((y * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(out)


def mean_minmax_(model, batches, call) -> int:
    """Re-set every activation quantizer from the mean of per-batch min / max; returns how many."""
    points = activation_quantizers(model)
    seen = {n: [] for n, _ in points}
    with tracking_mask(model) as current, torch.no_grad():
        hooks = [
            q.register_forward_pre_hook(lambda _m, a, n=n: seen[n].append(real_tokens(a[0], current["mask"])))
            for n, q in points
        ]
        try:
            for b in batches:
                call(model, b)
        finally:
            for h in hooks:
                h.remove()
    for n, q in points:
        lo = torch.stack([x.min() for x in seen[n]]).mean()
        hi = torch.stack([x.max() for x in seen[n]]).mean()
        q.set_params(*params_from_range(lo, hi, q.bits, False))
    return len(points)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=64)
    args = p.parse_args()
    loaded = load_model("demo:minilm")
    calib = load_data(None, loaded, "train", 32, 8).batches  # NNCF's 4 batches of 8
    test = load_data(None, loaded, "test", args.samples, 8).batches
    ctx = make_context(calib, loaded.call, torch.device("cpu"))
    model, _ = run(copy.deepcopy(loaded.model), load_recipe("uniform_w8a8_openvino").passes, ctx)
    ref = _embeddings(loaded, loaded.model, test)
    rows = {"minmax (ours)": float((_embeddings(loaded, model, test) * ref).sum(-1).mean())}
    n = mean_minmax_(model, calib, loaded.call)
    rows["mean of per-batch min/max (NNCF's estimator)"] = float(
        (_embeddings(loaded, model, test) * ref).sum(-1).mean()
    )
    print(
        json.dumps(
            {"quantizers": n, "cosine_mean_vs_fp32": {k: round(v, 5) for k, v in rows.items()}}, indent=1
        )
    )


if __name__ == "__main__":
    main()
