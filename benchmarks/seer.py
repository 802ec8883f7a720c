"""SeerAttention on CPU: quality vs density against baselines, and the CPU block-sparse form's speed.

    python benchmarks/seer.py [--parts speed forms minilm lm] [--threads 2] [--lm-dir DIR]

Parts (rows merged into ``benchmarks/results/seer-<machine>-<date>.json``; PNGs beside it):

* ``speed`` — the core's CPU form (float32: the C++ kernel, :mod:`edgecompress.sparsity.seer.cpp`,
  built before timing; other dtypes: the batched kept-block matmuls,
  :mod:`edgecompress.sparsity.seer.tiled`) against PyTorch SDPA (dense, its fused CPU kernel) in the
  same dtype (``--dtype``, float32 by default) at 4k/8k/16k tokens (``--lengths``), 8 heads
  (``--heads``: the rows of each head count are kept side by side), head dim 64, batch 1, densities 1.0/0.5/0.3/0.1 (per-row top-k of random scores, diagonal and first block
  forced, decoders' last 2 rows dense), causal and not. Each configuration alternates dense and
  sparse calls in one process (``--reps`` each after a warm-up) and reports the ratio of medians and
  each side's FLOP rate (kept blocks' FLOPs for the sparse side). At density 1.0 the core runs SDPA
  itself (every block kept), so that row is SDPA vs SDPA. Runs with other lengths or dtypes replace
  only their own rows of the part (``speed``, ``speed-bfloat16``, ``speed-threads1``: dtype and
  ``--threads`` other than 2 name the part).
* ``forms`` — at 4k and 16k tokens (``--forms-lengths``), density 0.3, causal and not: the C++
  kernel, the tiled form, the gathered form and FlexAttention compiled for the CPU
  (:mod:`edgecompress.sparsity.seer.flex`), each over SDPA, alternated in one process (which form
  the core uses).
* ``minilm`` — demo:minilm at 512 tokens (built-in texts concatenated): gates at ``--block`` (32)
  trained by the pass on the train texts (windows every ``--train-stride`` tokens; held-out KL
  before/after), their threshold calibrated to density 0.5 on the train windows, then mean
  embedding cosine and nearest-neighbour agreement to the dense model on the test texts at
  densities 0.5/0.3/0.1 for the trained gates and, at the same per-row budgets and forced blocks,
  a static local + global pattern, the oracle top-k of the true pooled probabilities, and random
  blocks; the gates at the calibrated and fixed thresholds; the oracle cover (``--quick``: density
  0.5, the calibrated threshold, cover 0.8/0.85). ``--dropped V`` sets each core's ``dropped``
  where the cores have it (the dropped-block estimate). Part ``minilm-block<B>[-stride<S>][-dropped-V]``.
* ``lm`` — the same comparison on a small Llama-style causal LM trained on the built-in text by
  ``benchmarks/seer_lm.py`` (``--lm-dir``), as perplexity at 1024 and 2048 tokens (blocks of 64,
  ``--lm-steps`` cached gate steps; ``--dropped V`` as above, part ``lm[-dropped-V]``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# benchmarks/kernels.py would shadow the `kernels` package transformers probes for: keep this folder off the path
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

from edgecompress.sparsity.seer import execute as X  # noqa: E402
from edgecompress.sparsity.seer.cpp import attend as cpp_attend  # noqa: E402
from edgecompress.sparsity.seer.flex import flex  # noqa: E402
from edgecompress.sparsity.seer.gate import allowed_blocks  # noqa: E402
from edgecompress.sparsity.seer.masks import forced_blocks, select_blocks  # noqa: E402
from edgecompress.sparsity.seer.tiled import tiled  # noqa: E402

OUT = ROOT / "benchmarks" / "results"
DENSITIES = (1.0, 0.5, 0.3, 0.1)


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["speed", "forms", "minilm", "lm"])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--forms-lengths", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--minilm-steps", type=int, default=60)
    p.add_argument(
        "--minilm-lr", type=float, default=None, help="minilm: the gates' lr (default: the pass's)"
    )
    p.add_argument("--block", type=int, default=32, help="minilm: the gates' block size")
    p.add_argument("--train-stride", type=int, default=None,
                   help="minilm: a train window starts every N tokens (default: disjoint windows)")  # fmt: skip
    p.add_argument(
        "--quick", action="store_true", help="minilm: density 0.5 and the calibrated threshold only"
    )
    p.add_argument("--dropped", default=None,
                   help="minilm: set each core's `dropped` (e.g. mean) where the cores have it")  # fmt: skip
    p.add_argument("--lm-dir", type=Path, default=Path("/tmp/seer-lm"))
    p.add_argument("--lm-steps", type=int, default=40)
    p.add_argument("--out", type=Path, default=OUT)
    return p.parse_args(argv)


def sibling(name: str):
    """A module of this folder, loaded by path (the folder is not on sys.path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def machine() -> str:
    return os.environ.get("EDGE_MACHINE", "xeon-amx")


RUN_DATE = os.environ.get("EDGE_RUN_DATE", "2026-12-06")  # the project's session date (results file name)


def result_path(out: Path) -> Path:
    return out / f"seer-{machine()}-{RUN_DATE}.json"


def save_part(out: Path, part: str, rows, extra: dict | None = None, key=None) -> Path:
    """Write ``rows`` as ``part`` of the results file; with ``key`` (a row's identity) earlier rows of
    the part that this run did not measure are kept, with the command and load of their own run."""
    path = result_path(out)
    doc = json.loads(path.read_text()) if path.is_file() else {}
    here = {"command": "python " + " ".join(sys.argv), "loadavg": os.getloadavg()}
    if key is not None:
        old = doc.get("parts", {}).get(part, {})
        mine = {key(r) for r in rows}
        kept = [{**{k: old.get(k) for k in here}, **r} if "command" not in r else r
                for r in old.get("rows", []) if key(r) not in mine]  # fmt: skip
        rows = kept + [{**r, **here} for r in rows]
    doc.update(
        machine=machine(), cpu=platform.processor() or platform.machine(), date=RUN_DATE,
        clock=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__, threads=torch.get_num_threads(),
    )  # fmt: skip
    doc.setdefault("parts", {})[part] = {
        "command": "python " + " ".join(sys.argv),
        "loadavg": os.getloadavg(),
        "rows": rows,
        **(extra or {}),
    }
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    return path


# ---- speed ---------------------------------------------------------------------------------------


def random_keep(b, h, n, block, causal, density, seed=0, forced=True):
    nb = -(-n // block)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, h, nb, nb, generator=g)
    allowed = allowed_blocks(nb, causal, None, "cpu")
    force = forced_blocks(nb, causal, forced, forced, 2 if forced else 0)
    return select_blocks(logits, allowed, force, density, None), allowed


def alternate(fns: dict, reps: int) -> dict:
    """Median seconds of each function, called in turn ``reps`` times after one warm-up call each."""
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def time_config(q, k, v, keep, allowed, causal: bool, block: int, reps: int) -> dict:
    """Dense SDPA and the core's sparse execution of ``keep``, alternated; seconds (medians)."""
    d = q.shape[-1]
    full = bool((keep == allowed.expand_as(keep)).all())

    def sparse():  # what the core's form "auto" runs on CPU without a model bias
        if full:  # every allowed block kept: SDPA
            return X.dense(q, k, v, None, causal, d**-0.5)
        out = cpp_attend(q, k, v, keep, causal, d**-0.5, block)
        return tiled(q, k, v, keep, causal, d**-0.5, block) if out is None else out

    return alternate({"dense": lambda: X.dense(q, k, v, None, causal, d**-0.5), "sparse": sparse}, reps)


@torch.no_grad()
def speed(args) -> list[dict]:
    rows, dtype = [], getattr(torch, args.dtype)
    d, block = 64, 64
    for n in args.lengths:
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, args.heads, n, d, generator=g).to(dtype) for _ in range(3))
        for causal in (False, True):
            for density in DENSITIES:
                keep, allowed = random_keep(1, args.heads, n, block, causal, density)
                kept = float(keep.sum() / allowed.expand_as(keep).sum())
                t = time_config(q, k, v, keep, allowed, causal, block, args.reps)
                flops = 4 * n * n * d * args.heads * (0.5 if causal else 1.0)  # QK^T and PV, allowed blocks
                row = {
                    "tokens": n, "heads": args.heads, "head_dim": d, "causal": causal, "density": density,
                    "dtype": args.dtype, "threads": torch.get_num_threads(),
                    "kept": round(kept, 4), "dense_s": round(t["dense"], 4), "sparse_s": round(t["sparse"], 4),
                    "speedup": round(t["dense"] / t["sparse"], 3), "goal": round(0.8 / kept, 3),
                    "dense_gflops": round(flops / t["dense"] / 1e9, 1),
                    "sparse_gflops": round(flops * kept / t["sparse"] / 1e9, 1),
                }  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


