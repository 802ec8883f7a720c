"""Which SmoothQuant setting closes our INT8 fidelity gap to NNCF? A scan on the PyTorch model.

    python benchmarks/deploy_smooth_scan.py [--model minilm|deit] [--targets post_norm all]
                                            [--alphas 0.5 0.8 0.95] [--rules ours nncf] [--samples 64]

Compresses the model with ``uniform_w8a8_openvino`` for every (scale rule, ``smooth_targets``,
``smooth_alpha``) and measures the fidelity to FP32 of the PyTorch model on the test split:
pooled-embedding cosine for ``demo:minilm``, logit cosine and top-1 agreement for DeiT-S (random
weights). Calibration: the first 32 training samples in NNCF's 4 batches of 8, as
``benchmarks/deploy.py``. ``--rules nncf`` swaps in NNCF 3.4's scale rule
(:func:`deploy_range_ablation.nncf_scale_rule`); ``--sets`` adds recipe overrides to every row
(e.g. ``passes.0.attention_inputs=[q,k] passes.0.quantize_attention=true``). Untimed. Appends
rows to ``benchmarks/results/deploy-smooth-scan-<machine>-<date>.json``.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from deploy_range_ablation import _compress, _embeddings, nncf_scale_rule
from deploy_variants import MODELS

from edgecompress.bench.env import append_rows, results_file
from edgecompress.data.specs import load_data
from edgecompress.models.loading import load_model
from edgecompress.quantize import smooth


def _fidelity(loaded, test):
    if loaded.kind == "encoder":
        ref = _embeddings(loaded, loaded.model, test)
        return lambda m: {"cosine": round(float((_embeddings(loaded, m, test) * ref).sum(-1).mean()), 5)}

    def logits(m):
        with torch.no_grad():
            return torch.cat([loaded.call(m, b) for b in test]).double()

    ref = logits(loaded.model)

    def measure(m):
        y = logits(m)
        top1 = float((y.argmax(-1) == ref.argmax(-1)).double().mean()) * 100
        return {
            "cosine": round(float(F.cosine_similarity(y, ref, -1).mean()), 5),
            "top1_agreement": round(top1, 2),
        }

    return measure


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=list(MODELS), default="minilm")
    p.add_argument("--targets", nargs="+", default=["post_norm", "all"])
    p.add_argument("--alphas", nargs="+", type=float, default=[0.5, 0.8, 0.95])
    p.add_argument("--rules", nargs="+", choices=["ours", "nncf"], default=["ours"])
    p.add_argument("--sets", nargs="*", default=[])
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    path, data, meta = results_file(args.out, "deploy-smooth-scan", torch.get_num_threads())
    torch.manual_seed(0)  # DeiT-S: the random weights of benchmarks/deploy.py
    loaded = load_model(MODELS[args.model])
    calib = load_data(None, loaded, "train", 32, 8).batches
    measure = _fidelity(loaded, load_data(None, loaded, "test", args.samples, 8).batches)
    ours, rows = smooth.smoothing_factors, []
    for rule in args.rules:
        smooth.smoothing_factors = nncf_scale_rule if rule == "nncf" else ours
        for targets in args.targets:
            for alpha in args.alphas:
                sets = [f"passes.0.smooth_alpha={alpha}", f"passes.0.smooth_targets={targets}", *args.sets]
                row = {
                    "model": args.model,
                    "rule": rule,
                    "targets": targets,
                    "alpha": alpha,
                    "sets": args.sets,
                }
                rows.append({**row, **measure(_compress(loaded, calib, sets)), "samples": args.samples})
                print(json.dumps(rows[-1]), flush=True)
    append_rows(path, data, meta, rows)


if __name__ == "__main__":
    main()
