"""Post-LN reparameterization and the post-GELU shift fold: oracle = the unfolded float model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgecompress.quantize.reparam import (
    GELU_SHIFT,
    fold_shift_into_bias_,
    reparam_factors,
    reparam_target,
    reparameterize_,
    shifted_bias,
)
from edgecompress.quantize.uniform import fake_quant_uniform

C = 59  # odd channel count


def _ln_linears(seed: int = 0, bias: bool = True) -> tuple[nn.LayerNorm, list[nn.Linear]]:
    torch.manual_seed(seed)
    ln = nn.LayerNorm(C).double()
    with torch.no_grad():
        ln.weight.copy_(torch.randn(C).abs() + 0.1)
        ln.weight[[3, 17]] *= 20  # outlier channels, as in post-LN ViT activations
        ln.bias.copy_(torch.randn(C) * 2)
    return ln, [nn.Linear(C, 97, bias=bias).double(), nn.Linear(C, 123).double()]


def _channel_params(y: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel min/max (s_c, z_c) with a free integer offset, as the calibration produces."""
    lo, hi = y.amin(0), y.amax(0)
    s = (hi - lo) / (2**bits - 1)
    return s, torch.round(-lo / s)


@pytest.mark.parametrize("rule", ["mean", "median", "mad"])
@pytest.mark.parametrize("bias", [True, False])
def test_fold_keeps_float_function(rule, bias):
    # oracle: LN→Linear before the fold; tolerance 1e-10 (float64, a few roundings)
    ln, lins = _ln_linears(bias=bias)
    x = torch.randn(64, C, dtype=torch.float64) * 3
    with torch.no_grad():
        ref = [lin(ln(x)) for lin in lins]
        s, z = _channel_params(ln(x), 4)
        reparameterize_(ln, lins, s, z, rule, bits=4)
        got = [lin(ln(x)) for lin in lins]
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rule", ["mean", "median", "mad"])
def test_per_tensor_after_fold_equals_per_channel_before(rule):
    """Per-tensor quantization with (s*, z*) of LN' mapped back by x = r·(x' + b) equals the
    per-channel quantization of LN with (s_c, z_c). Oracle: per-channel fake quant; tolerance 1e-9
    (float64; only a value on an exact rounding tie could differ, none here)."""
    bits = 4
    ln, lins = _ln_linears(seed=1)
    x = torch.randn(200, C, dtype=torch.float64)
    with torch.no_grad():
        y = ln(x)
        s, z = _channel_params(y, bits)
        ref = fake_quant_uniform(y, s, z, bits)
        s_t, z_t, r, b = reparameterize_(ln, lins, s, z, rule, bits=bits)
        y2 = ln(x)
    assert 0 <= z_t.item() <= 2**bits - 1
    back = r * (fake_quant_uniform(y2, s_t, z_t, bits) + b)
    torch.testing.assert_close(back, ref, rtol=0, atol=1e-9)
    # every channel's window now starts at the common minimum -z*·s*
    torch.testing.assert_close((-z * s) / r - b, (-z_t * s_t).expand(C), rtol=0, atol=1e-12)


def test_target_rules_known_values():
    # oracle: hand computation; exact
    s = torch.tensor([1.0, 1.0, 2.0, 1.0, 10.0])
    z = torch.tensor([3.0, 4.0, 5.0, 6.0, 40.0])
    assert [v.item() for v in reparam_target(s, z, "mean")] == [3.0, 12.0]  # mean z = 11.6 → 12
    assert [v.item() for v in reparam_target(s, z, "median")] == [1.0, 5.0]
    # mad: med = 1, |s - med| = [0,0,1,0,9], mean dev = 2 → inliers = first four
    assert [v.item() for v in reparam_target(s, z, "mad")] == [1.25, 4.0]  # mean z = 4.5 → 4 (half to even)
    assert reparam_target(s, z, "mean", bits=3)[1].item() == 7.0  # clamped into the code range
    # even count: median averages the two middle values
    assert reparam_target(torch.tensor([1.0, 2.0, 3.0, 10.0]), torch.zeros(4), "median")[0].item() == 2.5


def test_outlier_channel_moves_mean_not_median():
    # oracle: property the MOSF rules are for — one outlier channel inflates the mean only
    s = torch.ones(C)
    s[0] = 100.0
    z = torch.zeros(C)
    assert reparam_target(s, z, "mean")[0] > 2.5
    assert reparam_target(s, z, "median")[0] == 1.0 and reparam_target(s, z, "mad")[0] == 1.0


def test_factors_definition():
    # oracle: r = s_c / s*, b = m_c / r - m* with m = -z·s (RepQ-ViT); exact on these numbers
    s = torch.tensor([0.5, 2.0])
    z = torch.tensor([2.0, -1.0])
    r, b = reparam_factors(s, z, torch.tensor(1.0), torch.tensor(3.0))
    assert r.tolist() == [0.5, 2.0]
    assert b.tolist() == [(-1.0) / 0.5 + 3.0, 2.0 / 2.0 + 3.0]


def test_unknown_rule_and_non_affine_ln():
    with pytest.raises(ValueError, match="unknown reparameterization rule"):
        reparam_target(torch.ones(3), torch.zeros(3), "max")  # type: ignore[arg-type]
    ln = nn.LayerNorm(C, elementwise_affine=False)
    with pytest.raises(ValueError, match="no affine weight"):
        reparameterize_(ln, [nn.Linear(C, 3)], torch.ones(C), torch.zeros(C), "mean")


@pytest.mark.parametrize("bias", [True, False])
def test_gelu_shift_fold(bias):
    # oracle: fc2(x) before the fold; after it, fc2(x + c) must match; tolerance 1e-10 (float64)
    torch.manual_seed(0)
    fc2 = nn.Linear(123, 59, bias=bias).double()
    x = torch.nn.functional.gelu(torch.randn(31, 123, dtype=torch.float64))
    with torch.no_grad():
        ref = fc2(x)
        fold_shift_into_bias_(fc2)
        got = fc2(x + GELU_SHIFT)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    assert (x + GELU_SHIFT).min() >= 0  # GELU ≥ -c, so the shifted input is log-quantizable


def test_gelu_shift_constant_is_minus_min_gelu():
    """AdaLog's c is -min GELU rounded *up* by 3.5e-8 (a float32 evaluation): the shifted input stays
    ≥ 0. Oracle: dense float64 evaluation of exact GELU near its minimum (x ≈ -0.7518); tol 1e-7."""
    x = torch.linspace(-0.76, -0.74, 200001, dtype=torch.float64)
    true_c = -torch.nn.functional.gelu(x).min().item()
    assert 0 <= GELU_SHIFT - true_c < 1e-7


def test_shifted_bias_with_deployed_weight():
    # oracle: b - c·W·1 with the weight passed in (e.g. the dequantized one); exact formula
    w = torch.randn(5, 7, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    torch.testing.assert_close(shifted_bias(b, w), b - GELU_SHIFT * w.sum(1), rtol=0, atol=0)
