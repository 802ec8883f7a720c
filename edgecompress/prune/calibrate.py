"""Calibration statistics of each group's output projection, in one run over the calibration batches.

For every group: the Gram matrix ``X̃ᵀX̃`` of the projection's input with a constant column
(float64; text padding excluded through the call's ``attention_mask``), the input's shape (for the
FLOPs count), and, when asked, the first-order Taylor scores (:func:`edgecompress.prune.importance.taylor_batch`
squared, averaged over batches). Hooks are removed and ``requires_grad`` restored in ``finally``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgecompress.calib import token_rows, tracking_mask
from edgecompress.prune.groups import Group
from edgecompress.prune.importance import taylor_batch


@dataclass
class Stats:
    gram: torch.Tensor  # [K+1, K+1] float64: [X, 1]ᵀ[X, 1] over the calibration tokens
    calls: int = 0  # projection calls (one per model call, or per window batch)
    rows_per_sample: float = 0.0  # projection input rows per model sample (padding included)
    seq: int = 0  # sequence length of one projection call (Swin: the window area)
    windows: float = 1.0  # projection batch rows per model sample (Swin: windows per image)
    taylor: torch.Tensor | None = None  # [units]: mean over batches of the squared Taylor score

    @property
    def x_norm(self) -> torch.Tensor:
        return self.gram.diagonal()[:-1].clamp_min(0).sqrt()


def _accumulate(stats: Stats, x: torch.Tensor, mask: torch.Tensor | None, samples: int) -> None:
    rows = token_rows(x.detach(), mask).float()
    g = stats.gram
    k = rows.shape[1]
    g[:k, :k] += (rows.T @ rows).double()
    s = rows.sum(0).double()
    g[:k, k] += s
    g[k, :k] += s
    g[k, k] += rows.shape[0]
    if stats.calls == 0 and x.dim() >= 2:
        stats.seq = int(x.shape[-2]) if x.dim() >= 3 else 1
        lead = x.shape[:-1].numel()
        stats.rows_per_sample = lead / max(samples, 1)
        stats.windows = (lead / stats.seq) / max(samples, 1)
    stats.calls += 1


def taylor_loss(out: torch.Tensor, batch) -> torch.Tensor:
    """The task loss with labels (classifiers), else ½·mean(y²) over the real tokens (LPViT's choice)."""
    labels = getattr(batch, "labels", None)
    if labels is not None and out.dim() == 2:
        return F.cross_entropy(out.float(), labels.to(out.device))
    inputs = getattr(batch, "inputs", batch)
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    y = token_rows(out, mask.to(out.device)) if mask is not None and out.dim() == 3 else out
    return 0.5 * y.float().pow(2).mean()


@contextlib.contextmanager
def _only_grads(model: nn.Module, params: list[nn.Parameter]):
    before = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in before.items():
            p.requires_grad_(flag)


def collect(model: nn.Module, groups: list[Group], batches, call, taylor: bool = False) -> dict[str, Stats]:
    """:class:`Stats` of every group over ``batches`` (eval mode; gradients only for ``taylor``)."""
    outs = {g.name: model.get_submodule(g.out) for g in groups}
    stats = {g.name: Stats(torch.zeros(o.in_features + 1, o.in_features + 1, dtype=torch.float64))
             for g, o in zip(groups, outs.values(), strict=True)}  # fmt: skip
    current = {"samples": 1}
    was = model.training
    model.eval()
    hooks = []
    with (
        tracking_mask(model) as mask,
        _only_grads(model, [o.weight for o in outs.values()] if taylor else []),
    ):
        try:
            for g in groups:
                hooks.append(outs[g.name].register_forward_pre_hook(
                    lambda _m, a, s=stats[g.name]: _accumulate(s, a[0], mask["mask"], current["samples"])
                ))  # fmt: skip
            for batch in batches:
                current["samples"] = len(batch)
                with torch.set_grad_enabled(taylor):
                    out = call(model, batch)
                if taylor:
                    _taylor_step(model, groups, outs, stats, taylor_loss(out, batch))
        finally:
            for h in hooks:
                h.remove()
            model.train(was)
    n = max(len(batches), 1)
    for s in stats.values():
        if s.taylor is not None:
            s.taylor /= n
    return stats


def _taylor_step(model, groups, outs, stats, loss) -> None:
    weights = [outs[g.name].weight for g in groups]
    grads = torch.autograd.grad(loss, weights)
    for g, w, gr in zip(groups, weights, grads, strict=True):
        s = taylor_batch(w.detach(), gr, g.units, g.col_width).pow(2)
        st = stats[g.name]
        st.taylor = s if st.taylor is None else st.taylor + s
