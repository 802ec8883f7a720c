"""SmoothQuant in ``uniform_ptq`` (:mod:`edgecompress.quantize.smooth`). Oracles: the paper's
formula on hand values; the smoothed float model equals the original (float32 rounding, 1e-5 of
the output scale); the chosen Linears are the architecture's post-norm ones (QKV and FC1); on a
layer with an outlier input channel the W8A8 output error drops (measured ratio); save/restore and
the verified ONNX export of a smoothed model on tiny odd-sized HF BERT / timm ViT."""

from __future__ import annotations

import copy

import pytest
import torch

from edgecompress.calib import make_context
from edgecompress.errors import UserError
from edgecompress.export.deploy import export_verified
from edgecompress.export.inputs import as_batch, synthetic
from edgecompress.models.loading import restore
from edgecompress.models.slots import slot_linears
from edgecompress.pipeline import run
from edgecompress.quantize.ptq import UniformPTQ
from edgecompress.quantize.smooth import ChannelScale, smooth_, smoothing_factors
from edgecompress.quantize.uniform import params_from_range, quantize_uniform, weight_params
from edgecompress.structure import save
from tests.conftest import tiny_timm
from tests.export.models import compressed, tiny_bert_synthetic, tiny_vit_odd


def test_factors_are_the_papers_formula():
    x = torch.tensor([4.0, 0.0, 9.0, 1.0])
    w = torch.tensor([[1.0, 2.0, -4.0, 0.0], [-0.25, 1.0, 1.0, 0.0]])  # column maxima 1, 2, 4, 0
    s = smoothing_factors(x, w, 0.5)
    assert torch.allclose(s[[0, 2]], torch.tensor([4.0**0.5 / 1.0**0.5, 9.0**0.5 / 4.0**0.5]))
    assert s[1] == 1.0 and s[3] == 1.0  # a silent channel / an all-zero column keeps s = 1
    assert torch.allclose(smoothing_factors(x, w, 1.0)[0], torch.tensor(4.0))  # α = 1: all into W


def _batches(loaded, n=3):
    return [as_batch(loaded, synthetic(loaded, 3, seq=13, seed=7 + i)) for i in range(n)]


@pytest.mark.parametrize(
    "make,post_norm",
    [
        (tiny_bert_synthetic, ("attention.self.query", "attention.self.key", "attention.self.value",
                               "intermediate.dense")),
        (tiny_vit_odd, ("attn.qkv", "mlp.fc1")),
    ],
)  # fmt: skip
def test_smoothing_alone_is_exact_and_finds_the_post_norm_linears(make, post_norm):
    loaded = make()
    model = copy.deepcopy(loaded.model)
    batches = _batches(loaded)
    names, _ = slot_linears(model, ("Linear",), ())
    ctx = make_context(batches, loaded.call, torch.device("cpu"))
    chosen = smooth_(model, names, ctx, 0.5, "post_norm")
    assert sorted(chosen) == sorted(n for n in names if n.endswith(post_norm))
    assert len(chosen) == 2 * len(post_norm)  # two blocks
    first = [n for n in chosen if ".0." in n or "layer.0." in n]
    shared = [model.get_submodule(n).input_chain[0].scale for n in first if not n.endswith(("fc1", "dense"))]
    assert shared and all(torch.equal(t, shared[0]) for t in shared)  # q, k, v: one s per norm output
    with torch.no_grad():
        for b in batches:
            ref, out = loaded.call(loaded.model, b), loaded.call(model, b)
            assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert len(smooth_(copy.deepcopy(loaded.model), [], ctx, 0.5, "all")) == 0


def _w8a8_error(x: torch.Tensor, w: torch.Tensor) -> float:
    scale, zp = params_from_range(x.min(), x.max(), 8, False)
    xq = (quantize_uniform(x, scale, zp, 8) - zp) * scale
    ws, wz = weight_params(w, 8, False)
    wq = (quantize_uniform(w, ws, wz, 8) - wz) * ws
    return float((xq @ wq.t() - x @ w.t()).norm() / (x @ w.t()).norm())


def test_smoothing_lowers_the_w8a8_error_of_an_outlier_channel():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(97, 59, generator=gen)
    x[:, 5] *= 60.0  # one outlier channel, as LayerNorm outputs of BERT-like models have
    w = torch.randn(31, 59, generator=gen) / 8
    s = smoothing_factors(x.abs().amax(0), w, 0.5)
    plain, smooth = _w8a8_error(x, w), _w8a8_error(x / s, w * s)
    assert smooth < 0.5 * plain  # measured: 0.0071 vs 0.0347


def test_uniform_ptq_smooth_fields_are_checked():
    with pytest.raises(UserError, match="smooth_alpha"):
        UniformPTQ(smooth_alpha=1.5)
    with pytest.raises(UserError, match="smooth_targets"):
        UniformPTQ(smooth_alpha=0.5, smooth_targets="mlp")


def test_smoothed_w8a8_quantizes_after_the_scale_and_exports(tmp_path):
    bert = tiny_bert_synthetic()
    q = compressed(
        bert, "uniform_w8a8_openvino", ("passes.0.smooth_alpha=0.8", "passes.0.smooth_targets=post_norm")
    )
    scales = [m for m in q.model.modules() if isinstance(m, ChannelScale)]
    assert len(scales) == 2 * 2 * 4  # input and weight, 4 post-norm Linears per layer, 2 layers
    query = q.model.get_submodule("encoder.layer.0.attention.self.query")
    assert isinstance(query.input_chain[0], ChannelScale) and query.input_chain[-1].SLOT_KIND == "quantizer"
    assert isinstance(query.weight_chain[0], ChannelScale)
    rec = export_verified(q, tmp_path / "sq.onnx", "onnx", batch=3, samples=12)
    assert rec["verification"]["passed"], rec["verification"]["failures"]


def test_smoothed_model_restores_bit_identical(tmp_path):
    loaded = tiny_timm()
    batches = [torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))]
    ctx = make_context(batches, loaded.call, torch.device("cpu"))
    model, records = run(loaded.model, [UniformPTQ(smooth_alpha=0.5)], ctx)
    assert sum(isinstance(m, ChannelScale) for m in model.modules()) == 2 * 2 * 2  # qkv, fc1 × 2 blocks
    out = save(model, tmp_path / "out", {"report.json": {"passes": records}})
    back = restore(out)
    with torch.no_grad():
        assert torch.equal(loaded.call(model, batches[0]), loaded.call(back, batches[0]))
