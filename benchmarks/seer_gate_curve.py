"""Held-out KL of demo:minilm's AttnGates against training steps and lr, trained from the gate-input
cache (:mod:`edgecompress.sparsity.seer.cache`); untimed quality (run it with ``nice -n 19``).

    python benchmarks/seer_gate_curve.py --block 32 [--stride 64] [--runs LR:STEPS[:WD] ...] [--every 100]

Data as ``benchmarks/seer.py --parts minilm``: the built-in texts' first half (train) as 512-token
windows starting every ``--stride`` tokens (overlapping: the train half holds ~23 disjoint windows),
the second half (test) as disjoint windows. The caches of both are built once; each run
(``lr:steps[:weight_decay]``) starts from the gates' initialisation and trains through
:func:`edgecompress.train.fit` (AdamW, batch 8, cosine schedule after a 5 % warm-up, as the pass)
and logs the held-out KL (test windows) and the training KL every ``--every`` steps. Rows go to
part ``gate-curve-block<B>`` of ``benchmarks/results/seer-<machine>-<date>.json``, a PNG beside it.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

from edgecompress.calib import make_context  # noqa: E402
from edgecompress.data.samples import SampleSet  # noqa: E402
from edgecompress.models.loading import load_model  # noqa: E402
from edgecompress.sparsity.seer.cache import CachedObjective, build_cache, cached_kl  # noqa: E402
from edgecompress.sparsity.seer.passes import SeerAttention, find_sites  # noqa: E402
from edgecompress.train import TrainConfig, fit  # noqa: E402


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--stride", type=int, default=64)
    p.add_argument("--runs", nargs="+", default=["1e-3:2000", "3e-3:2000", "1e-2:2000"])
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--thread-check", action="store_true", help="only time cached steps on 1 vs 2 threads")
    p.add_argument("--png-only", action="store_true", help="redraw the PNG from the results file")
    p.add_argument("--label", default="locked", help="thread check: part gate-steps-threads-LABEL")
    p.add_argument(
        "--cache-dir", type=Path, default=None, help="keep the caches here (safetensors) for reruns"
    )
    return p.parse_args(argv)


def minilm_data(block: int, stride: int):
    """demo:minilm, its train windows (every ``stride`` tokens) and test windows, as seer_quality builds them."""
    from transformers import AutoTokenizer

    SQ = sibling("seer_quality")
    loaded = load_model("demo:minilm")
    tok = AutoTokenizer.from_pretrained(loaded.tokenizer_dir, local_files_only=True)
    specials = (tok.cls_token_id, tok.sep_token_id)
    train = SQ.windows(SQ.token_stream(tok, "train"), 512, 10**6, *specials, stride=stride)
    test = SQ.windows(SQ.token_stream(tok, "test"), 512, 32, *specials)
    return loaded, train, test


def installed(loaded, block: int, example: dict):
    """A copy of the model with SeerAttention cores (untrained gates) and the cores."""
    model = copy.deepcopy(loaded.model).eval()
    ctx = make_context(
        [{k: v[:1] for k, v in example.items()}], loaded.call, torch.device("cpu"), kind=loaded.kind
    )
    seer = SeerAttention(block=block)
    cores = list(seer._install(model, find_sites(model, ctx, seer.targets, seer.ignore)).values())
    return model, cores, ctx.call


def main(argv=None):
    args = _args(argv)
    if args.png_only:  # redraw from the results file
        seer = sibling("seer")
        path = seer.result_path(args.out)
        rows = json.loads(path.read_text())["parts"][f"gate-curve-block{args.block}"]["rows"]
        return _png(rows, path.with_name(f"{path.stem}-gate-curve-block{args.block}.png"), args.block)
    torch.set_num_threads(2)
    loaded, train, test = minilm_data(args.block, args.stride)
    model, cores, call = installed(loaded, args.block, test)
    t0 = time.perf_counter()
    caches = {s: stored_cache(args, s, model, cores, d, call) for s, d in (("train", train), ("test", test))}
    built = round(time.perf_counter() - t0, 1)
    if args.thread_check:
        rows = thread_check(args, cores, caches["train"])
        print(json.dumps(rows), flush=True)
        sibling("seer").save_part(
            args.out, f"gate-steps-threads-{args.label}", rows, {"method": "alternating, 200 steps each"}
        )
        return
    torch.set_num_threads(1)  # tiny ops: a second thread only waits on a loaded machine (see thread_check)
    size = {s: sum(v.numel() * 4 for v in c.inputs.values()) for s, c in caches.items()}
    print(f"caches built in {built} s: {size} bytes, {len(caches['train'])} train windows", flush=True)
    probe = SampleSet(caches["train"].batch(slice(0, len(caches["test"]))).inputs, None, args.batch)
    rows = []
    for run in args.runs:
        lr, steps, wd = (*(float(x) for x in run.split(":")), 0.0)[:3]
        steps = int(steps)
        for c in cores:
            c.gate.reset_parameters()
        curve = [(0, cached_kl(cores, caches["test"], 0.25), cached_kl(cores, probe, 0.25))]

        def log(step, _m, _o, _loss, curve=curve, lr=lr):
            if step % args.every == 0:
                curve.append((step, cached_kl(cores, caches["test"], 0.25), cached_kl(cores, probe, 0.25)))
                print(
                    f"lr {lr:g} step {step}: held-out {curve[-1][1]:.4f}, train {curve[-1][2]:.4f}",
                    flush=True,
                )

        cfg = TrainConfig(
            steps=steps, lr=lr, batch_size=args.batch, warmup_steps=max(1, steps // 20), log_every=10**9
        )
        torch.manual_seed(0)
        t = time.perf_counter()
        fit(CachedObjective(cores, 0.25), lambda m, b: m(b.inputs), caches["train"], cfg,
            params=[p for c in cores for p in c.gate.parameters()], callback=log, desc=f"lr {lr}")  # fmt: skip
        row = {
            "block": args.block, "lr": lr, "steps": steps, "weight_decay": wd, "seconds": round(time.perf_counter() - t, 1),
            "kl_held_out": round(curve[-1][1], 4), "kl_train": round(curve[-1][2], 4),
            "best_held_out": round(min(c[1] for c in curve), 4),
            "best_step": min(curve, key=lambda c: c[1])[0],
            "curve": [[s, round(h, 4), round(tr, 4)] for s, h, tr in curve],
        }  # fmt: skip
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
    extra = {"train_windows": len(caches["train"]), "test_windows": len(caches["test"]), "stride": args.stride,
             "cache_bytes": size, "cache_build_s": built, "cache_dir": str(args.cache_dir), "batch": args.batch, "tokens": 512}  # fmt: skip
    seer = sibling("seer")
    path = seer.save_part(args.out, f"gate-curve-block{args.block}", rows, extra)
    _png(rows, path.with_name(f"{path.stem}-gate-curve-block{args.block}.png"), args.block)


def thread_check(args, cores, cache, reps: int = 3, steps: int = 200) -> list[dict]:
    """Cached steps per second on 1 and 2 threads, alternated ``reps`` times (timed: run under the lock)."""
    times: dict[int, list[float]] = {1: [], 2: []}
    params = [p for c in cores for p in c.gate.parameters()]
    cfg = TrainConfig(steps=steps, lr=1e-3, batch_size=args.batch, log_every=10**9)
    for _ in range(reps):
        for threads in times:
            torch.set_num_threads(threads)
            t = time.perf_counter()
            fit(CachedObjective(cores, 0.25), lambda m, b: m(b.inputs), cache, cfg, params=params, desc="t")
            times[threads].append(steps / (time.perf_counter() - t))
    return [{"threads": k, "steps_per_s": [round(x, 1) for x in v], "batch": args.batch, "block": args.block}
            for k, v in times.items()]  # fmt: skip


def stored_cache(args, split: str, model, cores, data: dict, call) -> SampleSet:
    """The cache of ``data``, read from / written to ``--cache-dir`` (safetensors) when that is set
    (``cache_build_s`` is then the time to read it)."""
    from safetensors.torch import load_file, save_file

    path = None
    if args.cache_dir is not None:
        path = args.cache_dir / f"seer-minilm-block{args.block}-stride{args.stride}-{split}.safetensors"
        if path.is_file():
            return SampleSet(load_file(str(path)), None, args.batch)
    cache = build_cache(model, cores, SampleSet(data, None, args.batch), call, args.batch)[0]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in cache.inputs.items()}, str(path))
    return cache


def _png(rows, path: Path, block: int) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for r in rows:
        s = [c[0] for c in r["curve"]]
        (line,) = ax.plot(
            s,
            [c[1] for c in r["curve"]],
            label=f"lr {r['lr']:g}, wd {r['weight_decay']:g}, {r['steps']} steps: held-out",
        )
        ax.plot(s, [c[2] for c in r["curve"]], ls=":", color=line.get_color(), label="train windows")
    ax.set_xlabel("step (batch 8)")
    ax.set_ylabel("KL(truth ‖ gate), summed over 6 layers")
    ax.set_yscale("log")
    ax.set_title(f"demo:minilm AttnGates, block {block}, 512 tokens")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


def sibling(name: str):
    """A module of this folder (``benchmarks.seer`` loads the others by path: the folder is kept off sys.path)."""
    import importlib

    return importlib.import_module("benchmarks.seer").sibling(name)


if __name__ == "__main__":
    main()
