"""Exported tiny models shared by the export tests (each export takes seconds: do it once)."""

from __future__ import annotations

import onnx
import pytest

from edgecompress.export.onnx import export_onnx
from edgecompress.models.loading import load_model
from tests.conftest import tiny_timm
from tests.export.models import compressed, tiny_vit_odd


@pytest.fixture(scope="session")
def vit():
    return tiny_vit_odd()


@pytest.fixture(scope="session")
def vit_w8a8(vit):
    return compressed(vit, "uniform_w8a8")


@pytest.fixture(scope="session")
def vit_w8a8_sym(vit):
    return compressed(vit, "uniform_w8a8_sym")


@pytest.fixture(scope="session")
def vit_w4a4(vit):
    return compressed(vit, "uniform_w4a4")


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """``exported(name, loaded, **kw)`` → (ExportResult, ModelProto), cached per name."""
    cache = {}
    folder = tmp_path_factory.mktemp("onnx")

    def get(name, loaded, **kw):
        if name not in cache:
            res = export_onnx(loaded, folder / f"{name}.onnx", batch=kw.pop("batch", 2), **kw)
            cache[name] = (res, onnx.load(str(res.path)))
        return cache[name]

    return get


def float_models(tiny_bert_dir) -> dict:
    """Float models by name, built on demand (the HF BERT has a real tokenizer: real text data)."""
    return {
        "timm-vit": tiny_vit_odd,
        "timm-swin": lambda: tiny_timm("swin_tiny_patch4_window7_224"),
        "hf-bert": lambda: load_model(f"hf:{tiny_bert_dir}"),
    }
