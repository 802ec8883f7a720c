"""SeerAttention's ``dropped: mean`` option: what the dropped blocks' estimates cost and what they buy.

    python benchmarks/seer_dropped.py [--parts speed oracle] [--threads 2] [--reps 3]

* ``speed`` (time it under the bench lock) — PyTorch SDPA (dense), the core's CPU path with
  ``dropped: skip`` (the C++ kernel) and with ``dropped: mean`` (the kernel with its log-sum-exp, the
  estimates, the merge: :meth:`SeerAttentionCore.sparse`), alternated in one process per
  configuration: 4k and 16k tokens (``--lengths``), 8 heads, head dim 64, block 64, densities
  0.5/0.3/0.1 (random per-row top-k, forced blocks as the pass), causal and not. Ratios to dense.
* ``oracle`` (untimed) — demo:minilm at 512 tokens (built-in test texts concatenated, ``--windows``
  windows), every attention keeping the blocks of largest *true* softmax mass (per-row top-k,
  ``oracle_mass``), random blocks or the static local + global pattern at densities 0.5/0.3/0.1,
  blocks of 16 and 32 tokens, with ``skip`` and with ``mean``: mean embedding cosine to the dense
  model (the choice machinery of ``benchmarks/seer_diagnose.py``: no trained gate).

Rows go to the ``dropped-speed`` / ``dropped-oracle`` parts of ``benchmarks/results/seer-<machine>-<date>.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

from edgecompress.sparsity.seer import execute as X  # noqa: E402
from edgecompress.sparsity.seer.core import SeerAttentionCore  # noqa: E402

ORACLE_RUNS = (
    ("oracle_mass", 0.5),
    ("random", 0.5),
    ("static", 0.5),
    ("oracle_mass", 0.3),
    ("oracle_mass", 0.1),
)


def _time(seer, q, k, v, core, keep, reps: int) -> dict:
    """Dense SDPA and the core's sparse path with ``skip`` and ``mean``, alternated: median seconds."""
    d = q.shape[-1]

    def sparse(mode):
        core.dropped = mode
        return core.sparse(q, k, v, keep, None, d**-0.5)

    fns = {"dense": lambda: X.dense(q, k, v, None, core.causal, d**-0.5)}
    fns.update(skip=lambda: sparse("skip"), mean=lambda: sparse("mean"))
    return seer.alternate(fns, reps)


@torch.no_grad()
def speed(args, seer) -> list[dict]:
    rows, d, block, h = [], 64, 64, 8
    for n in args.lengths:
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, h, n, d, generator=g) for _ in range(3))
        for causal in (False, True):
            core = SeerAttentionCore(h, h, d, d, block, causal, form="cpp")
            for density in (0.5, 0.3, 0.1):
                keep, allowed = seer.random_keep(1, h, n, block, causal, density)
                kept = float(keep.sum() / allowed.expand_as(keep).sum())
                t = _time(seer, q, k, v, core, keep, args.reps)
                row = {
                    "tokens": n, "heads": h, "head_dim": d, "block": block, "causal": causal, "density": density,
                    "kept": round(kept, 4), "threads": torch.get_num_threads(),
                    **{f"{m}_s": round(t[m], 4) for m in t},
                    "skip_speedup": round(t["dense"] / t["skip"], 3), "mean_speedup": round(t["dense"] / t["mean"], 3),
                    "mean_over_skip": round(t["mean"] / t["skip"], 3), "goal": round(0.8 / kept, 3),
                }  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def oracle(args, seer) -> list[dict]:
    from transformers import AutoTokenizer

    from edgecompress.data.metrics import evaluate
    from edgecompress.data.specs import Batches
    from edgecompress.models.attention import adapters
    from edgecompress.models.loading import load_model

    diag, SQ = seer.sibling("seer_diagnose"), seer.sibling("seer_quality")
    loaded = load_model("demo:minilm")
    tok = AutoTokenizer.from_pretrained(loaded.tokenizer_dir, local_files_only=True)
    specials = (tok.cls_token_id, tok.sep_token_id)
    test_ids = SQ.token_stream(tok, "test")
    data = SQ.windows(test_ids, 512, args.windows, *specials)
    batches = Batches(SQ._batches(data, 3), None, "builtin-long", data["input_ids"].shape[0])
    _, ref = evaluate(loaded, loaded.model, batches)
    rows = []
    for block in (16, 32):
        model, _ = SQ.train_gates(loaded, data, SQ.windows(test_ids, 512, 2, *specials), block, 1, 4)
        for method, density in ORACLE_RUNS:
            for mode in ("skip", "mean"):
                stats: list = []
                for _, a in adapters(model):
                    a.core.density, a.core.threshold, a.core.form, a.core.dropped = (
                        density,
                        None,
                        "reference",
                        mode,
                    )
                    a.core.choose = types.MethodType(diag._choose_logging(SQ, method, None, stats), a.core)
                m, _ = evaluate(loaded, model, batches, reference=ref)
                row = {
                    "block": block, "method": method, "density": density, "dropped": mode,
                    "kept": round(sum(s[1] for s in stats) / len(stats), 4),
                    "kept_mass": round(sum(s[0] for s in stats) / len(stats), 4),
                    "cosine_mean": m["cosine_mean"], "cosine_min": m["cosine_min"], "windows": args.windows,
                }  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["speed", "oracle"], choices=["speed", "oracle"])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    seer = importlib.import_module("benchmarks.seer")  # its sibling() loads the other scripts
    if "speed" in args.parts:
        torch.set_num_threads(args.threads)
        seer.save_part(
            args.out, "dropped-speed", speed(args, seer), {"method": "alternating, median after a warm-up"}
        )
    if "oracle" in args.parts:
        torch.set_num_threads(1)
        seer.save_part(args.out, "dropped-oracle", oracle(args, seer), {"tokens": 512})


if __name__ == "__main__":
    main()
