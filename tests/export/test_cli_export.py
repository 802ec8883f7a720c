"""``edgecompress export`` and the ``export:``/``bench:`` recipe sections of ``compress``
(oracle: the verification JSON, thresholds of :mod:`edgecompress.export.verify`)."""

from __future__ import annotations

import json

import pytest

from edgecompress.cli import main
from tests.test_cli import TINY_VIT


def test_export_demo_writes_verified_onnx(tmp_path, capsys):
    out = tmp_path / "digits.onnx"
    assert main(["export", "demo:vit-digits", "--out", str(out), "--samples", "16", "--batch", "4"]) == 0
    text = capsys.readouterr().out
    assert "verified on 16 samples" in text and "dynamo exporter" in text
    record = json.loads((tmp_path / "digits.verification.json").read_text())
    assert out.is_file() and record["verification"]["passed"]
    assert record["verification"]["metrics"]["top1_agreement"] == 100.0
    assert ".partial-" not in json.dumps(record)  # paths name where the files are, not the temporary folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.onnx", "digits.verification.json"]


def test_interrupted_export_leaves_no_file(tmp_path, monkeypatch):
    import edgecompress.export.deploy as deploy

    def interrupted(*a, **k):
        raise KeyboardInterrupt  # Ctrl-C during verification

    monkeypatch.setattr(deploy, "verify_onnx", interrupted)
    assert main(["export", "demo:vit-digits", "--out", str(tmp_path / "d.onnx"), "--samples", "4"]) == 130
    assert list(tmp_path.iterdir()) == []  # neither the unverified .onnx nor the temporary folder


@pytest.mark.parametrize(
    "argv",
    [
        ["export", "demo:no-such-model"],
        ["export", "demo:vit-digits", "--format", "tflite"],
        ["export", "demo:vit-digits", "--opset", "11"],
        ["export", "demo:vit-digits", "--out", "x.txt"],
        ["export", "/no/such/folder"],
    ],
    ids=["unknown-spec", "unknown-format", "old-opset", "not-onnx-name", "missing-folder"],
)
def test_export_bad_input_exits_2(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgecompress: error:")


def test_compress_with_export_and_bench_sections(tmp_path, capsys):
    out = tmp_path / "out"
    sets = [
        "calibration.samples=8",
        "eval.samples=32",
        "export.samples=16",
        "bench.seconds=0.2",
        "bench.iterations=5",
    ]
    args = [
        "compress",
        "--model",
        TINY_VIT + "&pretrained=false",
        "--recipe",
        "uniform_w8a8_export",
        "--out",
        str(out),
    ]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    deploy = report["deploy"]
    assert deploy["export"]["verification"]["passed"] and (out / "model.onnx").is_file()
    assert json.loads((out / "model.verification.json").read_text())["export"]["path"] == str(
        out / "model.onnx"
    )
    assert {r["target"] for r in deploy["bench"]["results"]} == {"compressed", "baseline"}
    assert deploy["bench"]["speedup"] > 0 and "onnxruntime b8" in (out / "report.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporary folder left
