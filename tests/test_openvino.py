"""The ``openvino`` bench backend. Oracles: ONNX Runtime and PyTorch on the same inputs (float graph:
cosine ≥ 0.9999 and max |Δ| ≤ 1e-4 · max |y| — both run the same f32 graph, only summation order
differs), ORT's reference Q/DQ semantics (basic optimization level, Q/DQ as float ops) for an INT8
graph (cosine ≥ 0.999), and the CPU plugin's own report of the kernels it picked."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")

from edgecompress.bench.backends import ort_runner, ov_runner  # noqa: E402
from edgecompress.bench.env import cpu_info  # noqa: E402
from edgecompress.bench.run import bench  # noqa: E402
from edgecompress.cli import main  # noqa: E402
from edgecompress.export.deploy import export_verified, summary_line  # noqa: E402
from edgecompress.export.onnx import export_onnx  # noqa: E402
from edgecompress.export.runtime import ort_session  # noqa: E402
from edgecompress.export.verify import verify_onnx  # noqa: E402
from edgecompress.models.loading import load_model  # noqa: E402
from tests.export.models import compressed, negated_head, tiny_bert_synthetic, tiny_vit_odd  # noqa: E402
from tests.test_cli import TINY_VIT  # noqa: E402

QUICK = {"min_seconds": 0.1, "min_iters": 5, "warmup_s": 0.05}
SHAPE = [4, 1, 8, 8]  # demo:vit-digits, batch 4


def _cos(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _close(y, ref) -> None:
    assert y.shape == ref.shape
    assert _cos(y, ref) >= 0.9999
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.fixture(scope="module")
def digits():
    return load_model("demo:vit-digits")


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits):
    """Static batch-4 and dynamic-batch float files (the TorchScript exporter: 10× faster to export
    than dynamo, and which exporter wrote a file is not what these tests are about)."""
    folder = tmp_path_factory.mktemp("ov")
    ts = {"exporter": "torchscript"}
    return {
        "static": export_onnx(digits, folder / "digits-b4.onnx", batch=4, **ts).path,
        "dynamic": export_onnx(digits, folder / "digits-dyn.onnx", dynamic_batch=True, **ts).path,
    }


def test_float_graph_matches_onnxruntime_and_pytorch(files, digits):
    ov, ort = ov_runner(files["static"], 4, 16, 1), ort_runner(files["static"], 4, 16, 1)
    assert ov.shapes == ort.shapes == {"pixel_values": SHAPE}
    np.testing.assert_array_equal(ov.feeds["pixel_values"], ort.feeds["pixel_values"])  # same work
    with torch.no_grad():
        ref = digits.model(torch.from_numpy(ov.feeds["pixel_values"])).numpy()
    y = ov.output()
    _close(y, ort.output())
    _close(y, ref)
    assert ref.shape == (4, 10)
    info, compiled = ov.info, ov.info["compiled"]
    assert info["backend"] == "openvino" and info["openvino"]
    assert compiled["INFERENCE_PRECISION_HINT"] == "f32"
    assert compiled["PERFORMANCE_HINT"] == "LATENCY" and compiled["INFERENCE_NUM_THREADS"] == 1
    assert info["reshaped_to_fed_shapes"] is False  # the file is static already
    assert info["matmul_precisions"] and all(" f32 " in k for k in info["matmul_precisions"])


def test_dynamic_batch_is_reshaped_to_the_fed_shape(files):
    ov, ort = ov_runner(files["dynamic"], 3, 16, 1), ort_runner(files["dynamic"], 3, 16, 1)
    assert ov.shapes == {"pixel_values": [3, 1, 8, 8]} and ov.info["reshaped_to_fed_shapes"] is True
    _close(ov.output(), ort.output())
    assert ov.output().shape == (3, 10)


def test_bf16_hint_reports_the_precision_that_ran(files):
    flags = cpu_info()["flags"]
    ov = ov_runner(files["static"], 4, 16, 1, precision="bf16")
    ran = ov.info["compiled"]["INFERENCE_PRECISION_HINT"]
    assert ov.info["config"]["INFERENCE_PRECISION_HINT"] == "bf16"
    if not {"avx512_bf16", "amx_bf16"} & set(flags):  # no bf16 hardware: the plugin stays f32
        assert ran == "f32"
        _close(ov.output(), ort_runner(files["static"], 4, 16, 1).output())
    else:
        assert ran == "bf16"
        assert _cos(ov.output(), ort_runner(files["static"], 4, 16, 1).output()) >= 0.99


def test_int8_qdq_graph_is_read_and_computes_the_qdq_function(tmp_path):
    """Asymmetric INT8 weights: OpenVINO keeps the layers' GEMMs in float (weight-only decompression),
    and agrees with the Q/DQ graph's own function; symmetric ones (zero-point 0) take its INT8 kernels."""
    vit, kw = tiny_vit_odd(), {"batch": 2, "weight_dtype": "int8", "exporter": "torchscript"}
    asym = export_onnx(compressed(vit, "uniform_w8a8"), tmp_path / "asym.onnx", **kw)
    sym = export_onnx(compressed(vit, "uniform_w8a8_sym"), tmp_path / "sym.onnx", **kw)
    for path, min_cos in ((asym.path, 0.999), (sym.path, 0.99)):  # sym: u8×s8 may saturate without VNNI
        ov = ov_runner(path, 2, 16, 1)
        exact = ort_session(path, 1, integer_kernels=False).run(None, ov.feeds)[0]
        assert _cos(ov.output(), exact) >= min_cos
    gemms = ov_runner(asym.path, 2, 16, 1).info["matmul_precisions"]
    assert not any(k.split()[-1].lower().endswith(("i8", "u8")) for k in gemms), gemms
    gemms = ov_runner(sym.path, 2, 16, 1).info["matmul_precisions"]
    assert any(k.startswith("FullyConnected") and "8" in k.split()[-1] for k in gemms), gemms


