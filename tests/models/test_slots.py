"""Slots are only claimed where they run (oracle: forward hooks on the real models; the float
model for the layers left alone, exact)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from edgecompress.calib import make_context
from edgecompress.models.loading import LoadedModel
from edgecompress.models.slots import SlotLinear
from edgecompress.pipeline import run
from edgecompress.recipe import recipe_from_dict
from tests.conftest import tiny_timm


class _UsesWeightDirectly(nn.Module):
    """Like timm EVA's attention: ``proj`` is a child Linear, but the parent calls F.linear on its weight."""

    def __init__(self):
        super().__init__()
        self.used = nn.Linear(16, 16)
        self.proj = nn.Linear(16, 8)

    def forward(self, x):
        return F.linear(self.used(x), self.proj.weight, self.proj.bias)


def _passes(*names):
    extra = {"step": {"t_max": 1, "steps": 2}}
    return recipe_from_dict({"passes": [{"pass": n, **extra.get(n, {})} for n in names]}).passes


def test_a_linear_the_model_never_calls_is_not_claimed():
    torch.manual_seed(0)
    loaded = LoadedModel(_UsesWeightDirectly().eval(), "test:direct", "image", {"kind": "test"}, {})
    batches = [torch.randn(4, 16)]
    for passes in (_passes("uniform_ptq"), _passes("nm_oneshot", "uniform_ptq")):
        ctx = make_context(batches, loaded.call, torch.device("cpu"))
        model, records = run(copy.deepcopy(loaded.model), passes, ctx)
        assert isinstance(model.used, SlotLinear) and type(model.proj) is nn.Linear
        assert all(any("proj: " in n and "never called" in n for n in r["notes"]) for r in records)
        assert all(not r["name"].startswith("proj") for rec in records for r in rec["layers"])


def test_eva02_qkv_is_reported_not_quantized_without_the_explicit_form():
    """timm EVA02 (random weights, 32×32) computes its qkv with F.linear on the weight and a separate
    q/v bias: without the explicit attention form (quantize_attention off) uniform_ptq must say so
    instead of listing attn.qkv as 8-bit (with it, qkv runs and is quantized: test_unseen_timm)."""
    loaded = tiny_timm(
        "eva02_tiny_patch14_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4
    )
    ctx = make_context([torch.randn(2, 3, 32, 32)], loaded.call, torch.device("cpu"))
    passes = recipe_from_dict({"passes": [{"pass": "uniform_ptq", "quantize_attention": False}]}).passes
    model, records = run(copy.deepcopy(loaded.model), passes, ctx)
    qkv = [n for n in records[0]["notes"] if ".attn.qkv: not quantized" in n]
    assert len(qkv) == 2 and type(model.blocks[0].attn.qkv) is nn.Linear
    assert isinstance(model.blocks[0].mlp.fc1, SlotLinear) and isinstance(
        model.blocks[0].attn.proj, SlotLinear
    )
