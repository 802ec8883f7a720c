"""Does NNCF's activation range estimator explain its remaining fidelity edge on MiniLM?

    python benchmarks/deploy_range_ablation.py [--samples 64]

NNCF sets a per-tensor activation range as the mean, over its calibration batches, of each
batch's min and max (``RangeEstimatorParametersSet.MEAN_MINMAX``, read in nncf 3.4's
``min_max/algorithm.py``); ``uniform_ptq``'s ``minmax`` observer takes the global min and max.
This script compresses ``demo:minilm`` with ``uniform_w8a8_openvino`` on the 32 built-in
calibration texts, then re-sets every activation quantizer from the mean of per-batch min/max
over the same texts in NNCF's 4 batches of 8 (statistics taken on the compressed model's
quantizer inputs), and prints the pooled-embedding cosine to FP32 of both on the built-in test
texts (PyTorch). ``--nncf-smooth`` adds rows with NNCF's SmoothQuant scale rule in place of ours
(its ``_calculate_scale_and_ratio``: ``s`` clipped to [its 10 % quantile, 100], α 0.95 or 0.5;
one difference remains: NNCF takes, per group of Linears fed by one tensor, the scales of the
member with the best min/max ratio, we take the group's largest weight column). Untimed; no
package code changes (the rule is swapped in for this process only).
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


def nncf_scale_rule(x_absmax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """NNCF 3.4's SmoothQuant scales: statistics clipped at 1e-5, ``x^α / (w^(1-α) + eps)``,
    clipped to [10 % quantile, 100]."""
    xs = x_absmax.clamp_min(1e-5)
    ws = w.detach().abs().amax(0).float().clamp_min(1e-5)
    s = xs.pow(alpha) / (ws.pow(1 - alpha) + torch.finfo(torch.float32).eps)
    return s.clamp(min=float(torch.quantile(s, 0.1)), max=1e2)


def _compress(loaded, calib, sets: list[str]):
    ctx = make_context(calib, loaded.call, torch.device("cpu"))
    return run(copy.deepcopy(loaded.model), load_recipe("uniform_w8a8_openvino", sets).passes, ctx)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--nncf-smooth", action="store_true")
    args = p.parse_args()
    loaded = load_model("demo:minilm")
    calib = load_data(None, loaded, "train", 32, 8).batches  # NNCF's 4 batches of 8
    test = load_data(None, loaded, "test", args.samples, 8).batches
    ref = _embeddings(loaded, loaded.model, test)

    def cos(m) -> float:
        return round(float((_embeddings(loaded, m, test) * ref).sum(-1).mean()), 5)

    model = _compress(loaded, calib, [])
    rows = {"minmax (ours)": cos(model)}
    n = mean_minmax_(model, calib, loaded.call)
    rows["mean of per-batch min/max (NNCF's estimator)"] = cos(model)
    if args.nncf_smooth:
        from edgecompress.quantize import smooth

        smooth.smoothing_factors = nncf_scale_rule
        for alpha in (0.95, 0.5):
            model = _compress(loaded, calib, [f"passes.0.smooth_alpha={alpha}"])
            rows[f"NNCF's scale rule, alpha {alpha}"] = cos(model)
            mean_minmax_(model, calib, loaded.call)
            rows[f"NNCF's scale rule, alpha {alpha}, + NNCF's estimator"] = cos(model)
    print(json.dumps({"quantizers": n, "cosine_mean_vs_fp32": rows}, indent=1))


if __name__ == "__main__":
    main()
