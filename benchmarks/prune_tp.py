"""Torch-Pruning (``pip install torch-pruning``, the ``bench`` extra) on our models, for benchmarks/prune.py.

Settings follow its examples: ``examples/transformers/prune_timm_vit.py`` (``GroupTaylorImportance``
on labelled batches — here the calibration digits — uniform ratio per layer, ``num_heads`` per qkv,
whole heads pruned with ``head_pruning_ratio``, ``round_to=2``, the ``forward`` of timm attention
fixed by resetting ``num_heads`` / ``head_dim`` after pruning) and ``prune_hf_bert.py``
(``MagnitudeImportance(p=2, group_reduction="mean")``, heads grouped over query/key/value, whole
heads, then ``num_attention_heads`` / ``attention_head_size`` / ``all_head_size`` reset). Its
"bottleneck" mode is used for both — every layer writing the residual stream (patch embedding,
attention output projection, MLP output, heads, pooler) is ignored — so it prunes exactly what
``prune_structured`` prunes (heads and MLP channels) and the budgets compare. The ratio is searched
so that the removed fraction of the attention + MLP parameters matches the budget.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from edgecompress.prune.groups import find_groups, unit_params

ROUND_TO = 2


def prunable_params(model: nn.Module) -> int:
    """Parameters of every attention and MLP group (what the budgets count)."""
    return sum(g.units * unit_params(model, g) for g in find_groups(model))


def _setup(loaded, model: nn.Module):
    """(example inputs, heads per qkv/query/key/value Linear, ignored layers, importance) as in the examples."""
    import torch_pruning as tp

    heads, ignored = {}, []
    if loaded.kind == "image" and hasattr(model, "patch_embed"):  # timm ViT / DeiT (demo:vit-digits)
        from timm.layers.attention import Attention

        for m in model.modules():
            if isinstance(m, Attention):
                heads[m.qkv] = m.num_heads
                ignored.append(m.proj)
            if hasattr(m, "fc2") and hasattr(m, "fc1"):
                ignored.append(m.fc2)
        ignored += [model.head, model.patch_embed.proj]
        example = torch.randn(1, *loaded.data_cfg["input_size"])
        return example, heads, ignored, tp.importance.GroupTaylorImportance()
    for name, m in model.named_modules():
        if hasattr(m, "query") and hasattr(m, "num_attention_heads"):
            for lin in (m.query, m.key, m.value):
                heads[lin] = m.num_attention_heads
        if name.endswith("output.dense") or name.endswith("pooler.dense"):
            ignored.append(m)
    ids = torch.randint(100, 1000, (1, 16))
    example = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": torch.zeros_like(ids),
    }
    return example, heads, ignored, tp.importance.MagnitudeImportance(p=2, group_reduction="mean")


def _fix_attributes(model: nn.Module, pruner) -> None:
    for m in model.modules():
        if hasattr(m, "qkv") and m.qkv in pruner.num_heads:  # timm Attention
            m.num_heads = pruner.num_heads[m.qkv]
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)
            m.attn_dim = m.num_heads * m.head_dim
        elif hasattr(m, "query") and m.query in pruner.num_heads:  # HF BERT self-attention
            m.num_attention_heads = pruner.num_heads[m.query]
            m.attention_head_size = m.query.out_features // m.num_attention_heads
            m.all_head_size = m.query.out_features


def tp_prune(loaded, ratio: float, calib_batches) -> nn.Module:
    """A copy of ``loaded.model`` pruned by Torch-Pruning at ``ratio`` (heads and MLP channels)."""
    import torch_pruning as tp

    model = copy.deepcopy(loaded.model).eval()
    example, heads, ignored, imp = _setup(loaded, model)
    forward = (lambda m, x: m(**x)) if isinstance(example, dict) else None
    pruner = tp.pruner.MetaPruner(
        model, example, importance=imp, global_pruning=False, pruning_ratio=ratio, ignored_layers=ignored,
        num_heads=heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio,
        round_to=ROUND_TO, forward_fn=forward,
    )  # fmt: skip
    if isinstance(imp, tp.importance.GroupTaylorImportance):
        model.zero_grad()
        for b in calib_batches:
            F.cross_entropy(loaded.call(model, b.inputs), b.labels).backward()
    for group in pruner.step(interactive=True):
        group.prune()
    _fix_attributes(model, pruner)
    model.zero_grad(set_to_none=True)
    return model


def tp_at_budget(loaded, budget: float, calib_batches) -> tuple[nn.Module, float, float]:
    """Torch-Pruning at the ratio whose removed fraction of attention + MLP parameters is closest to
    ``budget`` (a few ratios tried); returns (model, ratio, removed fraction)."""
    dense = prunable_params(loaded.model)
    best = None
    for ratio in (budget, min(0.95, budget + 0.02), max(0.01, budget - 0.02)):
        model = tp_prune(loaded, ratio, calib_batches)
        removed = 1 - prunable_params(model) / dense
        if best is None or abs(removed - budget) < abs(best[2] - budget):
            best = (model, ratio, removed)
        if abs(removed - budget) < 0.01:
            break
    with torch.no_grad():
        best[0].eval()
    return best
