"""Every listed architecture family prunes, saves, restores and exports (tiny models built in code).

Oracles and tolerances:

* shrinking against the unpruned model with the removed units' output columns zeroed (DESIGN §10):
  float64, max abs difference ≤ 1e-10 of the output scale, uneven heads per layer, a removed branch;
  fewer parameters, exactly the removed units' parameters fewer when no branch goes;
* the pass's output folder restored against the in-memory pruned model: bit-identical (torch.equal);
* the exported ONNX file against the pruned PyTorch model: the float verification bounds of
  :mod:`edgecompress.export.verify`;
* least-squares recovery against the same model before the refit: the model-output error on the
  calibration data (measured by the pass) drops, no layer's fitted error grows and their sum drops.
"""

from __future__ import annotations

import copy

import pytest
import torch

from edgecompress.calib import make_context
from edgecompress.data.specs import load_data
from edgecompress.export.deploy import export_verified
from edgecompress.export.inputs import as_batch, synthetic
from edgecompress.models.loading import LoadedModel, load_model, restore
from edgecompress.pipeline import run
from edgecompress.prune import PruneStructured
from edgecompress.prune.groups import find_groups, unit_params
from edgecompress.prune.shrink import out_bias, remove_branch, shrink, zero_units
from edgecompress.structure import save
from tests.conftest import tiny_timm

SMALL = {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 4}
TIMM = {
    "timm-vit": ("vit_tiny_patch16_224", {"mlp_ratio": 2.0}),
    "timm-deit": ("deit_tiny_distilled_patch16_224", {}),
    "timm-swin": ("swin_tiny_patch4_window7_224", {}),
    "timm-eva": ("eva02_tiny_patch14_224", SMALL),  # RoPE, fused GluMlp (SwiGLU), explicit form when pruned
}
HF = {"hf-bert": "tiny_bert_dir", "hf-vit": "tiny_hf_vit_dir", "hf-llama": "tiny_llama_dir"}
FAMILIES = list(TIMM) + list(HF)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU is shared: small multi-threaded ops wait for descheduled threads
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def family(request):
    def build(name: str) -> LoadedModel:
        if name in TIMM:
            arch, kw = TIMM[name]
            return tiny_timm(arch, **kw)
        return load_model(f"hf:{request.getfixturevalue(HF[name])}")

    return build


def _batches(loaded: LoadedModel, n: int = 2) -> list:
    if loaded.kind == "image":
        return [as_batch(loaded, synthetic(loaded, 4, seed=70 + i)) for i in range(n)]
    return load_data("text", loaded, "train", samples=4 * n, batch_size=4).batches  # padded texts


def _out(loaded: LoadedModel, model, batch) -> torch.Tensor:
    with torch.no_grad():
        return loaded.call(model, batch)


def _keeps(groups, remove_one: bool) -> dict[str, list[int]]:
    """Uneven kept units: group i keeps a different, non-prefix subset; optionally one branch goes."""
    out = {}
    for i, g in enumerate(groups):
        k = max(1, g.units * (1 + i % 3) // 4)
        out[g.name] = sorted(range(g.units - 1, -1, -2 - i % 2))[:k] or [0]
    if remove_one:
        out[groups[-1].name] = []
    return out


@pytest.mark.parametrize("remove_one", [False, True], ids=["uneven", "with-a-branch-removed"])
@pytest.mark.parametrize("name", FAMILIES)
def test_shrunk_equals_zeroed_in_float64(name, remove_one, family):
    loaded = family(name)
    model = loaded.model.double().eval()
    ref, dense = copy.deepcopy(model), copy.deepcopy(model)
    groups = [g for g in find_groups(model) if g.why is None]
    keeps = _keeps(groups, remove_one)
    before = sum(p.numel() for p in model.parameters())
    expect = before - sum((g.units - len(keeps[g.name])) * unit_params(model, g) for g in groups)
    for g in groups:
        zero_units(ref, g, keeps[g.name])
        if keeps[g.name]:
            shrink(model, g, keeps[g.name])
        else:
            remove_branch(model, g, out_bias(model.get_submodule(g.out)))
    after = sum(p.numel() for p in model.parameters())
    assert after < before and (remove_one or after == expect)
    batch = _batches(loaded, 1)[0]  # text: padded rows included
    batch = batch if isinstance(batch, dict) else batch.double()
    want, got = _out(loaded, ref, batch), _out(loaded, model, batch)
    assert (want - got).abs().max() <= 1e-10 * want.abs().max()
    assert (want - _out(loaded, dense, batch)).abs().max() > 1e-3 * want.abs().max()  # really pruned


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_prunes_saves_restores_and_exports(name, family, tmp_path):
    loaded = family(name)
    batches = _batches(loaded)
    ctx = make_context(batches, loaded.call, torch.device("cpu"), kind=loaded.kind)
    p = PruneStructured(allocation="uniform", budget={"params": 0.4}, round_to=4)
    model, records = run(copy.deepcopy(loaded.model), [p], ctx)
    info = records[0]["info"]["prune"]
    assert 0.4 <= info["removed"] < 0.75
    assert any(0 < r["kept"] < r["units"] for r in info["groups"] if r["kind"] == "heads")  # heads really go
    rec = info["recovery"]
    assert rec["output_error"] < rec["output_error_before_lstsq"]  # measured on the calibration data
    assert all(v["after"] <= v["before"] * (1 + 1e-9) + 1e-12 for v in rec["layers"].values())
    assert sum(v["after"] for v in rec["layers"].values()) < sum(v["before"] for v in rec["layers"].values())
    back = restore(save(model, tmp_path / "out", {"report.json": {"passes": records}}))
    assert torch.equal(_out(loaded, back, batches[0]), _out(loaded, model, batches[0]))
    pruned = LoadedModel(
        model.eval(), loaded.spec, loaded.kind, loaded.base, loaded.data_cfg, loaded.tokenizer_dir
    )
    record = export_verified(pruned, tmp_path / "m.onnx", samples=8, batch=4)
    assert record["verification"]["passed"], record["verification"]["failures"]
