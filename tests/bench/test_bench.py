"""``bench`` on tiny models (oracle: the statistics' own invariants and the exported graph's
agreement with PyTorch on the benchmark inputs, cosine ≥ 0.999) and ``edgecompress bench``."""

from __future__ import annotations

import json

import pytest

from edgecompress.bench.run import bench
from edgecompress.cli import main
from edgecompress.errors import UserError
from tests.test_cli import TINY_VIT

SPEC = TINY_VIT + "&pretrained=false"
QUICK = {"min_seconds": 0.1, "min_iters": 5, "warmup_s": 0.05}


def _sane(result: dict, batch: int) -> None:
    for r in result["results"]:
        s = r["latency"]
        assert 0 < s["min_ms"] <= s["median_ms"] <= s["p90_ms"] <= s["p99_ms"] <= s["max_ms"]
        assert s["iterations"] >= QUICK["min_iters"]
        assert r["throughput_per_s"] == pytest.approx(batch * 1e3 / s["median_ms"], rel=1e-3)
    assert result["environment"]["cpu"]["model"]


def test_torch_backend_on_a_tiny_model():
    result = bench(SPEC, "torch", batch=2, threads=1, timing=QUICK)
    _sane(result, 2)
    assert result["results"][0]["threads"] == 1


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    from edgecompress.export.onnx import export_onnx
    from edgecompress.models.loading import load_model

    path = tmp_path_factory.mktemp("bench") / "tiny.onnx"
    export_onnx(load_model(SPEC), path, batch=2)
    return path


def test_onnxruntime_on_the_fly_vs_a_file(onnx_file):
    result = bench(SPEC, "onnxruntime", batch=2, vs=str(onnx_file), timing=QUICK)
    _sane(result, 2)
    first = result["results"][0]
    assert first["sanity_cosine"] >= 0.999 and first["exported_on_the_fly"]["exporter"] == "dynamo"
    assert first["session"]["intra_op_allow_spinning"] is False
    assert result["speedup"] > 0


@pytest.mark.parametrize(
    "target,backend,match",
    [
        ("{onnx}", "torch", "use --backend onnxruntime"),
        ("{onnx}", "tflite", "unknown backend"),
        ("/no/such/model.onnx", "onnxruntime", "not found"),
        ("{text}", "onnxruntime", "not a valid ONNX model"),
        ("{other}", "onnxruntime", "not a model spec"),
    ],
)
def test_bad_targets_raise_user_errors(target, backend, match, onnx_file, tmp_path):
    (tmp_path / "notes.onnx").write_text("not a protobuf")
    (tmp_path / "notes.txt").write_text("hello")
    target = target.format(onnx=onnx_file, text=tmp_path / "notes.onnx", other=tmp_path / "notes.txt")
    with pytest.raises(UserError, match=match):
        bench(target, backend, batch=2, timing=QUICK)


def test_cli_bench_json_and_exit_codes(onnx_file, tmp_path, capsys):
    out = tmp_path / "b.json"
    argv = [
        "bench",
        str(onnx_file),
        "--backend",
        "onnxruntime",
        "--batch",
        "2",
        "--seconds",
        "0.1",
        "--iterations",
        "5",
    ]
    assert main(argv + ["--json", str(out)]) == 0
    assert "median" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["results"][0]["latency"]["iterations"] >= 5 and "environment" in data
    for bad in (
        ["bench", str(onnx_file), "--backend", "nope"],
        ["bench", str(tmp_path / "missing.onnx"), "--backend", "onnxruntime"],
    ):
        assert main(bad) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_static_batch_is_what_is_labelled_and_counted(onnx_file):
    # the file's batch axis is static (2): asked for batch 8, it runs 2, and says so
    result = bench(str(onnx_file), "onnxruntime", batch=8, timing=QUICK)
    r = result["results"][0]
    assert r["batch"] == 2 and result["batch"] == 2 and result["batch_requested"] == 8
    assert list(r["inputs"].values()) == [[2, 3, 32, 32]]
    _sane(result, 2)  # items/s from the batch that ran
    assert any("static batch of 2; --batch 8 was not used" in w for w in result["warnings"])


def test_vs_refuses_models_fed_different_shapes(onnx_file):
    # on the fly at batch 8 vs the static batch-2 file: different work, refused in one line
    with pytest.raises(UserError, match=r"--vs: .* runs on \[.*8×3×32×32\] but .* on \[.*2×3×32×32\]"):
        bench(SPEC, "onnxruntime", batch=8, vs=str(onnx_file), timing=QUICK)
