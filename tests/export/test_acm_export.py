"""ACM export: the gate in the graph, the same per-token decisions and outputs in ONNX Runtime.

Oracle: the PyTorch module in eval mode (its reference form). Tolerances: float32 graphs, 2e-5
absolute on outputs of size ~1 (one wrong decision would move a row by a whole learner's
contribution, ~0.1-1, so any flipped ``k`` fails).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from edgecompress.export.forms import ExportOptions, export_module, to_export_form
from edgecompress.export.forms.acm import ACMExport, ACMSkipExport
from edgecompress.export.onnx import export_onnx
from edgecompress.export.verify import verify_onnx
from edgecompress.models.loading import LoadedModel
from edgecompress.sparsity.acm.modules import ACMMLP
from edgecompress.sparsity.acm.sites import build_acm, find_sites, install
from tests.export.models import tiny_vit_odd

ort = pytest.importorskip("onnxruntime")
ATOL = 2e-5


def _acm(gated: bool, act: str, seed: int) -> ACMMLP:
    torch.manual_seed(seed)
    m = ACMMLP(20, 13, 4, 6, 8, act=act, gated=gated).eval()  # d 20, 4 learners of 6, d_out 13
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    return m


def _ort(module: nn.Module, x: torch.Tensor, path) -> np.ndarray:
    with torch.no_grad():
        torch.onnx.export(
            module, (x,), str(path), dynamo=True, input_names=["x"],
            dynamic_shapes={"x": {0: torch.export.Dim("T")}},
        )  # fmt: skip
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x.numpy()})[0]


def _force(acm: ACMMLP, k: int) -> ACMMLP:
    """Make the gate choose ``k`` for every token (a large bias on that choice)."""
    acm = copy.deepcopy(acm)
    with torch.no_grad():
        acm.gate.fc2.bias.zero_()
        acm.gate.fc2.bias[k - acm.k_min] = 1e4
    return acm


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
@pytest.mark.parametrize(("gated", "act"), [(False, "gelu"), (True, "silu")])
def test_ort_matches_pytorch_decisions_and_outputs(target, gated, act, tmp_path):
    acm = _acm(gated, act, seed=3)
    x = torch.randn(97, 20)  # odd token count
    ks = acm.choose(x)
    assert len(set(ks.tolist())) >= 3, "the test needs a mix of choices"
    cases = {"mixed": acm, "k=0": _force(acm, 0), "k=L": _force(acm, 4)}
    for name, mod in cases.items():
        form = export_module(mod, ExportOptions(target=target))
        assert isinstance(form, ACMSkipExport if target == "onnxruntime" else ACMExport)
        with torch.no_grad():
            want = mod(x).numpy()
            np.testing.assert_allclose(form(x).numpy(), want, atol=ATOL, err_msg=f"{name}: form vs module")
        got = _ort(form, x, tmp_path / f"{name}.onnx")
        np.testing.assert_allclose(got, want, atol=ATOL, err_msg=f"{name}: ORT vs PyTorch")


def test_fixed_k_exports_without_a_gate_decision(tmp_path):
    acm = _acm(False, "gelu", seed=5)
    acm.fixed_k = 2
    x = torch.randn(31, 20)
    with torch.no_grad():
        want = acm(x).numpy()
        ref = acm.execute(x, torch.full((31,), 2)) + acm.bias2
    np.testing.assert_allclose(want, ref.numpy(), atol=ATOL)
    got = _ort(export_module(acm, ExportOptions()), x, tmp_path / "fixed.onnx")
    np.testing.assert_allclose(got, want, atol=ATOL)


def _acm_vit() -> LoadedModel:
    """The tiny ViT with both MLPs as (untrained-gate) ACMs: random gates give mixed choices."""
    loaded = tiny_vit_odd()
    model = copy.deepcopy(loaded.model)
    torch.manual_seed(1)
    sample = torch.randn(64, 36)
    for site in find_sites(model):
        acm = build_acm(site, 4, None, 0, sample)
        with torch.no_grad():
            acm.gate.fc2.weight.normal_(0, 1.0)
        install(model, site, acm)
    return LoadedModel(model.eval(), loaded.spec, loaded.kind, loaded.base, loaded.data_cfg)


def test_model_export_verifies_and_says_it_skips(tmp_path):
    loaded = _acm_vit()
    res = export_onnx(loaded, tmp_path / "acm.onnx", batch=2)
    assert res.forms == {"ACMSkipExport": 2}
    assert res.dynamic["ACMSkipExport"].startswith("skips compute")
    v = verify_onnx(loaded, res.path, samples=16)
    assert v["passed"], v["failures"]
    assert v["metrics"]["cosine_min"] > 0.99999


def test_tensorrt_target_computes_densely_masked():
    loaded = _acm_vit()
    form, counts = to_export_form(loaded.model, ExportOptions(target="tensorrt"))
    assert counts == {"ACMExport": 2}
    assert ACMExport.COMPUTE.startswith("computes densely, masked")
