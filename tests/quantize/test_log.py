"""Log-domain quantizers (log2, log√2, AdaLog): oracle = closed-form values and slow loops."""

from __future__ import annotations

import math

import pytest
import torch

from edgecompress.quantize.log import (
    ADALOG_R,
    adalog_code_table,
    adalog_fraction_table,
    dequantize_adalog,
    dequantize_log2,
    dequantize_logsqrt2,
    fake_quant_adalog,
    fake_quant_log2,
    fake_quant_logsqrt2,
    log_code_table,
    n_value_codes,
    quantize_adalog,
    quantize_log2,
    quantize_logsqrt2,
)

ALL_Q = list(range(10, 138))


def test_log2_known_values():
    # oracle: hand-computed codes round(-log2(x/s)); tolerance: exact (powers of two)
    s = torch.tensor(2.0)
    x = 2.0 * torch.tensor([1.0, 0.5, 0.25, 0.3, 2.0**-15, 2.0**-16, 0.0, -1.0, 3.0])
    codes = quantize_log2(x, s, bits=4)
    assert codes.tolist() == [0, 1, 2, 2, 15, 16, 16, 16, 0]  # 16 = zero code; >s clamps to code 0
    vals = dequantize_log2(codes, s, bits=4)
    assert vals.tolist() == [2.0, 1.0, 0.5, 0.5, 2.0**-14, 0.0, 0.0, 0.0, 2.0]


def test_logsqrt2_known_values():
    # oracle: x = 2^(-k/2) has code k and is represented exactly up to float32 rounding of exp2
    k = torch.arange(16, dtype=torch.float64)
    x = torch.exp2(-k / 2).float()
    codes = quantize_logsqrt2(x, torch.tensor(1.0), bits=4)
    assert codes.tolist() == list(range(16))
    expected = torch.tensor([2.0 ** (-i / 2) for i in range(16)], dtype=torch.float32)
    torch.testing.assert_close(
        dequantize_logsqrt2(codes, torch.tensor(1.0), bits=4), expected, rtol=1.2e-7, atol=0
    )
    # just below the last level flushes to exact zero
    assert (
        dequantize_logsqrt2(
            quantize_logsqrt2(torch.tensor([2.0**-8.3]), torch.tensor(1.0), 4), torch.tensor(1.0), 4
        ).item()
        == 0.0
    )


def test_strict_bits_reserves_top_code():
    # oracle: with strict_bits the zero code is 2^b - 1 and code 2^b - 1 is never a value
    x = torch.tensor([2.0**-14, 2.0**-15])
    codes = quantize_log2(x, torch.tensor(1.0), bits=4, strict_bits=True)
    assert codes.tolist() == [14, 15]
    assert dequantize_log2(codes, torch.tensor(1.0), 4, strict_bits=True).tolist() == [2.0**-14, 0.0]
    assert n_value_codes(4) == 16 and n_value_codes(4, strict_bits=True) == 15


def test_adalog_q37_equals_log2():
    # oracle: q = r = 37 gives base 2 exactly, and the table fraction index is always 0 (T[0] = 1)
    x = torch.rand(1000) ** 4
    s = torch.tensor(0.9)
    for bits in (3, 4, 6, 8):
        c_ada = quantize_adalog(x, s, 37, bits)
        assert torch.equal(c_ada, quantize_log2(x, s, bits))
        assert torch.equal(dequantize_adalog(c_ada, s, 37, bits), dequantize_log2(c_ada, s, bits))


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_adalog_lut_dequant_within_table_rounding(bits):
    """Hardware (LUT + shift) vs ideal dequant for every code and every q in 10..137, in float64.

    Bound: hw = s·2^-⌊m/r⌋·T[m mod r] with T[j] = 2^(-j/r) rounded to a multiple of
    1/(2^(b+1)-2), so |T[j] - 2^(-j/r)| ≤ 1/(2·(2^(b+1)-2)) and
    |hw - ideal| ≤ s·2^-⌊m/r⌋ / (2·(2^(b+1)-2)), m = code·q; plus float64 rounding (1e-15 rel).
    """
    s = torch.tensor(0.75, dtype=torch.float64)
    codes = torch.arange(2**bits, dtype=torch.float64)[None, :]  # [1, 2^b]
    q = torch.tensor(ALL_Q, dtype=torch.float64)[:, None]  # [Q, 1]
    hw = dequantize_adalog(codes, s, q, bits, hardware=True)  # [Q, 2^b]
    ideal = dequantize_adalog(codes, s, q, bits, hardware=False)
    bound = s * torch.exp2(-torch.floor(codes * q / ADALOG_R)) / (2 * (2 ** (bits + 1) - 2))
    err = (hw - ideal).abs()
    assert (err <= bound + 1e-15 * ideal).all()
    assert (err > 0.5 * bound).any()  # the table rounding is really exercised, near its bound


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_adalog_lut_dequant_float32_matches_float64(bits):
    # oracle: the float64 hardware dequant; tolerance: 1 float32 rounding of the final product,
    # on the codes the quantizer can emit (values ≥ 1e-15·s; deeper codes underflow in float32)
    s = 0.75
    codes = torch.arange(2**bits, dtype=torch.float64)[None, :]
    q = torch.tensor(ALL_Q, dtype=torch.float64)[:, None]
    ref = dequantize_adalog(codes, torch.tensor(s, dtype=torch.float64), q, bits)
    got = dequantize_adalog(codes.float(), torch.tensor(s), q.float(), bits).double()
    live = ref >= 1e-15 * s
    torch.testing.assert_close(got[live], ref[live], rtol=1.2e-7, atol=0)


