"""The relaxed verification of quantized graphs (:func:`edgecompress.export.verify.judge_relaxed`):
the segment check, the model's own sensitivity at the measured per-quantizer rounding error, and
the judgement against it. Oracles: exact zero-noise identity, the clamp rule's values, and real
exports of a tiny odd-sized timm ViT (W4A4) compared in ONNX Runtime."""

from __future__ import annotations

import pytest

from edgecompress.export.inputs import sample_batches
from edgecompress.export.verify import (
    SENSITIVITY_EPS,
    SENSITIVITY_EPS_MAX,
    activation_quantizers,
    judge_against_sensitivity,
    judge_relaxed,
    noise_levels,
    sensitivity,
    verify_onnx,
)
from tests.export.models import negated_head

SAMPLES = 16


def _m(cos_mean: float, below: int, wrong: int, decided: int = 64) -> dict:
    return {"samples": 64, "cosine_mean": cos_mean, "samples_below_cosine_floor": below,
            "top1_disagreements": wrong, "top1_decided": decided}  # fmt: skip


@pytest.mark.parametrize(
    "cos_mean,below,wrong,passes",
    [
        (0.9976, 6, 1, True),  # measured: random DeiT-tiny AdaLog W4A4 in ORT (own: 0.99901, 3, 1 of 58)
        (0.9965, 6, 1, False),  # mean beyond 2 × the model's own deviation + 0.001
        (0.9976, 8, 1, False),  # more outliers than 2 × own + the normal allowance
        (0.9976, 6, 3, True),  # 2 × own + one sample
        (0.9976, 6, 4, False),  # beyond it
        (-0.99, 64, 58, False),  # a wrong form (negated head) is never excused
    ],
)
def test_judged_against_the_models_own_sensitivity(cos_mean, below, wrong, passes):
    own = _m(0.999014, 3, 1, 58)
    assert (not judge_against_sensitivity(_m(cos_mean, below, wrong, 58), own)) == passes


@pytest.mark.parametrize("wrong,passes", [(1, True), (2, False)])
def test_top1_allowance_is_at_least_one_sample(wrong, passes):
    # measured 2026-12-06 (random DeiT-tiny 64 px AdaLog W4A4, noise at the measured segment errors):
    # own 0.997791 / 6 outliers / 0 of 64 disagree; ORT 0.996678 / 9 / 1 of 64. 0.5 % of 64 < 1 sample.
    fails = judge_against_sensitivity(_m(0.996678, 9, wrong), _m(0.997791, 6, 0))
    assert (not fails) == passes
    if not passes:
        assert fails == ["2 of 64 top-1 disagreements > 1 (the model's own 0)"]


def test_random_vit_s_w4a4_is_not_excused():
    # measured (timm vit_small, random, 64 px, AdaLog W4A4): ORT 0.987127 / 20 outliers vs own 0.996083 / 6
    fails = judge_against_sensitivity(_m(0.987127, 20, 2, 53), _m(0.996083, 6, 2, 53))
    assert len(fails) == 2 and "cosine_mean" in fails[0] and "20 samples" in fails[1]


def test_a_model_too_unstable_to_verify_fails():
    assert "too unstable to verify" in judge_against_sensitivity(_m(0.999, 0, 0), _m(0.95, 40, 25))[0]


def test_sensitivity_of_a_float_model_is_nil(vit):
    batches, rows = sample_batches(vit, 16, 8)
    own = sensitivity(vit, batches, rows)
    assert own["cosine_mean"] > 0.999999 and own["samples_below_cosine_floor"] == 0


def test_noise_levels_are_the_measured_segment_errors_clamped():
    rows = [
        {"module": "blocks.0.attn.q", "segment_rel_err": 5e-7},  # ~4 float32 steps: kept
        {"module": "blocks.0.mlp.fc2.act", "segment_rel_err": 0.0},  # identical: one step
        {"module": "head.act", "segment_rel_err": 1e-3},  # beyond accumulation order: capped
    ]
    levels = noise_levels({"rows": rows})
    assert levels == {
        "blocks.0.attn.q": 5e-7,
        "blocks.0.mlp.fc2.act": SENSITIVITY_EPS,
        "head.act": SENSITIVITY_EPS_MAX,
        "": SENSITIVITY_EPS_MAX,  # quantizers the check could not compare: the worst level
    }
    assert noise_levels({"rows": []}) == {"": SENSITIVITY_EPS}


def _quantizers(loaded) -> list[str]:
    return [n for n, _ in activation_quantizers(loaded.model)]


def test_sensitivity_puts_each_level_on_its_own_quantizer(vit_w4a4):
    batches, rows = sample_batches(vit_w4a4, SAMPLES, 8)
    silent = sensitivity(vit_w4a4, batches, rows, levels={"": 0.0})
    assert silent["cosine_mean"] == 1.0 and silent["samples_below_cosine_floor"] == 0  # no noise: itself
    name = _quantizers(vit_w4a4)[0]
    loud = sensitivity(vit_w4a4, batches, rows, levels={"": 0.0, name: 0.3})
    assert loud["cosine_mean"] < 0.9999  # 30 % noise on that one input moves the output
    elsewhere = sensitivity(vit_w4a4, batches, rows, levels={"": 0.0, "no.such.module": 0.3})
    assert elsewhere["cosine_mean"] == 1.0


def test_relaxed_verdict_on_a_real_export(vit_w4a4, exported):
    res, _ = exported("vit_w4a4", vit_w4a4)
    batches, rows = sample_batches(vit_w4a4, SAMPLES, 2)  # the exported graph's static batch
    metrics = verify_onnx(vit_w4a4, res.path, samples=SAMPLES)["metrics"]
    fails, record = judge_relaxed(vit_w4a4, res.path, batches, rows, metrics)
    assert not fails, fails
    seg, noise = record["segments"], record["sensitivity"]["relative_input_noise"]
    assert seg["first_departure"] is None and seg["compared_quantizers"] > 0
    per = noise["per_quantizer"]
    assert set(per) - {""} <= set(_quantizers(vit_w4a4)) and len(per) == seg["compared_quantizers"] + 1
    worst = seg["worst_segment"]["segment_rel_err"]
    assert noise["max"] == per[""] == min(max(worst, SENSITIVITY_EPS), SENSITIVITY_EPS_MAX)
    assert all(SENSITIVITY_EPS <= v <= SENSITIVITY_EPS_MAX for v in per.values())


def test_a_wrong_model_is_not_excused_by_its_sensitivity(vit_w4a4, exported):
    res, _ = exported("vit_w4a4", vit_w4a4)
    wrong = negated_head(vit_w4a4)
    v = verify_onnx(wrong, res.path, samples=SAMPLES)
    assert not v["passed"] and v["sensitivity"]["strict_failures"]
    assert any(f.startswith("cosine_mean") for f in v["failures"])
    assert v["sensitivity"]["relative_input_noise"]["max"] <= SENSITIVITY_EPS_MAX
