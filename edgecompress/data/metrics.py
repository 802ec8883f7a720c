"""Metrics: top-1 for classifiers, embedding fidelity for encoders, perplexity for causal LMs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from edgecompress.data.specs import Batches
from edgecompress.models.loading import LoadedModel


@torch.no_grad()
def outputs(loaded: LoadedModel, model: nn.Module, data: Batches) -> list[torch.Tensor]:
    """The model's main output per batch (logits, or pooled normalized embeddings for encoders)."""
    model.eval()
    device = next(iter(model.parameters()), torch.empty(0)).device  # batches go where the model is
    outs = []
    for b in tqdm(data.batches, desc="evaluate", unit="batch", leave=False, disable=None):
        b = {k: v.to(device) for k, v in b.items()} if isinstance(b, dict) else b.to(device)
        y = loaded.call(model, b).float()
        if loaded.kind == "encoder":
            mask = b["attention_mask"].unsqueeze(-1).float()  # [B, T, 1]
            y = F.normalize((y * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1)  # mean pooling → [B, D]
        outs.append(y.cpu())
    return outs


def _perplexity(logits: list[torch.Tensor], data: Batches) -> float:
    nll, count = 0.0, 0
    for lg, b in zip(logits, data.batches):
        ids, mask = b["input_ids"][:, 1:], b["attention_mask"][:, 1:].bool()
        loss = F.cross_entropy(lg[:, :-1].transpose(1, 2), ids, reduction="none")  # [B, T-1]
        nll += float(loss[mask].sum())
        count += int(mask.sum())
    return math.exp(nll / max(count, 1))


def evaluate(
    loaded: LoadedModel, model: nn.Module, data: Batches, reference: list[torch.Tensor] | None = None
) -> tuple[dict, list[torch.Tensor]]:
    """Metrics of ``model`` on ``data``; with ``reference`` outputs also its fidelity to them."""
    outs = outputs(loaded, model, data)
    metrics: dict = {"samples": data.count, "data": data.spec}
    cat = torch.cat(outs)
    if loaded.kind == "image":
        pred = cat.argmax(-1)
        if data.labels is not None:
            metrics["top1"] = round(float((pred == data.labels).float().mean()) * 100, 2)
        if reference is not None:
            metrics["top1_agreement"] = round(
                float((pred == torch.cat(reference).argmax(-1)).float().mean()) * 100, 2
            )
    elif loaded.kind == "encoder" and reference is not None:
        ref = torch.cat(reference)
        cos = (cat * ref).sum(-1)
        metrics["cosine_mean"] = round(float(cos.mean()), 5)
        metrics["cosine_min"] = round(float(cos.min()), 5)
        metrics["nn_agreement"] = round(_nn_agreement(cat, ref) * 100, 2)
    elif loaded.kind == "causal_lm":
        metrics["perplexity"] = round(_perplexity(outs, data), 4)
    return metrics, outs


def _nn_agreement(emb: torch.Tensor, ref: torch.Tensor) -> float:
    """Fraction of texts whose nearest other text is the same under ``emb`` and ``ref``."""
    if len(emb) < 2:
        return 1.0
    eye = torch.eye(len(emb), dtype=torch.bool)
    nn_a = (emb @ emb.T).masked_fill(eye, -2).argmax(-1)
    nn_b = (ref @ ref.T).masked_fill(eye, -2).argmax(-1)
    return float((nn_a == nn_b).float().mean())
