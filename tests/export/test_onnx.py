"""Export to ONNX and verification (oracle: the eager model on the same inputs; thresholds and
their reasons in :mod:`edgecompress.export.verify`: mean cosine ≥ 0.999, top-1 agreement ≥ 99.5 %,
each sample's cosine ≥ 0.999 (float graphs, also max-abs ≤ 1e-3 · max |output|); quantized graphs:
at most 1 + n // 100 samples below cosine 0.99)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from edgecompress.errors import UserError
from edgecompress.export.deploy import export_verified, verification_path
from edgecompress.export.forms import register_form
from edgecompress.export.runtime import optimized_ops, resolve_weight_dtype, u8s8_saturates
from edgecompress.export.verify import _judge, check_verification, verify_onnx
from edgecompress.models.loading import LoadedModel
from edgecompress.models.slots import SlotLinear
from tests.export.conftest import float_models
from tests.export.models import compressed, negated_head, tiny_bert_synthetic

SAMPLES = 16


@pytest.mark.parametrize("name", ["timm-vit", "timm-swin", "hf-bert"])  # the demo: test_cli_export
def test_float_models_export_and_verify(name, tiny_bert_dir, exported):
    loaded = float_models(tiny_bert_dir)[name]()
    res, model = exported(name, loaded)
    assert res.exporter == "dynamo" and res.fallback_reason is None
    assert res.qdq["QuantizeLinear"] == 0 and not res.quantized
    assert [i.name for i in model.graph.input] == res.inputs
    v = verify_onnx(loaded, res.path, samples=SAMPLES)
    assert v["passed"], v["failures"]
    assert v["metrics"]["samples"] == SAMPLES


def _dq_weights(model) -> list:
    inits = {i.name: i for i in model.graph.initializer}
    return [
        (n, inits[n.input[0]])
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits
    ]


@pytest.mark.parametrize("fixture,bits", [("vit_w8a8", 8), ("vit_w4a4", 4)])
def test_uniform_ptq_becomes_int8_qdq(fixture, bits, request, exported):
    loaded = request.getfixturevalue(fixture)
    res, model = exported(fixture, loaded)  # weight dtype auto: the one that is exact on this CPU
    assert res.weight_dtype == ("uint8" if u8s8_saturates() else "int8")
    linears = [m for m in loaded.model.modules() if isinstance(m, SlotLinear)]
    weights = _dq_weights(model)
    assert res.qdq["integer_weight_initializers"] == len(weights) == len(linears)
    lo = 0 if res.weight_dtype == "uint8" else -(2 ** (bits - 1))  # the b-bit grid inside the 8-bit type
    for node, init in weights:
        codes = numpy_helper.to_array(init)
        assert init.data_type == (TensorProto.UINT8 if res.weight_dtype == "uint8" else TensorProto.INT8)
        assert {a.name: a.i for a in node.attribute}.get("axis") == 1  # output channels of [in, out]
        assert codes.min() >= lo and codes.max() <= lo + 2**bits - 1
    assert res.qdq["QuantizeLinear"] > 0 and res.qdq["matmuls_with_dq_inputs"] >= len(linears)
    v = verify_onnx(loaded, res.path, samples=SAMPLES)
    assert v["passed"], v["failures"]


@pytest.mark.parametrize("recipe", ["adalog_w4a4", "repq_vit_w4a4", "dopq_vit_w4a4"])
def test_non_uniform_quantizers_export_as_table_lookups(recipe, vit, exported):
    quick = ("passes.0.search_rounds=1", "passes.0.max_tokens=256")
    loaded = compressed(vit, recipe, quick)
    res, model = exported(recipe, loaded)
    assert res.forms.get("LUTQuantizer", 0) >= 1  # the softmax quantizers (log2 / log√2 / AdaLog / TanQ)
    assert any(n.op_type in ("Gather", "GatherND") for n in model.graph.node)
    v = verify_onnx(loaded, res.path, samples=SAMPLES)
    assert v["passed"], v["failures"]


def test_compare_bounds_a_segment_at_every_quantizer_code_tables_included(vit, exported, tmp_path):
    """Oracle: the PyTorch model, segment by segment (float rounding ≤ 1e-5); then the AdaLog table
    of one fc2 input scaled by 1.3 in the file: the departure is the next quantizer, upstream agrees."""
    import onnx

    from edgecompress.export.compare import compare_layers
    from edgecompress.export.inputs import sample_batches

    loaded = compressed(vit, "adalog_w4a4", ("passes.0.search_rounds=1", "passes.0.max_tokens=256"))
    res, model = exported(
        "adalog_w4a4", loaded
    )  # the file of test_non_uniform_quantizers_export_as_table_lookups
    batches, _ = sample_batches(loaded, 8, 2)
    clean = compare_layers(loaded, res.path, batches)
    rows = {r["module"]: r for r in clean["layers"]}
    lut = "blocks.0.mlp.fc2.input_chain.0"  # AdaLog post-GELU: a code table, no QuantizeLinear
    assert {lut, "blocks.0.attn.ec_attn.probs.0", "blocks.0.attn.qkv.input_chain.0"} <= set(rows)
    assert clean["first_departure"] is None
    assert (
        max(r["segment_rel_err"] for r in clean["layers"]) < 1e-5
    )  # 4-bit Clip compared before it, on both sides
    tampered = onnx.ModelProto()
    tampered.CopyFrom(model)
    init = next(i for i in tampered.graph.initializer if i.name == f"model.{lut}.scale")
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.3), init.name))
    onnx.save(tampered, str(tmp_path / "bad.onnx"))
    bad = compare_layers(loaded, tmp_path / "bad.onnx", batches)
    assert bad["first_departure"]["module"] == "blocks.1.attn.qkv.input_chain.0"
    assert {r["module"]: r for r in bad["layers"]}[lut]["segment_rel_err"] < 1e-5  # its own input agrees


def test_onnxruntime_runs_every_matmul_in_int8(vit_w8a8, exported):
    res, _ = exported("vit_w8a8", vit_w8a8)
    ops = optimized_ops(res.path)
    assert sum(ops["integer_kernels"].values()) == res.qdq["matmuls"], ops
    assert ops["float_matmuls"] == 0


def test_shared_qdq_pairs_get_one_per_consumer(exported):
    bert = compressed(tiny_bert_synthetic(), "uniform_w8a8")  # q/k/v projections share one input
    res, model = exported("bert_w8a8", bert)
    users = {}
    for n in model.graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert users.get(n.output[0], 0) == 1, n.name
    assert optimized_ops(res.path)["float_matmuls"] == 0
    assert verify_onnx(bert, res.path, samples=SAMPLES)["passed"]


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_int8_weights_are_exact_only_where_u8s8_kernels_do_not_saturate(dtype, vit_w8a8, exported):
    """Oracle: the PyTorch model. UINT8 weights (u8×u8 kernels) verify on every CPU; INT8 weights
    (u8×s8) verify exactly where :func:`u8s8_saturates` says this CPU has VNNI, and fail where it
    has not (full-range 8-bit weights saturate the int16 pair sums of VPMADDUBSW)."""
    res, model = exported(f"vit_w8a8_{dtype}", vit_w8a8, weight_dtype=dtype)
    assert res.weight_dtype == dtype and res.weight_dtype_reason == "asked for"
    v = verify_onnx(vit_w8a8, res.path, samples=SAMPLES)
    assert v["passed"] == (dtype == "uint8" or not u8s8_saturates()), v["metrics"]


def test_saturation_rule():
    assert u8s8_saturates(["avx", "avx2", "fma"], "x86_64")  # AVX2 only: VPMADDUBSW
    assert u8s8_saturates(["avx512f", "avx512bw"], "x86_64")  # AVX-512 without VNNI
    assert not u8s8_saturates(["avx2", "avx_vnni"], "x86_64")
    assert not u8s8_saturates(["avx512f", "avx512_vnni"], "AMD64")
    assert not u8s8_saturates(["asimd", "asimddp"], "aarch64")
    with pytest.raises(UserError, match="TensorRT needs INT8"):
        resolve_weight_dtype("uint8", "tensorrt")
    assert resolve_weight_dtype("auto", "tensorrt")[0] == "int8"


def test_torchscript_exporter_gives_the_same_qdq_graph(vit_w8a8, exported):
    res, model = exported("vit_w8a8_ts", vit_w8a8, exporter="torchscript")
    assert res.exporter == "torchscript"
    assert (
        res.qdq["integer_weight_initializers"]
        == exported("vit_w8a8", vit_w8a8)[0].qdq["integer_weight_initializers"]
    )
    assert verify_onnx(vit_w8a8, res.path, samples=SAMPLES)["passed"]


def test_verification_of_a_different_model_fails(vit_w8a8, exported):
    res, _ = exported("vit_w8a8", vit_w8a8)
    wrong = negated_head(vit_w8a8)
    v = verify_onnx(wrong, res.path, samples=SAMPLES)
    assert not v["passed"] and v["failures"]
    with pytest.raises(UserError, match="verification failed"):
        check_verification(v)


@pytest.mark.parametrize(
    "quantized,cos_min,below,cos_mean,top1,passes",
    [
        (True, 0.9984, 0, 0.99995, 100.0, True),  # one sample moved a little by a boundary flip
        (True, 0.94, 1, 0.9998, 100.0, True),  # one flip cascade (measured on adalog W4A4)
        (True, 0.94, 2, 0.9998, 100.0, False),  # two of 64 is no longer rare
        (True, 0.995, 0, 0.998, 100.0, False),  # every sample a little off
        (True, 0.9999, 0, 0.99999, 99.0, False),  # top-1 disagreements
        (False, 0.9984, 0, 0.99995, 100.0, False),  # float graphs: no rounding boundaries to excuse
    ],
)
def test_verification_bounds(quantized, cos_min, below, cos_mean, top1, passes):
    m = {"samples": 64, "cosine_min": cos_min, "samples_below_cosine_floor": below, "cosine_mean": cos_mean,
         "top1_agreement": top1, "max_abs_error": 0.0, "max_abs_output": 1.0}  # fmt: skip
    assert (not _judge("image", m, quantized)) == passes


class _Mark(nn.Module):
    def forward(self, x):
        return x


class _Wrong(nn.Module):
    def forward(self, x):
        return -x


def test_a_faulty_export_form_is_caught_and_its_file_removed(vit, tmp_path, monkeypatch):
    from edgecompress.export import forms

    monkeypatch.setitem(forms.FORMS, _Mark, forms.registry.Form(lambda mod, opts: _Wrong(), "float"))
    model = nn.Sequential(vit.model, _Mark())
    loaded = LoadedModel(model, vit.spec, "image", vit.base, vit.data_cfg)
    out = tmp_path / "m.onnx"
    with pytest.raises(UserError, match="verification failed"):
        export_verified(loaded, out, samples=8, batch=4)
    assert not out.exists() and verification_path(out).is_file()


def test_registered_form_is_used():
    from edgecompress.export.forms import FORMS, export_module

    class Q(nn.Module):
        pass

    factory = register_form(Q, "quantized")(lambda mod, opts: _Wrong())  # the decorator returns it
    try:
        assert isinstance(export_module(Q()), _Wrong) and callable(factory)
        with pytest.raises(ValueError, match="category"):
            register_form(Q, "approximate")
    finally:
        FORMS.pop(Q)


def test_dynamic_batch_graph_accepts_other_batch_sizes(vit_w8a8, exported):
    from edgecompress.export.runtime import ort_session

    res, model = exported("vit_w8a8_dyn", vit_w8a8, dynamic_batch=True)
    assert res.batch == "dynamic"
    sess = ort_session(res.path)
    for b in (1, 5):
        x = np.random.default_rng(0).standard_normal((b, 3, 16, 16)).astype(np.float32)
        assert sess.run(None, {"pixel_values": x})[0].shape == (b, 7)


def test_top1_counts_only_samples_the_reference_decides():
    from edgecompress.export.verify import TOP1_MARGIN, _compare, decided_top1

    ref = torch.tensor(
        [
            [5.0, 1.0, 0.0, -1.0],  # clear winner: margin 4 of range 6
            [1.0, 0.99, 0.0, -1.0],  # near tie: margin 0.01 < 2 % of range 2
            [2.0, 0.0, 1.0, -2.0],  # margin 1 of range 4
        ]
    )
    assert decided_top1(ref).tolist() == [True, False, True]
    out = ref.clone()
    out[1, :2] = torch.tensor([0.99, 1.0])  # the near tie flips: not counted
    assert _compare("image", ref, out, None)["top"] == (2, 2, 1)
    out[2] = torch.tensor([0.0, 0.0, 3.0, -2.0])  # a decided sample flips: counted
    assert _compare("image", ref, out, None)["top"] == (1, 2, 1)
    # the rule's edge: a margin of exactly TOP1_MARGIN × range decides
    edge = torch.tensor([[1.0, 1.0 - TOP1_MARGIN * 2.0, -1.0]])
    assert decided_top1(edge).tolist() == [True]
