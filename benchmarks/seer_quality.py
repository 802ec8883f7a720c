"""Quality parts of ``benchmarks/seer.py``: trained AttnGates against static, oracle and random block
choices at equal per-row budgets, on demo:minilm (512 tokens) and a small Llama-style LM (1-2k tokens).

Every method goes through the same :class:`~edgecompress.sparsity.seer.core.SeerAttentionCore`: only
the scores fed to the block selection differ (``choose`` is replaced on the instance), so budgets,
forced blocks and execution are identical:

* ``seer`` — the trained gate;
* ``static`` — local + global: minus the block distance (nearest blocks first, earlier on ties), the
  first block forced as for every method;
* ``oracle`` — the true pooled attention probabilities of this input (the gate's training target,
  the block-max);
* ``oracle_mass`` — the true attention mass of each block (the sum of its probabilities): at a
  per-row budget no choice keeps more of the softmax;
* ``random`` — seeded random scores.

Beyond the per-row budget (the ``density`` rule), rows whose budget varies per row and head:

* ``seer`` at ``threshold`` t (the paper's inference rule: blocks whose gate probability exceeds t);
* ``cover`` at mass m — the oracle with a variable budget: per row the fewest blocks holding a
  fraction m of the true attention mass (the diagnosis of 2026-12-06: at equal kept fractions it
  beats every per-row top-k, which the fixed budget, not the block choice, limits);
* ``gate_cover`` at mass m — the same rule on the trained gate's probabilities (not the paper's
  rule: a measurement of how much of the oracle's variable budget the gate can reach).
"""

from __future__ import annotations

import copy
import json
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from edgecompress.calib import make_context
from edgecompress.data.metrics import evaluate
from edgecompress.data.samples import SampleSet
from edgecompress.data.specs import Batches
from edgecompress.data.text import builtin_texts
from edgecompress.models.attention import adapters
from edgecompress.models.loading import load_model
from edgecompress.pipeline import run
from edgecompress.recipe import recipe_from_dict
from edgecompress.sparsity.seer import execute as X
from edgecompress.sparsity.seer.masks import forced_blocks, select_blocks
from edgecompress.sparsity.seer.report import density_table, recording
from edgecompress.train import TrainConfig

METHODS = ("seer", "static", "oracle", "oracle_mass", "random")
DENSITIES = (0.5, 0.3, 0.1)
THRESHOLDS = (0.03, 0.05, 0.08, 0.12)  # gate probabilities over 16 key blocks (uniform: 0.0625)
COVERS = (0.8, 0.85, 0.9)


