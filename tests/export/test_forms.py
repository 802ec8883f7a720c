"""Export forms of the quantizers, in PyTorch (oracle: the fake-quant modules they replace).

The Q/DQ forms compute ``round(x · (1/s))`` where the fake-quant code computes ``round(x / s)``
(and the TensorRT offset form adds and subtracts ``s·z'``); they differ only by float rounding,
except for values within rounding of a half step, whose code moves by one. So: at least 99.9 % of
the outputs agree to 1e-4 of a step and none is more than one step away.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgecompress.export.forms import (
    ExportOptions,
    QDQActivation,
    QDQLinear,
    export_category,
    export_module,
    form_of,
    to_export_form,
)
from edgecompress.models.slots import SlotLinear
from edgecompress.quantize.log_modules import AdaLogQuantizer, LogQuantizer, TanQuantizer
from edgecompress.quantize.modules import UniformQuantizer
from edgecompress.quantize.uniform import (
    dequantize_uniform,
    params_from_range,
    quantize_uniform,
    weight_params,
)

EXACT_FRACTION = 0.999


def _quantizer(bits: int, symmetric: bool, lo: float = -1.3, hi: float = 2.1) -> UniformQuantizer:
    q = UniformQuantizer(bits, symmetric, "tensor", "linear_in")
    return q.set_params(*params_from_range(torch.tensor(lo), torch.tensor(hi), bits, symmetric))


def _assert_one_step(a: torch.Tensor, b: torch.Tensor, step: float) -> None:
    """Equal up to float rounding (1e-4 of a step) except for a few values one step apart."""
    diff = (a - b).abs()
    same = (diff <= 1e-4 * step).float().mean().item()
    assert same >= EXACT_FRACTION, same
    assert float(diff.max()) <= step * 1.0001


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_qdq_activation_matches_fake_quant(bits, symmetric, target):
    torch.manual_seed(0)
    q = _quantizer(bits, symmetric)
    x = torch.randn(4, 97, 59) * 1.5  # includes values outside the range (clipped)
    form = QDQActivation(q, target)
    assert form.offset == (target == "tensorrt" and not symmetric)
    _assert_one_step(form(x), q(x), float(q.scale))


def test_int8_zero_points_follow_the_mapping():
    q8 = _quantizer(8, False)
    form = QDQActivation(q8)
    assert form.zp_i == int(q8.zero_point) - 128 and (form.qmin, form.qmax) == (-128, 127)
    q4 = _quantizer(4, True)
    assert QDQActivation(q4).zp_i == 0 and (QDQActivation(q4).qmin, QDQActivation(q4).qmax) == (-8, 7)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_qdq_linear_weight_is_exactly_the_dequantized_grid(bits, symmetric, dtype):
    torch.manual_seed(0)
    layer = SlotLinear.adopt(nn.Linear(59, 97))
    s, z = weight_params(layer.weight.detach(), bits, symmetric)
    layer.weight_chain.append(UniformQuantizer(bits, symmetric, "channel", "weight").set_params(s, z))
    layer.input_chain.append(_quantizer(8, symmetric))
    form = QDQLinear(layer, ExportOptions(weight_dtype=dtype))
    assert form.int8 and form.w_codes.dtype == getattr(torch, dtype) and form.w_codes.shape == (59, 97)
    lo = 0 if dtype == "uint8" else -(2 ** (bits - 1))
    assert int(form.w_codes.min()) >= lo and int(form.w_codes.max()) <= lo + 2**bits - 1
    expected = dequantize_uniform(quantize_uniform(layer.weight, s, z, bits), s, z).t()
    assert torch.equal(form.weight_t(), expected.detach())
    x = torch.randn(3, 5, 59)
    ref = torch.nn.functional.linear(form.input_chain(x), expected.t(), layer.bias)
    torch.testing.assert_close(form(x), ref.detach(), rtol=1e-5, atol=1e-5)  # summation order only


def test_linear_without_int8_input_keeps_float_weights():
    layer = SlotLinear.adopt(nn.Linear(16, 8))
    s, z = weight_params(layer.weight.detach(), 8)
    layer.weight_chain.append(UniformQuantizer(8, False, "channel", "weight").set_params(s, z))
    form = QDQLinear(layer)  # the input chain is empty: no Q/DQ on the input
    assert not form.int8 and form.weight_t().dtype == torch.float32


def _log_modules():
    yield LogQuantizer(4, "log2").set_params(torch.tensor(0.9))
    yield LogQuantizer(4, "logsqrt2", strict_bits=True).set_params(torch.tensor(1.0))
    yield AdaLogQuantizer(4, shift=0.17, fold_shift=True).set_params(torch.tensor(0.5), 10)
    yield AdaLogQuantizer(3, shift=0.17, fold_shift=False).set_params(torch.tensor(0.5), 23)
    yield TanQuantizer(4).set_params(torch.tensor(1.0), 0.9)


@pytest.mark.parametrize("mod", list(_log_modules()), ids=lambda m: f"{type(m).__name__}-{m.bits}")
def test_lut_forms_reproduce_non_uniform_quantizers(mod):
    torch.manual_seed(0)
    x = torch.cat([torch.rand(2000), torch.randn(2000) * 0.3, torch.tensor([0.0, 1.0, -0.17, 1e-20])])
    form = export_module(mod)
    assert type(form).__name__ == "LUTQuantizer"
    torch.testing.assert_close(form(x), mod(x), rtol=0, atol=1e-6)  # atol: the STE's x + (x̂ − x) rounding


@pytest.mark.parametrize("mod", list(_log_modules()), ids=lambda m: f"{type(m).__name__}-{m.bits}")
def test_lut_codes_are_exact_at_every_boundary_even_from_an_estimate_one_off(mod):
    """Oracle: the quantizer's own code function, on every boundary float, the floats next to it and
    random inputs; the graph's first estimate (ORT's ``Log`` may differ by an ulp) pushed one code
    off at random must still end on exactly PyTorch's code."""
    form = export_module(mod)
    b = form.bounds[1:-1]
    assert b.numel() == form.table.numel() - 1 and torch.isfinite(b).all()
    x = torch.cat(
        [
            b,
            torch.nextafter(b, b - 1),
            torch.nextafter(b, b + 1),
            torch.randn(4000),
            torch.tensor([0.0, -1.0]),
        ]
    )
    exact = form._codes(x + form.shift).long()
    assert torch.equal(form.codes(x), exact)
    true_codes = form._codes
    off = torch.randint(-1, 2, x.shape, generator=torch.Generator().manual_seed(0))
    form._codes = lambda u: (true_codes(u).long() + off).clamp(0, form.table.numel() - 1)
    assert torch.equal(form.codes(x), exact)


def test_to_export_form_copies_and_counts():
    model = nn.Sequential(SlotLinear.adopt(nn.Linear(8, 8)))
    model[0].input_chain.append(_quantizer(8, False))
    s, z = weight_params(model[0].weight.detach(), 8)
    model[0].weight_chain.append(UniformQuantizer(8, False, "channel", "weight").set_params(s, z))
    form, counts = to_export_form(model)
    assert counts == {"QDQLinear": 1} and isinstance(model[0], SlotLinear)  # original untouched
    assert export_category(model) == "quantized"
    assert export_category(nn.Sequential(SlotLinear.adopt(nn.Linear(2, 2)))) == "float"
    with pytest.raises(ValueError):
        ExportOptions("tflite")


def test_forms_are_found_through_the_class_hierarchy():
    class MyQuantizer(UniformQuantizer):  # a subclass gets its parent's form and category
        pass

    q = MyQuantizer(8).set_params(torch.tensor(0.1), torch.tensor(3.0))
    assert form_of(q).category == "quantized" and isinstance(export_module(q), QDQActivation)
