"""Training losses as ``loss_fn(model, batch)`` callables for :func:`edgecompress.train.fit`:
the task loss on labelled data, distillation from a frozen teacher otherwise (DESIGN §3).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from edgecompress.data.samples import Batch
from edgecompress.errors import UserError

KINDS = ("image", "encoder", "causal_lm")
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
Call = Callable[[nn.Module, object], torch.Tensor]


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def task_loss(call: Call, label_smoothing: float = 0.0) -> LossFn:
    """Cross-entropy of ``call(model, batch.inputs)`` (logits ``[B, C]``) against ``batch.labels``."""

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        if batch.labels is None:
            raise UserError("the task loss needs labels, but the training data has none")
        return F.cross_entropy(call(model, batch.inputs), batch.labels, label_smoothing=label_smoothing)

    return loss


def _token_weights(batch: Batch, out: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` float weights of the real tokens (1 / count per row): a mean per sample, then over samples."""
    mask = batch.inputs.get("attention_mask") if isinstance(batch.inputs, dict) else None
    mask = torch.ones(out.shape[:2], device=out.device) if mask is None else mask.to(out.device).float()
    return mask / mask.sum(1, keepdim=True).clamp(min=1)


def distill_loss(teacher: nn.Module, call: Call, kind: str, temperature: float = 1.0) -> LossFn:
    """Match the frozen ``teacher`` (run under no_grad in eval mode) on the same batch.

    ``image`` / ``causal_lm`` (logits): KL(teacher ‖ student) of the softmaxes at ``temperature``, times
    T². ``encoder`` (hidden states ``[B, T, D]``): MSE. Token losses are averaged over each sample's
    real tokens (``attention_mask``) and then over samples, so the loss is a mean over samples as
    :func:`fit` requires (exact DDP gradients); computed in float32.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: must be one of {', '.join(KINDS)}, got {kind!r}")
    if not (_is_num(temperature) and temperature > 0):
        raise ValueError(f"temperature: must be a finite number > 0, got {temperature!r}")

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        was_training = teacher.training
        teacher.eval()
        try:
            with torch.no_grad():
                target = call(teacher, batch.inputs).float()
        finally:
            teacher.train(was_training)
        out = call(model, batch.inputs).float()
        if kind == "encoder":
            per = (out - target).pow(2).mean(-1)
        else:
            logp_t, logp_s = F.log_softmax(target / temperature, -1), F.log_softmax(out / temperature, -1)
            per = (logp_t.exp() * (logp_t - logp_s)).sum(-1) * temperature**2
        if kind == "image":
            return per.mean()
        return (per * _token_weights(batch, out)).sum(1).mean()

    return loss


def default_loss(teacher: nn.Module | None, call: Call, kind: str) -> LossFn:
    """The task loss on batches with labels, else distillation from ``teacher`` (DESIGN §3)."""
    task = task_loss(call)
    distill = distill_loss(teacher, call, kind) if teacher is not None else None

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        if batch.labels is not None:
            return task(model, batch)
        if distill is None:
            raise UserError("the training data has no labels and there is no teacher to distill from")
        return distill(model, batch)

    return loss