def _block_mass(core, q, k, valid) -> torch.Tensor:
    """``[B, H, nb, nb]`` the true softmax mass of each (query block, key block) tile (GQA-shared K)."""
    group = q.shape[1] // k.shape[1]
    s = (q.float() @ k.repeat_interleave(group, dim=1).float().transpose(-1, -2)) * core.gate.head_dim**-0.5
    n = q.shape[2]
    if core.causal:
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    if valid is not None:
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = s.softmax(-1).nan_to_num(nan=0.0)
    nb = -(-n // core.block)
    pad = nb * core.block - n
    return F.pad(p, (0, pad, 0, pad)).view(*p.shape[:2], nb, core.block, nb, core.block).sum(dim=(3, 5))


def _scores(core, method: str, q, k, valid, positions):
    nb = -(-q.shape[2] // core.block)
    if method == "static":
        i = torch.arange(nb, dtype=torch.float32)
        return -(i[:, None] - i[None, :]).abs() - 1e-3 * i[None, :]
    if method == "random":
        return torch.randn(q.shape[0], q.shape[1], nb, nb, generator=torch.Generator().manual_seed(nb))
    if method == "oracle_mass":
        return _block_mass(core, q, k, valid)
    _, truth = X.pooled_truth(q, k, k, None, core.causal, core.gate.head_dim**-0.5, core.block, valid)
    return truth.clamp(min=1e-30).log()


def _cover(mass: torch.Tensor, allowed, forced, share: float) -> torch.Tensor:
    """Per row the fewest blocks holding ``share`` of its mass, plus the forced ones."""
    m = mass / mass.sum(-1, keepdim=True).clamp(min=1e-30)
    order = m.sort(-1, descending=True)
    need = (order.values.cumsum(-1) - order.values) < share
    return (torch.zeros_like(need).scatter(-1, order.indices, need) | forced) & allowed


def use_method(model, method: str, cover: float | None = None) -> None:
    """Make every core choose its blocks by ``method`` (``seer``: its own gate; ``cover``: the mass)."""
    for _, a in adapters(model):
        core = a.core
        core.__dict__.pop("choose", None)
        if method == "seer":
            continue

        def choose(self, q, k, valid=None, positions=None, method=method):
            with torch.no_grad():
                logits, allowed = self.gate(q, k, valid, positions, self.causal)  # allowed blocks only
                nb = logits.shape[-1]
                forced = forced_blocks(
                    nb, self.causal, self.keep_diagonal, self.keep_first, self.dense_last_rows
                )
                if method == "cover":
                    return _cover(_block_mass(self, q, k, valid), allowed, forced, cover), allowed
                if method == "gate_cover":
                    return _cover(logits.float().softmax(-1), allowed, forced, cover), allowed
                scores = _scores(self, method, q, k, valid, positions).expand_as(logits)
                return select_blocks(scores, allowed, forced, self.density, self.threshold), allowed

        core.choose = types.MethodType(choose, core)


def set_density(model, density: float | None, threshold: float | None = None) -> None:
    for _, a in adapters(model):
        a.core.density, a.core.threshold = density, threshold


def token_stream(tokenizer, split: str) -> list[int]:
    texts = builtin_texts()
    half = len(texts) // 2
    chosen = texts[:half] if split == "train" else texts[half:]
    ids = tokenizer(chosen, add_special_tokens=False)["input_ids"]
    return [t for row in ids for t in row]


def windows(ids: list[int], length: int, count: int, cls=None, sep=None, stride: int | None = None) -> dict:
    """Up to ``count`` windows of ``length`` tokens (with [CLS]/[SEP] for an encoder) starting every
    ``stride`` tokens (default: consecutive, disjoint windows)."""
    inner = length - (2 if cls is not None else 0)
    step = stride or inner
    rows = []
    for i in range(count):
        chunk = ids[i * step : i * step + inner]
        if len(chunk) < inner:
            break
        rows.append(([cls] if cls is not None else []) + chunk + ([sep] if sep is not None else []))
    t = torch.tensor(rows)
    return {
        "input_ids": t,
        "attention_mask": torch.ones_like(t),
        **({"token_type_ids": torch.zeros_like(t)} if cls is not None else {}),
    }


def _batches(inputs: dict, size: int) -> list[dict]:
    n = inputs["input_ids"].shape[0]
    return [{k: v[i : i + size] for k, v in inputs.items()} for i in range(0, n, size)]


def _evaluate_row(loaded, model, data, reference, base_metrics, **row) -> dict:
    cores = {n: a.core for n, a in adapters(model)}
    t0 = time.perf_counter()
    with recording(cores.values()):
        metrics, _ = evaluate(loaded, model, data, reference=reference)
    row.update(kept=density_table(cores)["density"], **metrics, seconds=round(time.perf_counter() - t0, 1))
    if "perplexity" in metrics:
        row["dense_perplexity"] = base_metrics["perplexity"]
    print(json.dumps(row), flush=True)
    return row


def compare(
    loaded, model, test: dict, batch: int, reference, base_metrics: dict, plan: dict | None = None
) -> list[dict]:
    """Rows of every method at each density, the gate at each threshold, the oracle cover at each mass
    and the gate's own cover at each mass (``plan`` overrides ``densities``, ``methods``, ``thresholds``,
    ``covers``, ``gate_covers``)."""
    plan = {
        "densities": DENSITIES,
        "methods": METHODS,
        "thresholds": THRESHOLDS,
        "covers": COVERS,
        "gate_covers": COVERS,
        **(plan or {}),
    }
    data = Batches(_batches(test, batch), None, "builtin-long", test["input_ids"].shape[0])
    args, rows = (loaded, model, data, reference, base_metrics), []
    for density in plan["densities"]:
        set_density(model, density)
        for method in plan["methods"]:
            use_method(model, method)
            rows.append(_evaluate_row(*args, density=density, method=method))
    use_method(model, "seer")
    for t in plan["thresholds"]:  # the variable budgets
        set_density(model, None, t)
        rows.append(_evaluate_row(*args, threshold=t, method="seer"))
    for method in ("cover", "gate_cover"):
        for m in plan[method + "s"]:
            use_method(model, method, m)
            rows.append(_evaluate_row(*args, mass=m, method=method))
    use_method(model, "seer")
    set_density(model, 0.5)
    return rows


def train_gates(loaded, train: dict, test: dict, block: int, steps: int, batch: int, lr: float | None = None,
                rule: str = "topk"):  # fmt: skip
    """The pass on a copy of the model (density 0.5; ``rule: threshold`` calibrates its threshold on ``train``)."""
    sets = {"train": SampleSet(train, None, batch), "eval": SampleSet(test, None, batch)}
    ctx = make_context(
        [sets["eval"].batch(slice(0, 1))], loaded.call, torch.device("cpu"), kind=loaded.kind,
        data=lambda s: sets[s], train=TrainConfig(steps=steps, batch_size=batch, warmup_steps=max(1, steps // 20), log_every=max(1, steps // 50)),
    )  # fmt: skip
    entry = {
        "pass": "seer_attention",
        "block": block,
        "density": 0.5,
        "rule": rule,
        **({"lr": lr} if lr else {}),
    }
    passes = recipe_from_dict({"passes": [entry]}).passes
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, records = run(copy.deepcopy(loaded.model), passes, ctx)
    info = records[0]["info"]
    return model, {"train_seconds": round(time.perf_counter() - t0, 1), "kl_held_out": info["seer"]["kl_held_out"],
                   "losses": info["training"]["losses"], "heatmap": info["seer"]["heatmap"], "block": block, "steps": steps,
                   "lr": info["training"]["lr"], "cached": info["training"]["cached"],
                   "calibrated": info["training"].get("calibrated"), "fit_seconds": info["training"]["seconds"]}  # fmt: skip


def set_dropped(model, value: str | None):
    """The hook for the dropped-block estimate (the cores' ``dropped`` option, absent before it was
    merged): set it on every core that has the attribute; returns what was set, or why not."""
    if value is None:
        return None
    cores = [a.core for _, a in adapters(model)]
    if not all(hasattr(c, "dropped") for c in cores):
        return f"unavailable: the cores have no 'dropped' attribute ({value!r} not applied)"
    for c in cores:
        c.dropped = value
    return value


QUICK = {
    "densities": (0.5,),
    "methods": ("seer", "oracle", "oracle_mass", "random"),
    "covers": (0.8, 0.85),
    "gate_covers": (0.8, 0.85, 0.9),
}


def minilm(args, save_part) -> None:
    """The ``minilm`` part: gates at ``--block`` trained on the train windows (``--train-stride``),
    their threshold calibrated to density 0.5 on them; rows on the disjoint test windows."""
    from transformers import AutoTokenizer

    from edgecompress.report import seer_heatmap_png

    loaded = load_model("demo:minilm")
    tok = AutoTokenizer.from_pretrained(loaded.tokenizer_dir, local_files_only=True)
    specials = (tok.cls_token_id, tok.sep_token_id)
    train = windows(token_stream(tok, "train"), 512, 10**6, *specials, stride=args.train_stride)
    test = windows(token_stream(tok, "test"), 512, 32, *specials)
    data = Batches(_batches(test, 8), None, "builtin-long", test["input_ids"].shape[0])
    base_metrics, reference = evaluate(loaded, loaded.model, data)
    model, extra = train_gates(
        loaded, train, test, args.block, args.minilm_steps, 8, args.minilm_lr, "threshold"
    )
    extra["dropped"] = set_dropped(model, args.dropped)
    t_cal = extra["calibrated"]["threshold"]
    scale = args.block / 32  # the fixed thresholds were set for 16 key blocks (block 32)
    plan = {"thresholds": (t_cal, *(round(t * scale, 4) for t in THRESHOLDS))}
    if args.quick:
        plan.update(QUICK, thresholds=(t_cal,))
    rows = compare(loaded, model, test, 8, reference, base_metrics, plan)
    extra.update(tokens=512, train_texts=int(train["input_ids"].shape[0]), train_stride=args.train_stride,
                 test_texts=int(test["input_ids"].shape[0]))  # fmt: skip
    part = f"minilm-block{args.block}" + (f"-stride{args.train_stride}" if args.train_stride else "")
    part += f"-dropped-{args.dropped}" if args.dropped else ""
    path = save_part(args.out, part, rows, extra)
    png = seer_heatmap_png(
        extra["heatmap"], f"demo:minilm 512 tokens, {extra['heatmap']['layer']}: gate vs truth"
    )
    if png:
        path.with_name(f"{path.stem}-{part}-heatmap.png").write_bytes(png)


def run_quality(args, save_part) -> None:
    from transformers import AutoTokenizer

    from edgecompress.report import seer_heatmap_png

    if "minilm" in args.parts:
        minilm(args, save_part)
    if "lm" in args.parts:
        lm_dir = Path(args.lm_dir)
        loaded = load_model(f"hf:{lm_dir}")
        meta = json.loads((lm_dir / "seer_lm.json").read_text())
        mapping = {int(k): v for k, v in meta["vocab"].items()}
        tok = AutoTokenizer.from_pretrained(meta["tokenizer"], local_files_only=True)
        ids = {s: [mapping[t] for t in token_stream(tok, s) if t in mapping] for s in ("train", "test")}
        train = windows(ids["train"], 1024, 24)
        rows, extra = [], {"trained": meta}
        model = None
        for length in (1024, 2048):
            test = windows(ids["test"], length, 8)
            data = Batches(_batches(test, 2), None, "builtin-long", test["input_ids"].shape[0])
            base_metrics, reference = evaluate(loaded, loaded.model, data)
            if model is None:
                model, gates = train_gates(loaded, train, windows(ids["test"], 1024, 4), 64, args.lm_steps, 2)
                extra.update(gates, dropped=set_dropped(model, args.dropped))
            rows += [{"tokens": length, **r} for r in compare(loaded, model, test, 2, None, base_metrics)]
        path = save_part(args.out, "lm" + (f"-dropped-{args.dropped}" if args.dropped else ""), rows, extra)
        png = seer_heatmap_png(
            extra["heatmap"], f"Llama-style LM, {extra['heatmap']['layer']}: gate vs truth"
        )
        if png:
            path.with_name(path.stem + "-lm-heatmap.png").write_bytes(png)
