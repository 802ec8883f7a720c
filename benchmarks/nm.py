"""N:M sparsity under Adam: dense vs nm_oneshot vs ASP vs SR-STE vs STEP, at 2:4 and 1:8 (CPU).

    python benchmarks/nm.py [--parts scratch finetune minilm size] [--seeds 0 1 2] [--ratios 2:4 1:8]
                            [--scratch-steps 1320] [--ft-steps 220] [--minilm-steps 120] [--threads 1]
    python benchmarks/nm.py --report          # table + PNGs from the JSON written so far

Parts (every run is one process-independent job; rows are merged into one JSON per machine/date):

* ``scratch`` — demo:vit-digits architecture from random weights (seeded), the same step budget for
  every method: dense (plain AdamW); ``nm_oneshot`` = the dense run pruned by magnitude, no retrain
  (the floor); ASP (half dense, half with the mask fixed); SR-STE; STEP (t_min = budget/10, t_max =
  budget/2, β2 = 0.99). Digits labels: cross-entropy. Test top-1 on the 450 test digits.
* ``finetune`` — the same methods from the trained demo:vit-digits weights, ``--ft-steps`` steps
  each (dense row: the trained model itself and a dense fine-tune of the same length).
* ``minilm`` — demo:minilm fine-tuned by distillation from its uncompressed self on the built-in
  train texts; mean embedding cosine / nearest-neighbour agreement on the test texts.
* ``size`` — model.safetensors bytes dense vs 2:4 (float), ONNX bytes dense vs 2:4 + W8A8, and the
  ONNX Runtime latency of the float 2:4 graph vs the dense one (alternating, one process).

Training settings (all methods): AdamW lr 1e-3 (scratch) / 1e-4 (fine-tune) / 5e-5 (MiniLM),
β = (0.9, 0.99), weight decay 0.05, cosine schedule with 5 % warm-up, batch 64 (MiniLM 16), one
torch thread. Output: ``benchmarks/results/nm-<machine>-<date>.json`` and, for every STEP run, a
PNG of the variance-change statistic with its switch step.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgecompress.bench.env import results_file  # noqa: E402
from edgecompress.calib import make_context  # noqa: E402
from edgecompress.data.metrics import evaluate  # noqa: E402
from edgecompress.data.specs import load_data, load_samples  # noqa: E402
from edgecompress.models.loading import load_model  # noqa: E402
from edgecompress.pipeline import run  # noqa: E402
from edgecompress.recipe import recipe_from_dict  # noqa: E402
from edgecompress.train import TrainConfig, default_loss, fit  # noqa: E402

METHODS = ("dense", "nm_oneshot", "asp", "sr_ste", "step")
OUT = ROOT / "benchmarks" / "results"


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["scratch", "finetune", "minilm", "size"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ratios", nargs="+", default=["2:4", "1:8"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--scratch-steps", type=int, default=1320, help="60 epochs of 22 steps")
    p.add_argument("--ft-steps", type=int, default=220, help="10 epochs")
    p.add_argument("--minilm-steps", type=int, default=120)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report", action="store_true", help="only print the table and draw the plots")
    p.add_argument("--out", type=Path, default=OUT)
    return p.parse_args(argv)


def _config(steps: int, lr: float, seed: int, batch: int = 64) -> TrainConfig:
    return TrainConfig(
        steps=steps, lr=lr, betas=(0.9, 0.99), weight_decay=0.05, warmup_steps=max(1, steps // 20),
        batch_size=batch, seed=seed, log_every=max(1, steps // 50),
    )  # fmt: skip


def _pass(method: str, ratio: str, steps: int, scratch: bool) -> dict:
    n, m = map(int, ratio.split(":"))
    entry = {"pass": method, "n": n, "m": m}
    if method != "nm_oneshot":
        entry["from_scratch"] = scratch
    if method == "step":
        entry.update(t_min=steps // 10, t_max=steps // 2)
    return entry


def _context(loaded, train_data, cfg: TrainConfig):
    calib = [next(iter(train_data)).inputs]
    return make_context(
        calib, loaded.call, torch.device("cpu"), kind=loaded.kind, data=lambda s: train_data, train=cfg
    )


def _dense(loaded, train_data, cfg: TrainConfig) -> dict:
    ctx = _context(loaded, train_data, cfg)
    fitted = fit(loaded.model, default_loss(None, ctx.call, loaded.kind), train_data, cfg, desc="dense")
    return {"final_loss": fitted.final_loss, "losses": fitted.losses, "seconds": round(fitted.seconds, 1)}


def _compressed(loaded, train_data, cfg: TrainConfig, entry: dict):
    ctx = _context(loaded, train_data, cfg)
    model, records = run(loaded.model, recipe_from_dict({"passes": [entry]}).passes, ctx)
    info = records[0]["info"]
    return model, {"seconds": records[0]["seconds"], **{k: info[k] for k in ("switch_step", "variance_change") if k in info},
                   **({"final_loss": info["training"]["final_loss"], "losses": info["training"]["losses"]} if "training" in info else {})}  # fmt: skip


def _digits_rows(part: str, args, seed: int) -> list[dict]:
    from edgecompress.models.demo import build_vit_digits

    scratch = part == "scratch"
    steps, lr = (args.scratch_steps, 1e-3) if scratch else (args.ft_steps, 1e-4)
    base = load_model("demo:vit-digits")
    train_data = load_samples("digits", base, "train", 0, 64)
    test = load_data("digits", base, "test", 0, 64)
    rows, dense_model = [], None
    if not scratch:
        rows.append(
            {"method": "trained (no fine-tune)", "ratio": "dense", **evaluate(base, base.model, test)[0]}
        )

    def fresh():
        loaded = load_model("demo:vit-digits")
        if scratch:
            torch.manual_seed(seed)
            loaded.model = build_vit_digits().train()
        return loaded

    for method in args.methods:
        for ratio in ["dense"] if method == "dense" else args.ratios:
            loaded, t0 = fresh(), time.perf_counter()
            cfg = _config(steps, lr, seed)
            if method == "dense":
                extra = _dense(loaded, train_data, cfg)
                dense_model = copy.deepcopy(loaded.model)
                model = loaded.model
            elif method == "nm_oneshot" and scratch:
                if dense_model is None:
                    continue  # the floor prunes the dense run of this seed
                loaded.model = copy.deepcopy(dense_model)
                model, extra = _compressed(loaded, train_data, cfg, _pass(method, ratio, steps, False))
            else:
                model, extra = _compressed(loaded, train_data, cfg, _pass(method, ratio, steps, scratch))
            metrics, _ = evaluate(loaded, model, test)
            rows.append(
                {
                    "method": method,
                    "ratio": ratio,
                    **metrics,
                    **extra,
                    "wall_s": round(time.perf_counter() - t0, 1),
                }
            )
            print(
                f"{part} seed {seed} {method} {ratio}: top1 {metrics['top1']} ({rows[-1]['wall_s']} s)",
                flush=True,
            )
    return [{"part": part, "seed": seed, "steps": steps, **r} for r in rows]


def _minilm_rows(args, seed: int) -> list[dict]:
    base = load_model("demo:minilm")
    test = load_data("text", base, "test", 0, 64)
    _, ref = evaluate(base, base.model, test)
    train_data = load_samples("text", base, "train", 0, 16)
    rows = []
    for method in [m for m in args.methods if m != "dense"]:
        for ratio in args.ratios:
            loaded, t0 = load_model("demo:minilm"), time.perf_counter()
            cfg = _config(args.minilm_steps, 5e-5, seed, batch=16)
            model, extra = _compressed(
                loaded, train_data, cfg, _pass(method, ratio, args.minilm_steps, False)
            )
            metrics, _ = evaluate(loaded, model, test, reference=ref)
            rows.append({"part": "minilm", "seed": seed, "steps": args.minilm_steps, "method": method, "ratio": ratio,
                         **metrics, **extra, "wall_s": round(time.perf_counter() - t0, 1)})  # fmt: skip
            print(
                f"minilm seed {seed} {method} {ratio}: cos {metrics['cosine_mean']} ({rows[-1]['wall_s']} s)",
                flush=True,
            )
    return rows


def _size_rows() -> list[dict]:
    from edgecompress.bench.timing import time_alternating
    from edgecompress.export.inputs import synthetic
    from edgecompress.export.onnx import export_onnx
    from edgecompress.export.runtime import ort_session
    from edgecompress.structure import save

    rows = []
    for spec in ("demo:vit-digits", "demo:minilm"):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            variants = {}
            for name, entries in (("dense", []), ("2:4", [{"pass": "nm_oneshot"}]),
                                  ("dense+W8A8", [{"pass": "uniform_ptq"}]),
                                  ("2:4+W8A8", [{"pass": "nm_oneshot"}, {"pass": "uniform_ptq"}])):  # fmt: skip
                loaded = load_model(spec)
                calib = load_data(None, loaded, "train", 32, 32).batches
                ctx = make_context(calib, loaded.call, torch.device("cpu"), kind=loaded.kind)
                if entries:
                    loaded.model, _ = run(loaded.model, recipe_from_dict({"passes": entries}).passes, ctx)
                folder = save(loaded.model, tmp / name.replace(":", "-").replace("+", "_"), {})
                onnx_path = export_onnx(loaded, folder / "model.onnx", batch=8).path
                variants[name] = (loaded, onnx_path, (folder / "model.safetensors").stat().st_size)
            feeds = {}
            for name in ("dense", "2:4"):
                loaded, path, _ = variants[name]
                sess = ort_session(path, threads=2, spinning=False)
                inputs = synthetic(loaded, 8, seq=128)
                feeds[name] = (sess, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)})
            names = list(feeds)
            stats = time_alternating(
                [lambda s=s, f=f: s.run(None, f) for s, f in feeds.values()], min_seconds=3.0
            )
            lat = dict(zip(names, stats))
            for name, (_, path, st_bytes) in variants.items():
                rows.append({"part": "size", "model": spec, "variant": name, "safetensors_bytes": st_bytes,
                             "onnx_bytes": path.stat().st_size,
                             "ort_median_ms": lat[name]["median_ms"] if name in lat else None})  # fmt: skip
            print(
                f"size {spec}: {[(r['variant'], r['safetensors_bytes'], r.get('ort_median_ms')) for r in rows[-4:]]}",
                flush=True,
            )
    return rows


def _summary(rows: list[dict]) -> list[dict]:
    """Mean ± std over seeds per (part, method, ratio)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["part"] != "size":
            groups.setdefault((r["part"], r["method"], r["ratio"]), []).append(r)
    out = []
    for (part, method, ratio), rs in groups.items():
        key = "top1" if part != "minilm" else "cosine_mean"
        vals = [r[key] for r in rs if r.get(key) is not None]
        row = {"part": part, "method": method, "ratio": ratio, "metric": key, "seeds": len(vals),
               "mean": round(statistics.mean(vals), 3) if vals else None,
               "std": round(statistics.stdev(vals), 3) if len(vals) > 1 else 0.0}  # fmt: skip
        if part == "minilm":
            nn = [r["nn_agreement"] for r in rs]
            row["nn_agreement_mean"] = round(statistics.mean(nn), 2)
        switches = [r["switch_step"] for r in rs if r.get("switch_step") is not None]
        if switches:
            row["switch_steps"] = switches
        out.append(row)
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| part | method | N:M | metric | mean ± std (seeds) | STEP switch steps |",
        "|---|---|---|---|---|---|",
    ]
    for r in _summary(rows):
        extra = f" (NN {r['nn_agreement_mean']} %)" if "nn_agreement_mean" in r else ""
        lines.append(f"| {r['part']} | {r['method']} | {r['ratio']} | {r['metric']} | {r['mean']} ± {r['std']} "
                     f"({r['seeds']}){extra} | {r.get('switch_steps', '')} |")  # fmt: skip
    for r in rows:
        if r["part"] == "size":
            lines.append(f"| size | {r['model']} | {r['variant']} | safetensors / ONNX bytes | "
                         f"{r['safetensors_bytes']} / {r['onnx_bytes']} | ORT ms {r['ort_median_ms']} |")  # fmt: skip
    return "\n".join(lines)


