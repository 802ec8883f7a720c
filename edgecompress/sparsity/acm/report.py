"""What the gates chose: per ACM layer the histogram of ``k`` and the executed fraction ``E[k]/L``.

Counted over every token the model sees (text padding included: the model computes it too).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from edgecompress.sparsity.acm.modules import ACMMLP


@contextlib.contextmanager
def recording(model: nn.Module):
    """Count the learner choices of every ACM in ``model`` during the block; yields the modules."""
    acms = {n: m for n, m in model.named_modules() if isinstance(m, ACMMLP)}
    for m in acms.values():
        m.k_counts.zero_()
        m.record = True
    try:
        yield acms
    finally:
        for m in acms.values():
            m.record = False


def summarise(acms: dict[str, ACMMLP]) -> dict:
    """``{"layers": {name: {"k_counts", "fraction"}}, "mean_fraction"}`` (mean weighted by learner cost)."""
    layers, used, total = {}, 0.0, 0.0
    for name, m in acms.items():
        counts = m.k_counts.cpu()
        tokens = int(counts.sum())
        frac = float((counts * torch.arange(len(counts))).sum()) / max(tokens, 1) / m.n_learners
        layers[name] = {"k_counts": counts.tolist(), "fraction": round(frac, 4), "tokens": tokens}
        cost = m.n_learners * m.h * (m.d + m.d_out)
        used, total = used + frac * cost, total + cost
    return {"layers": layers, "mean_fraction": round(used / max(total, 1e-12), 4)}


@torch.no_grad()
def choice_stats(model: nn.Module, acms, ctx) -> dict:
    """Run the eval data (eval mode) and summarise the gates' choices."""
    was = model.training
    model.eval()
    try:
        with recording(model) as found:
            for batch in ctx.batches("eval"):
                ctx.call(model, batch)
        return summarise(found)
    finally:
        model.train(was)
