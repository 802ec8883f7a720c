"""The N:M passes on tiny models (oracles: the N:M property on every target, exact; the model
before saving, bit-identical after restore; the export verification bounds)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from edgecompress.calib import make_context
from edgecompress.errors import UserError
from edgecompress.export.deploy import export_verified
from edgecompress.export.tensorrt import weights_2to4
from edgecompress.models.loading import LoadedModel, restore
from edgecompress.models.slots import SlotLinear
from edgecompress.pipeline import run
from edgecompress.recipe import recipe_from_dict
from edgecompress.sparsity.nm.modules import NMMask
from edgecompress.structure import save
from edgecompress.train import TrainConfig
from tests.conftest import tiny_timm


def _passes(*entries):
    return recipe_from_dict({"passes": list(entries)}).passes


def _run(loaded, passes, steps=4):
    gen = torch.Generator().manual_seed(7)
    batches = [torch.randn(4, 3, 32, 32, generator=gen) for _ in range(2)]
    ctx = make_context(
        batches, loaded.call, torch.device("cpu"), kind="image", train=TrainConfig(steps=steps, batch_size=4)
    )
    model, records = run(copy.deepcopy(loaded.model), passes, ctx)
    return model, records, batches[0]


def _masked(model):
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, SlotLinear) and m.weight_chain.find("mask") is not None
    ]


@pytest.mark.parametrize(
    "entry",
    [
        {"pass": "nm_oneshot"},
        {"pass": "asp", "steps": 3},
        {"pass": "asp", "steps": 4, "from_scratch": True},
        {"pass": "sr_ste", "steps": 3},
        {"pass": "step", "steps": 6, "t_max": 3},
        {"pass": "nm_oneshot", "n": 1, "m": 8},
    ],
    ids=["oneshot", "asp", "asp-scratch", "sr_ste", "step", "oneshot-1:8"],
)
def test_every_target_is_nm_and_restores_bit_identically(entry, tmp_path):
    loaded = tiny_timm()
    model, records, x = _run(loaded, _passes(entry))
    n, m = entry.get("n", 2), entry.get("m", 4)
    masked = _masked(model)
    assert len(masked) == 8 and "head" not in dict(masked)  # 2 blocks × (qkv, proj, fc1, fc2); head dense
    for _, layer in masked:
        w = layer.effective_weight()
        assert bool(((w.reshape(w.shape[0], -1, m) != 0).sum(-1) <= n).all())
        assert torch.equal(layer.weight.detach(), w)  # pruned master weights are zero too
    out = save(model, tmp_path / "out", {"report.json": {"passes": records}})
    with torch.no_grad():
        assert torch.equal(restore(out)(x), model(x))
    st = json.loads((out / "structure.json").read_text())
    assert (
        "blocks.0.mlp.fc1.weight_nm_values" in st["tensors"]
        and "blocks.0.mlp.fc1.weight" not in st["tensors"]
    )
    rows = [r for r in records[0]["layers"] if r.get("mask")]
    assert rows and rows[0]["sparsity"] == f"{n}:{m}" and rows[0]["density"] == n / m


def test_2to4_is_smaller_on_disk(tmp_path):
    loaded = tiny_timm("vit_tiny_patch16_224", embed_dim=64, num_heads=4)
    dense = save(copy.deepcopy(loaded.model), tmp_path / "dense", {})
    model, _, _ = _run(loaded, _passes({"pass": "nm_oneshot"}))
    sparse = save(model, tmp_path / "sparse", {})
    size = {k: (p / "model.safetensors").stat().st_size for k, p in (("dense", dense), ("sparse", sparse))}
    targets = sum(m.weight.numel() for _, m in _masked(model))
    # oracle: each 2:4 target weight goes from 4 bytes to 2 (values) + 0.125 (2-bit positions)
    assert size["dense"] - size["sparse"] >= 0.45 * targets * 4


def test_step_reports_the_switch_and_validates_fields():
    loaded = tiny_timm()
    _, records, _ = _run(loaded, _passes({"pass": "step", "steps": 6, "t_max": 3}))
    assert records[0]["info"]["switch_step"] == 3 and len(records[0]["info"]["variance_change"]) == 3
    for bad, message in [
        ({"n": 4, "m": 4}, "0 < n < m"),
        ({}, "t_max is required"),
        ({"t_max": 2, "t_min": 2}, "t_min < t_max"),
    ]:
        with pytest.raises(UserError, match=message):
            _passes({"pass": "step", **bad})
    with pytest.raises(UserError, match="must be below the training steps"):
        _run(loaded, _passes({"pass": "step", "steps": 3, "t_max": 3}))


def _odd_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 59), nn.GELU(), nn.Linear(59, 8), nn.GELU(), nn.Linear(8, 4))
    return LoadedModel(model, "test:mlp", "image", {"kind": "test"}, {})


def test_inputs_not_a_multiple_of_m_are_refused_when_named_and_skipped_when_matched():
    loaded = _odd_model()
    batches = [torch.randn(4, 16)]
    ctx = make_context(batches, loaded.call, torch.device("cpu"))
    with pytest.raises(UserError, match="2: in_features 59 is not a multiple of m=4"):
        run(copy.deepcopy(loaded.model), _passes({"pass": "nm_oneshot", "targets": ["2"]}), ctx)
    model, records = run(copy.deepcopy(loaded.model), _passes({"pass": "nm_oneshot"}), ctx)
    assert any("2: in_features 59 is not a multiple of m=4; left dense" in n for n in records[0]["notes"])
    assert [n for n, _ in _masked(model)] == ["0", "4"]


def test_ptq_after_nm_keeps_zeros_and_exports_2to4(tmp_path):
    loaded = tiny_timm("vit_tiny_patch16_224", embed_dim=64, num_heads=4)
    model, _, _ = _run(loaded, _passes({"pass": "nm_oneshot"}, {"pass": "uniform_ptq"}))
    for _, layer in _masked(model):
        mask = layer.weight_chain[0].mask
        assert isinstance(layer.weight_chain[0], NMMask) and layer.weight_quantizer() is not None
        assert bool((layer.effective_weight()[~mask] == 0).all())  # exact zeros after INT8 fake-quant
    compressed = LoadedModel(model.eval(), loaded.spec, loaded.kind, loaded.base, loaded.data_cfg)
    record = export_verified(compressed, tmp_path / "m.onnx", samples=16, batch=4)
    assert record["verification"]["passed"], record["verification"]["failures"]
    import onnx

    sparse, total = weights_2to4(onnx.load(str(tmp_path / "m.onnx")))
    assert sparse == 8 and total >= 8  # every 2:4 target keeps its pattern in the integer weights


def test_nm_cannot_follow_quantization():
    with pytest.raises(UserError, match="'nm_oneshot' cannot follow passes\\[0\\] 'uniform_ptq'"):
        _passes({"pass": "uniform_ptq"}, {"pass": "nm_oneshot"})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_semi_structured_2to4_matches_the_masked_dense_layer():
    """Oracle: the same 2:4 layer computed densely in fp16 (tolerance: fp16 rounding, 1e-2)."""
    from edgecompress.sparsity.nm.cuda import accelerate_2to4

    loaded = tiny_timm("vit_tiny_patch16_224", embed_dim=256, num_heads=4)
    model, _, x = _run(loaded, _passes({"pass": "nm_oneshot"}))
    model = model.cuda().half().eval()
    with torch.inference_mode():
        ref = model(x.cuda().half())
        report = accelerate_2to4(model, probe=False)
        out = model(x.cuda().half())
    assert report and all(v.startswith(("sparse", "dense (")) for v in report.values())
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=1e-2)
