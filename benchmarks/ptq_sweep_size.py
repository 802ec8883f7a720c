"""Where incremental input scoring (``vit_ptq/sweep.py``) pays: one FC2-shaped input search, dense vs sweep.

    python benchmarks/ptq_sweep_size.py [--threads 1] [--reps 2] [--name xeon-amx] [--out DIR]

For each shape ``(T, K, R)`` (an FC2 input ``[T, K]`` after GELU, weight ``[R, K]``, ``R = K/3`` as in
vit-digits or ``K/4`` as in MiniLM/DeiT-S) and each family (AdaLog's joint (q, scale) search, uniform
FPCS), the bf16 input search of one AdaLog round (``objectives._search_act``) runs with the sweep
forced on (``SWEEP_MIN_MACS`` 0) and off, alternated ``--reps`` times in one process after a
warm-up (compiled kernels built). Each row: the best seconds of each, their ratio, whether the two
chose the same parameters and their fp32 objectives. The smallest ``T·K·R`` from which the sweep is
faster at every larger measured size, per family, is the rule in ``sweep.SWEEP_MIN_MACS``; the file also records
what the first use of each path costs beyond its steady state (``torch.compile`` of its kernels, once
per process: the sweep's residual kernel is an extra one). Output: a table and
``benchmarks/results/ptq-sweep-size-<machine>-<date>.json`` (machine, date, command, load).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
SHAPES = [(544, 288, 96), (1088, 288, 96), (2176, 288, 96), (4352, 288, 96)]
SHAPES += [(197, 1536, 384), (394, 1536, 384), (788, 1536, 384), (1576, 1536, 384)]


def _case(t: int, k: int, r: int, family: str):
    from edgecompress.quantize.reparam import GELU_SHIFT
    from edgecompress.quantize.vit_ptq import objectives as vo
    from edgecompress.quantize.vit_ptq.fastq import fq_uniform

    g = torch.Generator().manual_seed(t + k)
    x = torch.randn(t, k, generator=g) * 1.5
    x = torch.nn.functional.gelu(x) if k >= 2 * r else x  # an FC2 input; else as after LayerNorm
    x[:, 7] *= 6
    w = torch.randn(r, k, generator=g) / k**0.5
    w_hat = fq_uniform(w, w.abs().amax(1, keepdim=True) / 7, torch.full((r, 1), 8.0), 4)
    act, ranges = vo._start_act(x, 4, GELU_SHIFT if family == "adalog" else None, torch.bfloat16)
    return x, w_hat, w, act, ranges


def _run(case, on: bool) -> tuple[float, dict]:
    from edgecompress.quantize.vit_ptq import objectives as vo
    from edgecompress.quantize.vit_ptq import sweep

    sweep.SWEEP_MIN_MACS = dict.fromkeys(("adalog", "uniform"), 0 if on else 2**62)
    sweep.K_OVER_R = 1
    x, w_hat, w, act, ranges = case
    t0 = time.perf_counter()
    got = vo._search_act(x, w_hat, w, 4, act, ranges, torch.bfloat16)
    return time.perf_counter() - t0, got


def _objective(case, act: dict) -> float:
    from edgecompress.quantize.vit_ptq import objectives as vo

    x, w_hat, w = case[:3]
    return float((vo.act_quantize(x, act, 4) @ w_hat.T - x @ w.T).pow(2).mean())


def row(shape, family: str, reps: int) -> dict:
    case = _case(*shape, family)
    times = {True: [], False: []}
    picks = {}
    for _ in range(reps):
        for on in (False, True):
            secs, picks[on] = _run(case, on)
            times[on].append(secs)
    dense, inc = min(times[False]), min(times[True])
    same = all(
        torch.equal(torch.as_tensor(picks[True][n]), torch.as_tensor(picks[False][n])) for n in picks[True]
    )
    t, k, r = shape
    return {
        "T": t, "K": k, "R": r, "macs": t * k * r, "family": family,
        "dense_s": round(dense, 3), "sweep_s": round(inc, 3), "sweep_speedup": round(dense / inc, 2),
        "same_params": same, "objective_dense": _objective(case, picks[False]),
        "objective_sweep": _objective(case, picks[True]),
    }  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shapes", nargs="+", help="T,K,R each (default: the FC2-shaped set)")
    p.add_argument("--families", nargs="+", default=["adalog", "uniform"], choices=["adalog", "uniform"])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--name", default="ptq-sweep-size", help="result file prefix")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from edgecompress.bench.env import results_file

    path, _, meta = results_file(args.out, args.name, args.threads)
    first = {}  # first use in this process (kernels compiled) minus the steady state, per path
    for fam in args.families:
        case = _case(*SHAPES[0], fam)
        cold = {on: _run(case, on)[0] for on in (False, True)}
        first[fam] = {("sweep" if on else "dense"): round(cold[on] - _run(case, on)[0], 3) for on in cold}
    print("first-use (compile) seconds beyond the steady state:", first)
    meta["first_use_extra_s"] = first
    rows = []
    print("| T | K | R | MACs | family | dense s | sweep s | speed-up | same params |")
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    for shape in shapes:
        for fam in args.families:
            rows.append(row(shape, fam, args.reps))
            r = rows[-1]
            print(f"| {r['T']} | {r['K']} | {r['R']} | {r['macs'] / 1e6:.0f}M | {fam} | {r['dense_s']} | "
                  f"{r['sweep_s']} | {r['sweep_speedup']} | {r['same_params']} |", flush=True)  # fmt: skip
    meta["loadavg_after"] = list(__import__("os").getloadavg())
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
