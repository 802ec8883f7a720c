"""Tiny models for the export and bench tests, and compression of them with shipped recipes."""

from __future__ import annotations

import copy

import torch

from edgecompress.calib import make_context
from edgecompress.export.inputs import as_batch, synthetic
from edgecompress.models.loading import LoadedModel
from edgecompress.pipeline import run
from edgecompress.recipe import load_recipe


def tiny_vit_odd() -> LoadedModel:
    """A 2-block timm ViT with odd sizes (width 36, 3 heads of 12, MLP 72, 7 classes), 16×16 input."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=16, patch_size=4, embed_dim=36, depth=2, num_heads=3, mlp_ratio=2.0, num_classes=7
    )
    cfg = {"input_size": (3, 16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": 1.0}
    return LoadedModel(model.eval(), "test:tiny-vit", "image", {"kind": "test"}, cfg)


def tiny_bert_synthetic() -> LoadedModel:
    """A 2-layer BERT with odd sizes and no tokenizer (verification falls back to synthetic ids)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=1013, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=59,
        max_position_embeddings=64,
    )  # fmt: skip
    return LoadedModel(BertModel(cfg).eval(), "test:tiny-bert", "encoder", {"kind": "test"}, {})


def compressed(loaded: LoadedModel, recipe: str, overrides: tuple[str, ...] = ()) -> LoadedModel:
    """A copy of ``loaded`` compressed by a shipped recipe, calibrated on seeded synthetic inputs."""
    model = copy.deepcopy(loaded.model)
    batches = [as_batch(loaded, synthetic(loaded, 4, seq=16, seed=100 + i)) for i in range(4)]
    ctx = make_context(batches, loaded.call, torch.device("cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster, and immune to a busy shared CPU
    try:
        model, _ = run(model, load_recipe(recipe, list(overrides)).passes, ctx)
    finally:
        torch.set_num_threads(threads)
    return LoadedModel(
        model.eval(), loaded.spec, loaded.kind, loaded.base, loaded.data_cfg, loaded.tokenizer_dir
    )


def negated_head(loaded: LoadedModel) -> LoadedModel:
    """A copy of ``loaded`` whose classifier head is negated: a wrong model every verification must refuse."""
    model = copy.deepcopy(loaded.model)
    with torch.no_grad():
        model.head.weight.mul_(-1.0)
    return LoadedModel(model, loaded.spec, loaded.kind, loaded.base, loaded.data_cfg, loaded.tokenizer_dir)