# ---- forms ---------------------------------------------------------------------------------------


@torch.no_grad()
def forms(args) -> list[dict]:
    """Each CPU form against SDPA, alternated in one process per configuration (compiling excluded:
    FlexAttention's first call, timed apart, compiles it)."""
    d, block, density, rows = 64, 64, 0.3, []
    for n in args.forms_lengths:
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(1, args.heads, n, d, generator=g) for _ in range(3))
        for causal in (False, True):
            keep, allowed = random_keep(1, args.heads, n, block, causal, density)
            ref = X.masked_dense(q, k, v, keep, None, causal, d**-0.5, block) if n <= 4096 else None
            t0 = time.perf_counter()
            flex(q, k, v, keep, causal, d**-0.5, block)
            first = time.perf_counter() - t0
            fns = {
                "sdpa_dense": partial(X.dense, q, k, v, None, causal, d**-0.5),
                "cpp": partial(cpp_attend, q, k, v, keep, causal, d**-0.5, block),
                "tiled": partial(tiled, q, k, v, keep, causal, d**-0.5, block),
                "gathered": partial(X.gathered, q, k, v, keep, None, causal, d**-0.5, block),
                "flex": partial(flex, q, k, v, keep, causal, d**-0.5, block),
            }
            t = alternate(fns, args.reps)
            for name, s in t.items():
                err = None if ref is None or name == "sdpa_dense" else float((fns[name]() - ref).abs().max())
                row = {
                    "tokens": n, "causal": causal, "density": density,
                    "kept": round(float(keep.sum() / allowed.expand_as(keep).sum()), 4), "form": name,
                    "seconds": round(s, 4), "speedup_vs_dense": round(t["sdpa_dense"] / s, 3),
                    "max_abs_error": err, "flex_first_call_s": round(first, 1) if name == "flex" else None,
                }  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows, {"heads": args.heads, "head_dim": d, "block": block}


