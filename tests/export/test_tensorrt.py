"""TensorRT readiness (oracle: TensorRT's documented explicit-quantization rules — INT8 Q/DQ with
zero-point 0, per-tensor activations — and the ONNX-TensorRT supported-op list). The engine build
itself is not tested: TensorRT cannot be installed here."""

from __future__ import annotations

import importlib.util

import onnx
import pytest
import torch
from onnx import helper
from torch import nn

from edgecompress.cli import main
from edgecompress.errors import UserError
from edgecompress.export.deploy import export_verified, tensorrt_record
from edgecompress.export.runtime import u8s8_saturates
from edgecompress.export.tensorrt import check_tensorrt_ready, require_tensorrt, weights_2to4
from edgecompress.export.verify import verify_onnx

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def test_symmetric_recipe_is_tensorrt_ready(vit_w8a8_sym, exported):
    res, model = exported("vit_sym_trt", vit_w8a8_sym, target="tensorrt")
    assert check_tensorrt_ready(model) == []
    # the offset form is exact; INT8 weights: ORT's own integer kernels only where they do not saturate
    v = verify_onnx(vit_w8a8_sym, res.path, samples=16, integer_kernels=not u8s8_saturates())
    assert v["passed"], v["failures"]


def test_softmax_output_needs_the_offset_form(vit_w8a8_sym, exported):
    # uniform_ptq keeps the attention probabilities unsigned (zero-point 0 in [0, 255] → −128 in INT8),
    # so only the onnxruntime form of the symmetric recipe has non-zero zero-points, all of them there
    _, model = exported("vit_sym_ort", vit_w8a8_sym, weight_dtype="int8")  # uint8 weights: TensorRT refuses
    problems = check_tensorrt_ready(model)
    assert problems and all("zero-point [-128]" in p for p in problems)
    # ... and the record (and the console line) says the TensorRT form of the same model is ready
    record = tensorrt_record(model, "onnx")
    assert not record["ready"] and record["ready_with_format_tensorrt"] is True
    _, auto = exported("vit_sym_auto", vit_w8a8_sym)  # UINT8 weight codes where ORT needs them
    assert tensorrt_record(auto, "onnx")["ready_with_format_tensorrt"] is True


def test_asymmetric_recipe_reports_weight_zero_points(vit_w8a8, exported):
    _, model = exported("vit_w8a8", vit_w8a8)
    problems = check_tensorrt_ready(model)
    assert any("DequantizeLinear" in p and "not 0" in p for p in problems)
    _, trt_model = exported("vit_asym_trt", vit_w8a8, target="tensorrt")
    remaining = check_tensorrt_ready(trt_model)  # activations moved to the offset form; weights cannot
    assert remaining and all("DequantizeLinear" in p for p in remaining)
    assert tensorrt_record(model, "onnx")["ready_with_format_tensorrt"] is False


def test_unsupported_ops_and_opset_are_listed(vit_w8a8_sym, exported):
    _, model = exported("vit_sym_trt", vit_w8a8_sym, target="tensorrt")
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    bad.graph.node.append(helper.make_node("MatMulInteger", ["a", "b"], ["c"]))
    bad.graph.node.append(helper.make_node("Custom", ["c"], ["d"], domain="com.example"))
    bad.opset_import[0].version = 99
    problems = check_tensorrt_ready(bad)
    assert any("MatMulInteger" in p for p in problems) and any("com.example.Custom" in p for p in problems)
    assert any("opset 99" in p for p in problems)


def test_2to4_weights_are_detected(tmp_path):
    torch.manual_seed(0)
    lin = nn.Linear(16, 12)
    with torch.no_grad():
        mask = torch.zeros(12, 16)
        mask[:, 0::4] = mask[:, 1::4] = 1  # keep 2 of every 4 inputs
        lin.weight.mul_(mask)
    for layer, expected in ((lin, 1), (nn.Linear(16, 12), 0)):
        path = tmp_path / f"m{expected}.onnx"
        torch.onnx.export(
            nn.Sequential(layer), (torch.randn(3, 5, 16),), str(path), dynamo=True, verbose=False
        )
        assert weights_2to4(onnx.load(str(path))) == (expected, 1)


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed")
def test_without_tensorrt_one_line_error(vit, tmp_path, capsys):
    with pytest.raises(UserError) as err:
        require_tensorrt()
    assert "TensorRT" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="TensorRT"):
        export_verified(vit, tmp_path / "m.onnx", fmt="tensorrt")
    assert not (tmp_path / "m.onnx").exists()  # refused before exporting anything
    assert main(["export", "demo:vit-digits", "--format", "tensorrt", "--out", str(tmp_path / "d.onnx")]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and "TensorRT" in err_lines[0]


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed")
def test_compress_refuses_a_tensorrt_recipe_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["compress", "--model", "demo:vit-digits", "--recipe", "uniform_w8a8_export", "--out", str(out)]
    assert main(argv + ["--set", "export.format=tensorrt"]) == 2
    assert "TensorRT" in capsys.readouterr().err and not out.exists()