def plots(rows: list[dict], out: Path, tag: str) -> list[str]:
    """One PNG per (part, ratio): the variance-change statistic of every STEP seed, switch marked."""
    try:
        import matplotlib
    except ImportError:
        print("no PNGs: matplotlib is not installed (pip install -e '.[bench]')", file=sys.stderr)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    keys = sorted({(r["part"], r["ratio"]) for r in rows if r.get("variance_change")})
    for part, ratio in keys:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for r in rows:
            if r["part"] == part and r["ratio"] == ratio and r.get("variance_change"):
                steps, z = zip(*r["variance_change"])
                (line,) = ax.semilogy(steps, z, lw=0.8, label=f"seed {r['seed']}")
                ax.axvline(r["switch_step"], color=line.get_color(), ls="--", lw=0.8)
        ax.set(xlabel="step", ylabel="mean|Δv| / mean v", title=f"STEP AutoSwitch, {part} {ratio} ({tag})")
        ax.legend(fontsize=7)
        path = out / f"nm-step-variance-{part}-{ratio.replace(':', 'of')}-{tag}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path.name)
    return files


def _key(r: dict) -> tuple:
    return r["part"], r.get("seed"), r.get("method", r.get("variant")), r.get("ratio"), r.get("model")


def main(argv=None) -> int:
    args = _args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    path, data, meta = results_file(args.out, "nm", args.threads)
    tag = path.stem.removeprefix("nm-")
    if not args.report:
        data["runs"].append({**meta, "args": {k: str(v) for k, v in vars(args).items()}})
        for part in args.parts:
            for seed in args.seeds if part != "size" else [None]:
                if part in ("scratch", "finetune"):
                    new = _digits_rows(part, args, seed)
                elif part == "minilm":
                    new = _minilm_rows(args, seed)
                else:
                    new = _size_rows()
                mine = {_key(r) for r in new}
                data["rows"] = [r for r in data["rows"] if _key(r) not in mine] + new
                path.write_text(json.dumps(data, indent=1))  # partial results survive an interruption
    data["summary"] = _summary(data["rows"])
    data["plots"] = plots(data["rows"], args.out, tag)
    path.write_text(json.dumps(data, indent=1))
    print(table(data["rows"]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
