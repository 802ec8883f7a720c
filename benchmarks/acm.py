"""Adaptive Computation Modules: quality against executed compute, and the CPU form's speed (CPU).

    python benchmarks/acm.py [--parts quality speed model] [--models vit-digits minilm]
                             [--budgets 1.0 0.75 0.5 0.25] [--threads 2]
    python benchmarks/acm.py --report        # table + PNG from the JSON written so far

Parts (rows are merged into one JSON per machine and date, written after every row):

* ``quality`` — per model and budget β: the ``acm`` pass (4 learners; phase I ``distill`` steps,
  phase II ``gate`` steps, phase III ``e2e`` steps, the shipped recipe's learning rates) against two
  static baselines at the same mean executed compute (β of the MLP hidden units):
  ``fixed-k`` (the same ACM, phases I and III, every token runs k = 4β learners: no gate) and
  ``magnitude`` (the dense MLP's hidden channels pruned by ‖W1[j]‖·‖W2[:, j]‖ to β of them, masked,
  then fine-tuned end to end for ``distill + e2e`` steps) and ``pruned`` (the MLPs really narrowed to
  β of their channels by the ``prune_structured`` pass — uniform, activation importance,
  least-squares recovery — then fine-tuned the same way; its executed fraction is the kept share of
  channels after rounding). ``dense-ft`` is the dense model fine-tuned
  end to end for the same steps (the same training, no compression). vit-digits: top-1 on the 450
  test digits, cross-entropy on the train digits; MiniLM: mean embedding cosine and nearest-neighbour
  agreement to the uncompressed model on the test texts, distillation on the train texts. The ACM
  rows record the executed fraction the gates really chose on the test data. The trained β = 0.5
  models are saved (``--cache``) for the ``model`` part.
* ``speed`` — one MLP (ViT-S 384→1536→384, ViT-B 768→3072→768, GELU, 4 learners), 4k-64k tokens,
  fp32 and bf16: the bucketed CPU form (:func:`edgecompress.sparsity.acm.execute.bucketed`) at mean
  executed fractions 0.25/0.5/0.75/1.0 (per-token k ~ Binomial(4, f): every k occurs) against the
  dense MLP, alternated in one run (:func:`edgecompress.bench.timing.time_alternating`); the ratio
  to dense and the goal ≤ 1.2·f (≤ 1.1 at f = 1.0).
* ``model`` — the saved β = 0.5 ACM models against their dense models, alternated: PyTorch eager
  (the bucketed form) and ONNX Runtime (the exported graph that skips work vs the dense export).

The Triton kernel (CUDA) is not measured here: no GPU on this machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgecompress.bench.env import results_file  # noqa: E402
from edgecompress.bench.timing import time_alternating  # noqa: E402
from edgecompress.calib import make_context  # noqa: E402
from edgecompress.data.metrics import evaluate  # noqa: E402
from edgecompress.data.specs import load_data, load_samples  # noqa: E402
from edgecompress.models.loading import load_model, restore  # noqa: E402
from edgecompress.pipeline import run  # noqa: E402
from edgecompress.recipe import recipe_from_dict  # noqa: E402
from edgecompress.sparsity.acm import ACM  # noqa: E402
from edgecompress.sparsity.acm.execute import bucketed  # noqa: E402
from edgecompress.sparsity.acm.sites import find_sites  # noqa: E402
from edgecompress.structure import save  # noqa: E402
from edgecompress.train import TrainConfig, default_loss, fit  # noqa: E402

OUT = ROOT / "benchmarks" / "results"
SPECS = {"vit-digits": "demo:vit-digits", "minilm": "demo:minilm"}
# per model: steps of phase I / II / III, batch size, phase III learning rate, bf16 autocast
SETTINGS = {
    "vit-digits": {"distill": 200, "gate": 100, "e2e": 300, "batch": 64, "lr": 2e-4, "bf16": False},
    "minilm": {"distill": 100, "gate": 50, "e2e": 150, "batch": 16, "lr": 5e-5, "bf16": True},
}


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["quality", "speed", "model"])
    p.add_argument("--models", nargs="+", default=list(SPECS), choices=list(SPECS))
    p.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25])
    p.add_argument("--variants", nargs="+", default=["acm", "fixed-k", "pruned", "magnitude", "dense-ft"])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-scale", type=float, default=1.0, help="multiply every step count (smoke runs)")
    p.add_argument("--report", action="store_true", help="only print the table and draw the plot")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--cache", type=Path, default=Path("/tmp/edgecompress-acm-bench"))
    return p.parse_args(argv)


# ---- quality ----------------------------------------------------------------------------------------


def _data(name: str, loaded, batch: int):
    train = load_samples(None, loaded, "train", 0, batch)
    test = load_data(None, loaded, "test", 0, 64)
    return train, test


def _config(s: dict, steps: int, lr: float, seed: int) -> TrainConfig:
    return TrainConfig(steps=steps, lr=lr, batch_size=s["batch"], warmup_steps=max(1, steps // 15),
                       seed=seed, bf16=s["bf16"], log_every=max(1, steps // 20))  # fmt: skip


def _context(loaded, train, cfg):
    calib = [next(iter(train)).inputs]
    return make_context(
        calib, loaded.call, torch.device("cpu"), kind=loaded.kind, data=lambda s: train, train=cfg
    )


def _acm(loaded, train, s, budget: float, fixed: bool, seed: int):
    entry = {"pass": "acm", "n_learners": 4, "budget": budget, "distill_steps": s["distill"],
             "gate_steps": 0 if fixed else s["gate"]}  # fmt: skip
    if fixed:
        entry["fixed_k"] = round(4 * budget)
    cfg = _config(s, s["e2e"], s["lr"], seed)
    model, records = run(
        loaded.model, recipe_from_dict({"passes": [entry]}).passes, _context(loaded, train, cfg)
    )
    info = records[0]["info"]
    return model, {
        "train_s": records[0]["seconds"],
        "final_loss": info["training"]["end_to_end"]["final_loss"],
        "gumbel_tau": ACM.gumbel_tau,  # the pass default (1.0 in rows written before the field existed)
    }


@torch.no_grad()
def _magnitude_masks(model, budget: float) -> list:
    """Zero all but the ``budget`` share of each MLP's hidden channels (by ‖W1[j]‖·‖W2[:, j]‖);
    returns gradient hooks keeping them zero."""
    hooks = []
    for site in find_sites(model):
        score = site.fc1.weight.norm(dim=1) * site.fc2.weight.norm(dim=0)
        if site.up is not None:
            score = score * site.up.weight.norm(dim=1)
        keep = torch.zeros_like(score, dtype=torch.bool)
        keep[score.argsort(descending=True)[: round(budget * len(score))]] = True
        for lin, dim in ((site.fc1, 0), (site.fc2, 1)) + (((site.up, 0),) if site.up is not None else ()):
            shape = [1, 1]
            shape[dim] = -1
            m = keep.view(shape).to(lin.weight.dtype)
            lin.weight.mul_(m)
            hooks.append(lin.weight.register_hook(lambda g, m=m: g * m))
            if dim == 0 and lin.bias is not None:
                lin.bias.mul_(keep.to(lin.bias.dtype))
                hooks.append(lin.bias.register_hook(lambda g, k=keep: g * k.to(g.dtype)))
    return hooks


def _finetune(loaded, train, s, budget: float | None, seed: int, how: str = "magnitude"):
    """``dense-ft`` (budget None), ``magnitude`` or ``pruned``: end-to-end training of ``distill + e2e``
    steps (``pruned``: after ``prune_structured`` shrank the MLPs to β of their channels)."""
    teacher = copy.deepcopy(loaded.model).eval()
    cfg = _config(s, s["distill"] + s["e2e"], s["lr"], seed)
    ctx = _context(loaded, train, cfg)
    t0 = time.perf_counter()
    hooks, executed = [], None
    if budget is not None and how == "magnitude":
        hooks = _magnitude_masks(loaded.model, budget)
    elif budget is not None:
        widths = [site.fc1.out_features for site in find_sites(loaded.model)]
        entry = {"pass": "prune_structured", "granularity": ["mlp"], "allocation": "uniform",
                 "importance": "activation", "recovery": "lstsq", "budget": {"params": 1.0 - budget}}  # fmt: skip
        loaded.model, _ = run(loaded.model, recipe_from_dict({"passes": [entry]}).passes, ctx)
        kept = [site.fc1.out_features for site in find_sites(loaded.model)]
        executed = round(sum(kept) / sum(widths), 4)
    fitted = fit(loaded.model, default_loss(teacher, ctx.call, loaded.kind), train, cfg, desc="fine-tune")
    for h in hooks:
        h.remove()
    extra = {"train_s": round(time.perf_counter() - t0, 1), "final_loss": fitted.final_loss}
    return loaded.model, extra | ({"kept_channels": executed} if executed is not None else {})


def _executed(model, loaded, test) -> float | None:
    from edgecompress.sparsity.acm.report import recording, summarise

    with torch.no_grad(), recording(model) as acms:
        if not acms:
            return None
        evaluate(loaded, model, test)
        return summarise(acms)["mean_fraction"]


def quality_rows(name: str, args) -> list[dict]:
    s = {k: max(1, round(v * args.step_scale)) if k in ("distill", "gate", "e2e") else v
         for k, v in SETTINGS[name].items()}  # fmt: skip
    base = load_model(SPECS[name])
    train, test = _data(name, base, s["batch"])
    ref_metrics, ref = evaluate(base, base.model, test)
    yield {
        "part": "quality",
        "model": name,
        "variant": "dense",
        "budget": 1.0,
        "executed": 1.0,
        **ref_metrics,
    }
    for variant in args.variants:
        for budget in [None] if variant == "dense-ft" else args.budgets:
            torch.manual_seed(args.seed)
            loaded, t0 = load_model(SPECS[name]), time.perf_counter()
            if variant in ("acm", "fixed-k"):
                model, extra = _acm(loaded, train, s, budget, variant == "fixed-k", args.seed)
            elif variant == "pruned" and budget == 1.0:
                continue  # nothing to prune: the dense-ft row
            else:
                model, extra = _finetune(
                    loaded, train, s, None if variant == "dense-ft" else budget, args.seed, how=variant
                )
            metrics, _ = evaluate(loaded, model, test, reference=None if loaded.kind == "image" else ref)
            executed = (
                _executed(model, loaded, test)
                if variant == "acm"
                else extra.get("kept_channels", budget or 1.0)
            )
            if variant == "acm" and budget == 0.5:
                shutil.rmtree(args.cache / f"{name}-acm-0.5", ignore_errors=True)
                save(model.eval(), args.cache / f"{name}-acm-0.5", {})
            row = {"part": "quality", "model": name, "variant": variant, "budget": budget or 1.0,
                   "executed": executed, **metrics, **extra, "wall_s": round(time.perf_counter() - t0, 1),
                   "steps": {k: s[k] for k in ("distill", "gate", "e2e")}}  # fmt: skip
            print(
                f"{name} {variant} β={budget}: {_metric(row)} executed {executed} ({row['wall_s']} s)",
                flush=True,
            )
            yield row


def _metric(r: dict) -> str:
    if "top1" in r:
        return f"top-1 {r['top1']}"
    if "cosine_mean" in r:
        return f"cos {r['cosine_mean']:.4f} NN {r['nn_agreement']}"
    return "reference"


# ---- speed --------------------------------------------------------------------------------------------


def speed_rows(args) -> list[dict]:
    gen = torch.Generator().manual_seed(args.seed)
    for d, hidden in ((384, 1536), (768, 3072)):
        for tokens in args.tokens:
            for dtype in (torch.float32, torch.bfloat16):
                yield from _speed_point(d, hidden, tokens, dtype, gen)


def _speed_point(d: int, hidden: int, tokens: int, dtype: torch.dtype, gen) -> list[dict]:
    x = torch.randn(tokens, d, generator=gen).to(dtype)
    w1 = (torch.randn(hidden, d, generator=gen) * d**-0.5).to(dtype)
    b1 = (torch.randn(hidden, generator=gen) * 0.1).to(dtype)
    w2 = (torch.randn(d, hidden, generator=gen) * hidden**-0.5).to(dtype)
    fractions = (0.25, 0.5, 0.75, 1.0)
    ks = [torch.distributions.Binomial(4, torch.full((tokens,), f)).sample().long() for f in fractions]
    fns = [lambda: F.linear(F.gelu(F.linear(x, w1, b1)), w2)]
    fns += [lambda k=k: bucketed(x, k, w1, b1, w2, 4) for k in ks]
    big = tokens * d * hidden >= 2**34  # 64k tokens at ViT-B: seconds per call
    with torch.no_grad():
        stats = time_alternating(fns, min_seconds=2 if big else 3, min_iters=3 if big else 10,
                                 warmup_s=0.5, max_seconds=120)  # fmt: skip
    dense = stats[0]["median_ms"]
    for f, k, st in zip(fractions, ks, stats[1:]):
        real = float(k.float().mean()) / 4
        ratio = st["median_ms"] / dense
        goal = 1.1 if f == 1.0 else 1.2 * real
        row = {"part": "speed", "width": f"{d}->{hidden}", "tokens": tokens, "dtype": str(dtype)[6:],
               "fraction": round(real, 4), "dense_ms": dense, "acm_ms": st["median_ms"],
               "ratio": round(ratio, 3), "goal": round(goal, 3), "met": ratio <= goal,
               "cv": [stats[0]["cv"], st["cv"]]}  # fmt: skip
        print(f"{d}->{hidden} {tokens} {row['dtype']} f={real:.3f}: {ratio:.3f}x dense "
              f"(goal {goal:.2f}) dense {dense:.1f} ms", flush=True)  # fmt: skip
        yield row


# ---- whole model --------------------------------------------------------------------------------------

BATCHES = {"vit-digits": (8, 256), "minilm": (8, 64)}


def model_rows(name: str, args) -> list[dict]:
    from edgecompress.export.inputs import as_batch, synthetic
    from edgecompress.export.onnx import export_onnx
    from edgecompress.export.runtime import ort_session
    from edgecompress.models.loading import LoadedModel

    folder = args.cache / f"{name}-acm-0.5"
    if not (folder / "structure.json").is_file():
        print(f"model {name}: no trained ACM in {folder} (run --parts quality first)", flush=True)
        return
    dense = load_model(SPECS[name])
    acm = LoadedModel(
        restore(folder).eval(), dense.spec, dense.kind, dense.base, dense.data_cfg, dense.tokenizer_dir
    )
    for batch in BATCHES[name]:
        inputs = synthetic(dense, batch, seq=128)
        x = as_batch(dense, inputs)
        fns = [lambda m=m, x=x: m.call(m.model, x) for m in (dense, acm)]
        with torch.no_grad():
            eager = time_alternating(fns, min_seconds=3, min_iters=10, warmup_s=1)
        with tempfile.TemporaryDirectory() as tmp:
            paths = [
                export_onnx(m, Path(tmp) / f"{i}.onnx", batch=batch).path for i, m in enumerate((dense, acm))
            ]
            sessions = [ort_session(p, threads=args.threads, spinning=False) for p in paths]
            feeds = [{i.name: t.numpy() for i, t in zip(s.get_inputs(), inputs)} for s in sessions]
            ort = time_alternating([lambda s=s, f=f: s.run(None, f) for s, f in zip(sessions, feeds)],
                                   min_seconds=3, min_iters=10, warmup_s=1)  # fmt: skip
        for runtime, (d, a) in (("pytorch", eager), ("onnxruntime", ort)):
            row = {"part": "model", "model": name, "batch": batch, "runtime": runtime, "dense_ms": d["median_ms"],
                   "acm_ms": a["median_ms"], "ratio": round(a["median_ms"] / d["median_ms"], 3), "cv": [d["cv"], a["cv"]]}  # fmt: skip
            print(
                f"model {name} b{batch} {runtime}: ACM β=0.5 {row['ratio']}x dense ({d['median_ms']} ms)",
                flush=True,
            )
            yield row


# ---- output ---------------------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    lines = ["| model | variant | budget | executed | metric |", "|---|---|---|---|---|"]
    for r in (r for r in rows if r["part"] == "quality"):
        ex = "" if r.get("executed") is None else f"{r['executed']:.3f}"
        lines.append(f"| {r['model']} | {r['variant']} | {r['budget']} | {ex} | {_metric(r)} |")
    lines += [
        "",
        "| MLP | tokens | dtype | fraction | ACM / dense | goal | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in rows if r["part"] == "speed"):
        lines.append(f"| {r['width']} | {r['tokens']} | {r['dtype']} | {r['fraction']} | {r['ratio']} | "
                     f"≤ {r['goal']} | {'yes' if r['met'] else 'no'} |")  # fmt: skip
    lines += [
        "",
        "| model | batch | runtime | dense ms | ACM β=0.5 ms | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in (r for r in rows if r["part"] == "model"):
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['runtime']} | {r['dense_ms']} | {r['acm_ms']} | {r['ratio']} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], out: Path, tag: str) -> str | None:
    """Quality against executed compute, one panel per model, one line per variant."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = sorted({r["model"] for r in rows if r["part"] == "quality"})
    if not models:
        return None
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models):
        key = "top1" if name == "vit-digits" else "cosine_mean"
        for variant in ("acm", "fixed-k", "pruned", "magnitude", "dense-ft", "dense"):
            pts = sorted((r["executed"], r[key]) for r in rows if r["part"] == "quality" and r["model"] == name
                         and r["variant"] == variant and r.get(key) is not None and r.get("executed") is not None)  # fmt: skip
            if pts:
                ax.plot(*zip(*pts), marker="o", linestyle="-" if len(pts) > 1 else "", label=variant)
        ax.set(title=name, xlabel="executed fraction of the MLP compute", ylabel=key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"ACM vs static baselines at equal compute ({tag})")
    path = out / f"acm-quality-{tag}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path.name


def _key(r: dict) -> tuple:
    return tuple(r.get(k) for k in ("part", "model", "variant", "budget", "width", "tokens", "dtype", "fraction",
                                    "batch", "runtime"))  # fmt: skip


def main(argv=None) -> int:
    args = _args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    path, data, meta = results_file(args.out, "acm", args.threads)
    tag = path.stem.removeprefix("acm-")
    if not args.report:
        data["runs"].append(meta)
        for part in args.parts:
            gens = {"quality": lambda: (r for m in args.models for r in quality_rows(m, args)),
                    "speed": lambda: speed_rows(args),
                    "model": lambda: (r for m in args.models for r in model_rows(m, args))}  # fmt: skip
            for row in gens[part]():
                row["loadavg"] = os.getloadavg()[0]
                data["rows"] = [r for r in data["rows"] if _key(r) != _key(row)] + [row]
                path.write_text(json.dumps(data, indent=1))  # partial results survive an interruption
    data["plot"] = plot(data["rows"], args.out, tag)
    path.write_text(json.dumps(data, indent=1))
    print(table(data["rows"]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