def speed_png(rows: list[dict], path: Path) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return
    fig = Figure(figsize=(10, 4), layout="constrained")
    for ax, causal in zip(fig.subplots(1, 2), (False, True), strict=True):
        for n, h in sorted({(r["tokens"], r.get("heads", 8)) for r in rows}):
            pts = sorted(
                (r["kept"], r["speedup"])
                for r in rows
                if (r["tokens"], r.get("heads", 8)) == (n, h) and r["causal"] == causal
            )
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                "o-" if h == 8 else "s--",
                label=f"{n} tokens, {h} heads",
            )
        xs = [i / 100 for i in range(8, 101)]
        ax.plot(xs, [0.8 / x for x in xs], "k--", lw=0.8, label="goal 0.8 / density")
        ax.plot(xs, [1 / x for x in xs], "k:", lw=0.8, label="1 / density")
        ax.set_xlabel("kept fraction of the blocks")
        ax.set_ylabel("speed-up over SDPA (dense)")
        ax.set_yscale("log")
        ax.set_title(("causal" if causal else "bidirectional") + f", {machine()}")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


def main(argv=None):
    args = _args(argv)
    torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, load {os.getloadavg()}", flush=True)
    if "speed" in args.parts:
        part = "speed" + ("" if args.dtype == "float32" else f"-{args.dtype}")
        part += "" if args.threads == 2 else f"-threads{args.threads}"
        method = {"method": f"alternating, median of {args.reps} after a warm-up"}
        path = save_part(
            args.out,
            part,
            speed(args),
            method,
            key=lambda r: (r["tokens"], r["causal"], r["density"], r.get("heads", 8)),
        )
        rows = json.loads(path.read_text())["parts"][part]["rows"]
        speed_png(rows, path.with_name(f"{path.stem}-{part}.png"))
    if "forms" in args.parts:
        rows, extra = forms(args)
        save_part(args.out, "forms", rows, extra)
    if "minilm" in args.parts or "lm" in args.parts:
        run_quality = sibling("seer_quality").run_quality
        run_quality(args, save_part)


if __name__ == "__main__":
    main()
