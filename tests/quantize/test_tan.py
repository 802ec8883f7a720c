"""TanQ (our companded construction for DopQ-ViT): oracle = closed forms and a slow loop."""

from __future__ import annotations

import math

import pytest
import torch

from edgecompress.quantize.tan import (
    dequantize_tanq,
    fake_quant_tanq,
    quantize_tanq,
    tan_compand,
    tan_expand,
    tanq_alpha_candidates,
    tanq_code_table,
)

ALPHAS = [0.11, 0.5, 0.9, 0.99, 0.999]


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_levels_monotone_and_exact_at_ends(bits):
    # oracle: c⁻¹ is strictly increasing with c⁻¹(0) = 0, c⁻¹(1) = 1; tolerance: exact at the ends
    s = torch.tensor(0.8)
    codes = torch.arange(2**bits, dtype=torch.float32)
    for alpha in ALPHAS:
        v = dequantize_tanq(codes, s, alpha, bits)
        assert (v[1:] > v[:-1]).all(), alpha
        assert v[0].item() == 0.0 and v[-1].item() == s.item()
        x = torch.tensor([0.0, s.item(), 2.0 * s.item(), -1.0])
        assert quantize_tanq(x, s, alpha, bits).tolist() == [0, 2**bits - 1, 2**bits - 1, 0]


def test_compand_inverse():
    # oracle: c⁻¹(c(x)) = x; tolerance 1e-9 in float64 (tan/atan round-off, amplified near α = 1)
    x = torch.linspace(0, 1, 1001, dtype=torch.float64)
    for alpha in ALPHAS:
        torch.testing.assert_close(tan_expand(tan_compand(x, alpha), alpha), x, rtol=0, atol=1e-9)


def test_compand_closed_form_end_slope():
    # oracle: c'(0) = απ / sin(απ) (module docstring); central difference, tolerance 1e-4 rel
    h = 1e-7
    for alpha in ALPHAS[:4]:
        x = torch.tensor([0.0, h], dtype=torch.float64)
        slope = (tan_compand(x, alpha)[1] - tan_compand(x, alpha)[0]) / h
        assert math.isclose(slope.item(), alpha * math.pi / math.sin(alpha * math.pi), rel_tol=1e-4)


def test_small_alpha_is_uniform():
    # oracle: α → 0 makes c the identity, so TanQ → the uniform grid k/(2^b-1); tolerance 1e-6
    codes = torch.arange(16, dtype=torch.float64)
    v = dequantize_tanq(codes, torch.tensor(1.0, dtype=torch.float64), 1e-4, 4)
    torch.testing.assert_close(v, codes / 15, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_finer_than_uniform_at_both_ends(bits):
    # oracle: the uniform step 1/(2^b - 1); property of a steep compander (α ≥ 0.5)
    top = 2**bits - 1
    for alpha in (0.5, 0.9, 0.99):
        v = dequantize_tanq(torch.arange(top + 1, dtype=torch.float32), torch.tensor(1.0), alpha, bits)
        assert v[1] < 1 / top and 1 - v[-2] < 1 / top


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_round_trip_exact_on_codes(bits):
    # oracle: the code itself; exact
    codes = torch.arange(2**bits, dtype=torch.float32)
    for alpha in tanq_alpha_candidates(16).tolist():
        s = torch.tensor(0.9)
        assert torch.equal(quantize_tanq(dequantize_tanq(codes, s, alpha, bits), s, alpha, bits), codes), (
            alpha
        )


def test_batched_alpha_matches_loop():
    # oracle: slow loop over α; tolerance exact
    x = torch.rand(5, 59).softmax(-1)
    alphas = tanq_alpha_candidates(7)
    batched = fake_quant_tanq(x, torch.tensor(1.0), alphas[:, None, None], 4)  # [7, 5, 59]
    for i, a in enumerate(alphas):
        assert torch.equal(batched[i], fake_quant_tanq(x, torch.tensor(1.0), a, 4))


def test_code_table_matches_dequant():
    # oracle: the exporter's form s·table[code] must equal dequantize bit for bit; and the float64
    # closed form c⁻¹(k/15) to one float32 rounding
    codes = torch.arange(16, dtype=torch.float32)
    s = torch.tensor(0.7)
    for alpha in ALPHAS:
        t = tanq_code_table(alpha, 4)
        assert torch.equal(s * t[codes.long()], dequantize_tanq(codes, s, alpha, 4))
        ref = tan_expand(codes.double() / 15, alpha)
        torch.testing.assert_close(t.double(), ref, rtol=6e-8, atol=0)
        assert t[0].item() == 0.0 and t[-1].item() == 1.0


def test_alpha_candidates_inside_unit_interval():
    a = tanq_alpha_candidates(64)
    assert a.shape == (64,) and (a > 0).all() and (a < 1).all() and (a[1:] > a[:-1]).all()


def test_straight_through_gradient():
    x = torch.rand(97, requires_grad=True)
    fake_quant_tanq(x, torch.tensor(1.0), 0.9, 4).sum().backward()
    assert torch.equal(x.grad, torch.ones(97))
