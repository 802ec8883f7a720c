"""What the gates chose on the eval data: kept blocks per layer and head, and one layer's scores vs its target.

Density = kept (query block, key block) pairs / pairs the query may see (block-causal for decoders,
blocks holding a real token), counted over every eval sample, forced blocks included (they are
computed). Calls that ran dense (below ``min_seq_len``) count as density 1. The heat map is the
middle layer's gate distribution and ground truth on the longest eval sample, averaged over heads
(:func:`edgecompress.report.seer_heatmap_png` draws it: ``seer_heatmap.png`` beside ``report.md``).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


@contextlib.contextmanager
def recording(cores):
    cores = list(cores)
    for c in cores:
        c.kept.zero_()
        c.allowed.zero_()
        c.record = True
    try:
        yield cores
    finally:
        for c in cores:
            c.record = False


def density_table(cores: dict) -> dict:
    """``{"layers": {name: {"density", "heads": [...]}}, "density"}`` from the recorded counts."""
    layers, kept, seen = {}, 0, 0
    for name, c in cores.items():
        k, a = c.kept.cpu(), c.allowed.cpu()
        heads = [round(float(x) / max(int(y), 1), 4) for x, y in zip(k, a, strict=True)]
        layers[name] = {"density": round(float(k.sum()) / max(int(a.sum()), 1), 4), "heads": heads}
        kept, seen = kept + int(k.sum()), seen + int(a.sum())
    return {"layers": layers, "density": round(kept / max(seen, 1), 4)}


@torch.no_grad()
def heatmap(model: nn.Module, cores: dict, ctx, layer: str) -> dict:
    """Gate probabilities and target of ``layer`` on the first eval sample, mean over heads."""
    from edgecompress.sparsity.seer.passes import collecting

    with collecting(cores.values()):
        ctx.call(model, _longest(ctx.batches("eval")))
        last = cores[layer].last
        gate = last["logits"].float().softmax(-1)[0].mean(0)
        truth = last["truth"][0].mean(0)
    return {"layer": layer, "gate": _rounded(gate), "truth": _rounded(truth)}


def _longest(batches):
    """The eval sample with the most real tokens (the first one of image data), as a one-row batch."""
    best, size = None, -1
    for batch in batches:
        inputs = batch.inputs
        lengths = (
            inputs["attention_mask"].sum(-1)
            if isinstance(inputs, dict) and "attention_mask" in inputs
            else None
        )
        i = 0 if lengths is None else int(lengths.argmax())
        n = -1 if lengths is None else int(lengths[i])
        if n > size or best is None:
            best, size = batch.rows(slice(i, i + 1)), n
        if lengths is None:
            break
    return best


def _rounded(t: torch.Tensor) -> list[list[float]]:
    return [[round(float(x), 5) for x in row] for row in t.cpu()]


@torch.no_grad()
def seer_report(model: nn.Module, cores: dict, ctx, kl: dict) -> dict:
    was = model.training
    model.eval()
    try:
        with recording(cores.values()):
            for batch in ctx.batches("eval"):
                ctx.call(model, batch)
        out = density_table(cores)
        names = list(cores)
        out["heatmap"] = heatmap(model, cores, ctx, names[len(names) // 2])
    finally:
        model.train(was)
    out["kl_held_out"] = {k: round(v, 5) for k, v in kl.items()}
    return out
