"""Every ordered pair of registered passes, on a tiny timm ViT and a tiny HF BERT: it either works
(the model runs, saves, restores to bit-identical outputs, exports and verifies) or the recipe
order check refuses it in one line naming both passes. Oracles: the compressed model itself
(restore, exact) and the export verification bounds of :mod:`edgecompress.export.verify`.

Passes run with quick settings (:data:`QUICK`) so the cross product fits CI; the settings change
how long a search runs, not which code runs.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from edgecompress.calib import make_context
from edgecompress.errors import UserError
from edgecompress.export.deploy import export_verified
from edgecompress.export.inputs import as_batch, synthetic
from edgecompress.models.loading import LoadedModel, load_model, restore
from edgecompress.pipeline import PASSES, check_order, load_builtin_passes, run
from edgecompress.recipe import recipe_from_dict
from edgecompress.structure import save
from edgecompress.train import TrainConfig
from tests.conftest import tiny_timm

load_builtin_passes()
QUICK = {  # fields per pass that keep a run to seconds on a tiny model
    "adalog": {"search_rounds": 1, "max_tokens": 64, "calib_samples": 8},
    "repq_vit": {"search_rounds": 1, "max_tokens": 64, "calib_samples": 8},
    "dopq_vit": {"search_rounds": 1, "max_tokens": 64, "calib_samples": 8},
    "asp": {"steps": 2},
    "sr_ste": {"steps": 2},
    "step": {"steps": 4, "t_max": 2},
    "acm": {"distill_steps": 2, "gate_steps": 2},
    "prune_structured": {"curve_points": 3, "budget": {"params": 0.3}},
    "seer_attention": {"block": 16, "keep_first": False},  # 17 ViT tokens: 2 blocks, 1 kept per row
}
PAIRS = list(itertools.product(sorted(PASSES), repeat=2))


def _entry(name: str, **extra) -> dict:
    return {"pass": name, **QUICK.get(name, {}), **extra}


def _pass(name: str, **extra):
    return recipe_from_dict({"passes": [_entry(name, **extra)]}).passes[0]


@pytest.fixture(scope="module")
def models(tiny_bert_dir):
    vit = tiny_timm("vit_tiny_patch16_224", embed_dim=36, num_heads=3, mlp_ratio=2.0, num_classes=7)
    return {"timm-vit": vit, "hf-bert": load_model(f"hf:{tiny_bert_dir}")}


def _batches(loaded: LoadedModel) -> list:
    if loaded.kind == "image":
        return [as_batch(loaded, synthetic(loaded, 4, seed=50 + i)) for i in range(2)]
    from edgecompress.data.specs import load_data

    return load_data("text", loaded, "train", samples=8, batch_size=4).batches


def _works(loaded: LoadedModel, passes: list, tmp_path) -> None:
    batches = _batches(loaded)
    model = copy.deepcopy(loaded.model)
    ctx = make_context(
        batches, loaded.call, torch.device("cpu"), kind=loaded.kind, train=TrainConfig(steps=2, batch_size=4)
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, records = run(model, passes, ctx)
    finally:
        torch.set_num_threads(threads)
    assert [r["pass"] for r in records] == [p.name for p in passes]
    out = save(model, tmp_path / "out", {"report.json": {"passes": records}})
    back = restore(out)
    with torch.no_grad():
        ref = loaded.call(model, batches[0])
        assert torch.isfinite(ref).all()
        assert torch.equal(loaded.call(back, batches[0]), ref)
    compressed = LoadedModel(
        model.eval(), loaded.spec, loaded.kind, loaded.base, loaded.data_cfg, loaded.tokenizer_dir
    )
    record = export_verified(compressed, tmp_path / "m.onnx", samples=16, batch=4)
    assert record["verification"]["passed"], record["verification"]["failures"]


@pytest.mark.parametrize("model_name", ["timm-vit", "hf-bert"])
@pytest.mark.parametrize("first,second", PAIRS, ids=[f"{a}-then-{b}" for a, b in PAIRS])
def test_pass_pair_works_or_is_refused(first, second, model_name, models, tmp_path):
    passes = [_pass(first), _pass(second)]
    try:
        check_order(passes)
    except UserError as e:
        assert f"{second!r} cannot follow" in str(e) and repr(first) in str(e) and "\n" not in str(e)
        with pytest.raises(UserError, match="cannot follow"):  # the recipe parser refuses it too
            recipe_from_dict({"passes": [_entry(first), _entry(second)]})
        return
    _works(models[model_name], passes, tmp_path)


def test_mixed_precision_split_by_targets_works(models, tmp_path):
    """Two quantization passes on disjoint layers: 8-bit head, AdaLog W4A4 elsewhere."""
    head = _pass("uniform_ptq", targets=["head"], quantize_attention=False)
    rest = _pass("adalog", ignore=["head"])
    _works(models["timm-vit"], [head, rest], tmp_path)


def test_overlapping_targets_stop_at_the_first_quantized_layer(models):
    loaded = models["timm-vit"]
    passes = [_pass("uniform_ptq", targets=["head"]), _pass("adalog")]  # uniform also took attention
    ctx = make_context(_batches(loaded), loaded.call, torch.device("cpu"))
    with pytest.raises(UserError, match="already quantized by an earlier pass"):
        run(copy.deepcopy(loaded.model), passes, ctx)