def test_adalog_fraction_table_values():
    # oracle: python float64 formula of METHODS.md §2
    for bits in (3, 4, 8):
        d = 2 ** (bits + 1) - 2
        expected = [round(2 ** (-j / 37) * d) / d for j in range(37)]
        torch.testing.assert_close(
            adalog_fraction_table(bits, dtype=torch.float64),
            torch.tensor(expected, dtype=torch.float64),
            rtol=0,
            atol=0,
        )


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_code_tables_match_dequant(bits):
    # oracle: dequantize(codes) must equal s·table[codes] bit for bit (the exporter's Gather + Mul)
    s = torch.tensor(0.37)
    codes = torch.arange(n_value_codes(bits) + 1, dtype=torch.float32)
    for q in (10, 29, 37, 100, 137):
        for hw in (True, False):
            table = adalog_code_table(q, bits, hardware=hw)
            assert table[-1].item() == 0.0
            assert torch.equal(dequantize_adalog(codes, s, q, bits, hardware=hw), s * table[codes.long()])
    assert torch.equal(dequantize_log2(codes, s, bits), s * log_code_table(bits, 1)[codes.long()])
    assert torch.equal(dequantize_logsqrt2(codes, s, bits), s * log_code_table(bits, 2)[codes.long()])


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_round_trip_exact_on_codes(bits):
    """quantize(dequantize(c)) == c for every code the quantizer can emit, and for the zero code.

    Oracle: the code itself; exact. Codes whose value lies below the 1e-15 input clamp (e.g. log2
    codes > 49 at 8 bits) cannot be produced by any input, so they are excluded by construction.
    """
    s = torch.tensor(1.3)
    zero = n_value_codes(bits)
    for k, quant, dequant in (
        (1.0, quantize_log2, dequantize_log2),
        (2.0, quantize_logsqrt2, dequantize_logsqrt2),
    ):
        codes = torch.tensor([c for c in range(zero) if c / k <= 49] + [zero], dtype=torch.float32)
        assert torch.equal(quant(dequant(codes, s, bits), s, bits), codes)
    for q in ALL_Q:
        codes = torch.tensor([c for c in range(zero) if c * q / ADALOG_R <= 49] + [zero], dtype=torch.float32)
        deq = dequantize_adalog(codes, s, q, bits, hardware=False)
        assert torch.equal(quantize_adalog(deq, s, q, bits), codes), q


def test_adalog_batched_q_matches_loop():
    # oracle: a slow loop over q candidates; tolerance: exact
    x = torch.rand(7, 59) ** 3
    s = torch.tensor(0.8)
    q = torch.tensor([10.0, 23.0, 61.0, 137.0])[:, None, None]  # [C, 1, 1]
    batched = fake_quant_adalog(x, s, q, bits=4)  # [C, 7, 59]
    for i, qi in enumerate([10, 23, 61, 137]):
        assert torch.equal(batched[i], fake_quant_adalog(x, s, qi, bits=4))


def test_fake_quant_straight_through():
    # oracle: d/dx of x + (Q(x) - x).detach() is 1 everywhere
    for fq in (
        lambda x: fake_quant_log2(x, torch.tensor(1.0), 4),
        lambda x: fake_quant_logsqrt2(x, torch.tensor(1.0), 4),
        lambda x: fake_quant_adalog(x, torch.tensor(1.0), 50, 4),
    ):
        x = torch.rand(97, requires_grad=True)
        fq(x).sum().backward()
        assert torch.equal(x.grad, torch.ones(97))


def test_adalog_base_range():
    # oracle: base 2^(q/r) spans ≈ 1.21 … 13.0 over q = 10 … 137 (METHODS.md §2)
    assert math.isclose(2 ** (10 / 37), 1.206, abs_tol=1e-3)
    v = adalog_code_table(137, 4, hardware=False)
    assert math.isclose((v[0] / v[1]).item(), 2 ** (137 / 37), rel_tol=1e-6)
    assert 12.9 < 2 ** (137 / 37) < 13.1