def test_openvino_format_is_verified_in_openvino_with_its_kernel_report(tmp_path):
    """``--format openvino``: verified in OpenVINO's CPU plugin against PyTorch (the bounds of
    export/verify.py); the plugin's own report: with ``uniform_w8a8_openvino`` (symmetric weights)
    all 9 Linear layers run an INT8 kernel (asymmetric ones: none, the test below); another model
    fails there."""
    vit, kw = tiny_vit_odd(), {"batch": 2, "samples": 16}
    ov = compressed(vit, "uniform_w8a8_openvino")
    rec = export_verified(ov, tmp_path / "ov.onnx", "openvino", **kw)
    v = rec["verification"]
    assert v["passed"] and v["runtime"] == "openvino" and "ort_session" not in v
    assert v["openvino"]["compiled"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert v["openvino"]["int8_gemms"] == 9 and rec["export"]["weight_dtype"] == "int8"
    assert "verified in OpenVINO f32: INT8 kernels for 9 of" in summary_line(rec)
    chains = [(n, m.find("quantizer")) for n, m in ov.model.named_modules() if n.endswith(("weight_chain", "input_chain"))]  # fmt: skip
    weights = [q for n, q in chains if n.endswith("weight_chain") and q is not None]
    acts = [q for n, q in chains if n.endswith("input_chain") and q is not None]
    assert len(weights) == 9 and all(bool((q.zero_point == 128).all()) for q in weights)  # INT8 zero-point 0
    assert any(bool((q.zero_point != 128).any()) for q in acts)  # activations keep their zero-point
    wrong = negated_head(ov)
    assert not verify_onnx(wrong, tmp_path / "ov.onnx", samples=16, runtime="openvino")["passed"]


def test_openvino_format_exports_attention_openvino_fuses(tmp_path):
    """An HF BERT whose attention no pass replaced (``uniform_w8a8_openvino`` leaves it float) keeps
    PyTorch's SDPA: exported as is, OpenVINO runs one Softmax layer per attention (its MHA kernel
    does not match the SDPA export); ``--format openvino`` exports the explicit form on a copy and
    the compiled model has none left, verified against that copy; the user's model is untouched."""
    from edgecompress.export.inputs import sample_batches
    from edgecompress.export.openvino import OVSession, unfused_softmax
    from edgecompress.models.attention import adapters

    ov = compressed(tiny_bert_synthetic(), "uniform_w8a8_openvino")
    plain = export_onnx(ov, tmp_path / "sdpa.onnx", batch=2, weight_dtype="int8")
    sess = OVSession(plain.path)
    batches, _ = sample_batches(ov, 2, 2)
    sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), batches[0])})
    assert unfused_softmax(sess.compiled) == 2  # one per layer
    rec = export_verified(ov, tmp_path / "ov.onnx", "openvino", batch=2, samples=16)
    assert rec["verification"]["passed"], rec["verification"]["failures"]
    assert rec["attention_made_explicit"]["modules"] == 2
    assert rec["verification"]["openvino"]["unfused_softmax"] == 0
    assert adapters(ov.model) == []


def test_openvino_format_refuses_uint8_weights(tmp_path, capsys):
    argv = [
        "export",
        "demo:vit-digits",
        "--format",
        "openvino",
        "--weight-dtype",
        "uint8",
        "--out",
        str(tmp_path / "d.onnx"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs INT8 weight codes" in err[0]


def test_cli_bench_openvino_reports_shapes_fed(files, tmp_path, capsys):
    out = tmp_path / "b.json"
    argv = ["bench", str(files["static"]), "--backend", "openvino", "--batch", "4", "--threads", "1",
            "--seconds", "0.1", "--iterations", "5", "--vs", str(files["dynamic"]), "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("[openvino, pixel_values 4×1×8×8]") == 2, printed
    data = json.loads(out.read_text())
    assert [r["inputs"] for r in data["results"]] == [{"pixel_values": SHAPE}] * 2
    assert data["results"][0]["latency"]["iterations"] >= 5 and data["speedup"] > 0
    assert data["results"][1]["reshaped_to_fed_shapes"] is True


def test_on_the_fly_export_is_sanity_checked_against_pytorch():
    result = bench(TINY_VIT + "&pretrained=false", "openvino", batch=2, threads=1, timing=QUICK)
    r = result["results"][0]
    assert r["sanity_cosine"] >= 0.999 and r["inputs"] == {"pixel_values": [2, 3, 32, 32]}
    assert r["exported_on_the_fly"]["exporter"] == "dynamo" and r["backend"] == "openvino"


@pytest.mark.parametrize(
    "target,backend,match",
    [
        ("/no/such/model.onnx", "openvino", "not found"),
        ("{text}", "openvino", "not a valid ONNX model"),
        ("{static}", "openvino:int4", "precision hint is one of f32, bf16"),
        ("{static}", "torch", "use --backend onnxruntime, openvino"),
    ],
)
def test_bad_inputs_exit_2_in_one_line(target, backend, match, files, tmp_path, capsys):
    (tmp_path / "notes.onnx").write_text("not a protobuf")
    target = target.format(static=files["static"], text=tmp_path / "notes.onnx")
    assert main(["bench", target, "--backend", backend]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err


def test_missing_openvino_is_one_line(files, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    assert main(["bench", str(files["static"]), "--backend", "openvino"]) == 2
    assert capsys.readouterr().err.strip() == (
        "edgecompress: error: openvino is not installed: pip install 'edgecompress[openvino]'"
    )
