"""Every shipped recipe runs end to end on a small model and exports to a verified ONNX file
(oracles: the float model, floor stated below; the exported file against the PyTorch model it came
from, thresholds of :mod:`edgecompress.export.verify`)."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from edgecompress.cli import main
from edgecompress.recipe import RECIPES_DIR
from tests.test_cli import TINY_VIT

# Any recipe, even at 3-4 bits, must keep a tiny random ViT's predictions above chance agreement
# with its float self on the digits test images (10 classes → 10% by chance).
MIN_TOP1_AGREEMENT = 20.0


def _quick_training(path) -> list[str]:
    """Training recipes run 4 steps on 64 samples here (STEP switches at step 2, ACM's layer-wise
    phases run 4 steps each): same code, less time."""
    data = yaml.safe_load(path.read_text())
    if "train" not in data:
        return []
    sets = ["train.steps=4", "train.batch_size=16", "train.samples=64", "train.warmup_steps=1"]
    for i, p in enumerate(data["passes"]):
        if p["pass"] == "step":
            sets += [f"passes.{i}.t_min=0", f"passes.{i}.t_max=2"]
        if p["pass"] == "acm":
            sets += [f"passes.{i}.distill_steps=4", f"passes.{i}.gate_steps=4"]
    return [x for s in sets for x in ("--set", s)]


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipe_runs_on_tiny_vit(path, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", TINY_VIT + "&pretrained=false", "--recipe", str(path), "--out", str(out)]
    args += ["--set", "calibration.samples=8", "--set", "eval.samples=64", *_quick_training(path)]
    sections = yaml.safe_load(path.read_text())
    if "export" not in sections and "bench" not in sections:
        args.append("--no-export")  # compress's own ONNX export of quantized models is tested in test_deploy_report
    assert main(["compress", *args]) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    trained = [p["info"]["training"] for p in report["passes"] if "training" in p["info"]]
    trained = [t for x in trained for t in (x.values() if "steps" not in x else [x])]  # ACM: one per phase
    if trained:  # trained on the digits labels: the random float model is no reference any more
        assert all(t["steps"] == 4 and math.isfinite(t["final_loss"]) for t in trained)
    else:
        assert report["metrics"]["compressed"]["top1_agreement"] >= MIN_TOP1_AGREEMENT
    dynamic = [p["info"]["acm"] for p in report["passes"] if "acm" in p["info"]]
    if dynamic:  # ACM saves compute, not bytes (it adds the gates): the executed fraction is measured
        assert all(0 <= d["mean_fraction"] <= 1 for d in dynamic) and len(dynamic[0]["layers"]) == 2
    elif any(p["pass"] != "seer_attention" for p in sections["passes"]):  # its gates add weights, skip compute
        assert report["size_bytes"]["compressed"] < report["size_bytes"]["baseline"]
    assert (out / "model.safetensors").stat().st_size > 0
    # ... and the compressed folder exports: full ONNX checker, then ORT against PyTorch
    onnx_path = tmp_path / "model.onnx"
    code = main(["export", str(out), "--out", str(onnx_path), "--samples", "32", "--batch", "8"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "model.verification.json").read_text())
    assert record["verification"]["passed"], record["verification"]["failures"]
    assert record["verification"]["metrics"]["samples"] == 32
