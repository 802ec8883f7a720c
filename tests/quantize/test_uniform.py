"""Uniform quantizer math (oracle: hand-computed codes, exact) and SlotLinear (oracle: float Linear)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgecompress.models.slots import SlotLinear
from edgecompress.quantize.modules import UniformQuantizer, deployed_size_bytes
from edgecompress.quantize.uniform import (
    dequantize_uniform,
    fake_quant_uniform,
    mse_search_range,
    params_from_range,
    quantize_uniform,
    weight_params,
)


def test_codes_by_hand():
    scale, zp = params_from_range(torch.tensor(-1.0), torch.tensor(2.0), 2)  # 4 levels over [-1, 2]
    assert float(scale) == 1.0 and float(zp) == 1.0
    x = torch.tensor([-1.4, -0.4, 0.6, 1.2, 3.0])
    assert quantize_uniform(x, scale, zp, 2).tolist() == [0.0, 1.0, 2.0, 2.0, 3.0]
    assert dequantize_uniform(quantize_uniform(x, scale, zp, 2), scale, zp).tolist() == [
        -1.0,
        0.0,
        1.0,
        1.0,
        2.0,
    ]


def test_symmetric_range_and_zero_exact():
    scale, zp = params_from_range(torch.tensor(-0.5), torch.tensor(1.27), 8, symmetric=True)
    assert float(zp) == 128.0
    torch.testing.assert_close(scale, torch.tensor(0.01))
    x = torch.tensor([0.0, 1.27, -1.27, 5.0])
    assert fake_quant_uniform(x, scale, zp, 8).tolist()[0] == 0.0
    torch.testing.assert_close(fake_quant_uniform(x, scale, zp, 8), torch.tensor([0.0, 1.27, -1.27, 1.27]))


def test_roundtrip_error_bounded_by_half_step_inside_range():
    torch.manual_seed(0)
    x = torch.randn(97, 59)
    for bits in (2, 4, 8):
        s, z = weight_params(x, bits)
        err = (fake_quant_uniform(x, s, z, bits) - x).abs()
        assert bool((err <= s / 2 + 1e-6).all()), bits


def test_straight_through_gradient():
    x = torch.randn(10, requires_grad=True)
    fake_quant_uniform(x, torch.tensor(0.1), torch.tensor(128.0), 8).sum().backward()
    assert torch.equal(x.grad, torch.ones(10))


def test_mse_search_never_worse_than_minmax():
    torch.manual_seed(1)
    x = torch.cat([torch.randn(5000), torch.tensor([40.0, -35.0])])  # heavy outliers
    lo, hi = x.min(), x.max()
    s0, z0 = params_from_range(lo, hi, 4)
    s1, z1 = mse_search_range(x, lo, hi, 4)
    e0 = (fake_quant_uniform(x, s0, z0, 4) - x).pow(2).mean()
    e1 = (fake_quant_uniform(x, s1, z1, 4) - x).pow(2).mean()
    assert e1 <= e0 and e1 < 0.5 * e0


def test_slot_linear_equals_float_linear_with_dequantized_weight():
    torch.manual_seed(2)
    lin = nn.Linear(59, 23)
    q = SlotLinear.adopt(lin)
    x = torch.randn(7, 59)
    assert torch.equal(q(x), lin(x)) and isinstance(q, nn.Linear)  # empty chains are the identity
    wq = UniformQuantizer(8, granularity="channel").set_params(*weight_params(lin.weight.detach(), 8))
    q.weight_chain.append(wq)
    ref = F.linear(x, wq(lin.weight.detach()), lin.bias)
    torch.testing.assert_close(q(x), ref, atol=1e-6, rtol=1e-6)
    assert q.deployed_bytes() == 59 * 23 + 23 * 4 * 2 + 23 * 4
    assert deployed_size_bytes(nn.Sequential(q)) == q.deployed_bytes()
