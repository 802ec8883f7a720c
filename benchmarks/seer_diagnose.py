"""Why the oracle block choice is no better than random blocks on demo:minilm at density 0.5 (untimed).

    nice -n 19 python benchmarks/seer_diagnose.py [--block 32] [--windows 8] [--out DIR]

On 8 test windows of 512 tokens of two texts — the built-in paragraphs concatenated (the benchmark's
data) and one coherent long text (the GPL-3 licence of the system, ``/usr/share/common-licenses``) —
every attention keeps blocks chosen from the *true* attention of the input (no trained gate: the
gates are installed with one training step and bypassed), run by the masked-dense reference form:

* per-row budget (the pass's ``density`` rule, 0.5): by the block-max (``oracle``, the gate's
  target), by the block mass (``oracle_mass``), random, static local + global;
* variable budget (``cover`` m): per row the fewest blocks holding a fraction m of the true mass;
* ``oracle_mass`` at density 0.99: every block kept (the mask application's sanity check: cosine 1).

Per row: the fraction of the softmax mass the kept blocks hold and the kept fraction of the
blocks, averaged over layers; the mean embedding cosine to the dense model. Rows go to the
``diagnosis`` part of ``benchmarks/results/seer-<machine>-<date>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

from edgecompress.data.metrics import evaluate  # noqa: E402
from edgecompress.data.specs import Batches  # noqa: E402
from edgecompress.models.attention import adapters  # noqa: E402
from edgecompress.models.loading import load_model  # noqa: E402
from edgecompress.sparsity.seer.masks import forced_blocks, select_blocks  # noqa: E402

TEXT = Path("/usr/share/common-licenses/GPL-3")
RUNS = (  # (method, density, cover)
    ("oracle", 0.5, None), ("oracle_mass", 0.5, None), ("random", 0.5, None), ("static", 0.5, None),
    ("cover", None, 0.8), ("cover", None, 0.85), ("cover", None, 0.9), ("oracle_mass", 0.99, None),
)  # fmt: skip


def _choose_logging(SQ, method: str, cover, stats: list):
    """A ``choose`` that keeps blocks by ``method`` from the true attention and logs (mass kept, blocks kept)."""

    def choose(self, q, k, valid=None, positions=None):
        with torch.no_grad():
            logits, allowed = self.gate(q, k, valid, positions, self.causal)
            nb = logits.shape[-1]
            forced = forced_blocks(nb, self.causal, self.keep_diagonal, self.keep_first, self.dense_last_rows)
            mass = SQ._block_mass(self, q, k, valid)
            if method == "cover":
                keep = SQ._cover(mass, allowed, forced, cover)
            else:
                scores = SQ._scores(self, method, q, k, valid, positions).expand_as(logits)
                keep = select_blocks(scores, allowed, forced, self.density, None)
            stats.append((float((mass * keep).sum() / mass.sum()), float(keep.float().mean())))
            return keep, allowed

    return choose


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    seer = sibling("seer")
    SQ = seer.sibling("seer_quality")
    from transformers import AutoTokenizer

    loaded = load_model("demo:minilm")
    tok = AutoTokenizer.from_pretrained(loaded.tokenizer_dir, local_files_only=True)
    specials = (tok.cls_token_id, tok.sep_token_id)
    test_ids = SQ.token_stream(tok, "test")
    texts = {
        "concatenated": SQ.windows(test_ids, 512, args.windows, *specials),
        "coherent-GPL-3": SQ.windows(tok(TEXT.read_text(), add_special_tokens=False)["input_ids"], 512, args.windows, *specials),
    }  # fmt: skip
    model, _ = SQ.train_gates(
        loaded, texts["concatenated"], SQ.windows(test_ids, 512, 2, *specials), args.block, 1, 4
    )
    rows = []
    for name, data in texts.items():
        batches = Batches(SQ._batches(data, 4), None, name, data["input_ids"].shape[0])
        _, ref = evaluate(loaded, loaded.model, batches)
        for method, density, cover in RUNS:
            stats: list = []
            for _, a in adapters(model):
                a.core.density, a.core.threshold, a.core.form = density or 0.5, None, "reference"
                a.core.choose = types.MethodType(_choose_logging(SQ, method, cover, stats), a.core)
            m, _ = evaluate(loaded, model, batches, reference=ref)
            row = {
                "data": name, "block": args.block, "method": method, "density": density, "cover": cover,
                "kept_mass": round(sum(s[0] for s in stats) / len(stats), 4),
                "kept": round(sum(s[1] for s in stats) / len(stats), 4),
                "cosine_mean": m["cosine_mean"], "cosine_min": m["cosine_min"],
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    seer.save_part(args.out, f"diagnosis-block{args.block}", rows, {"windows": args.windows, "tokens": 512})


def sibling(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


if __name__ == "__main__":
    main()
