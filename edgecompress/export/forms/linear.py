"""A :class:`~edgecompress.models.slots.SlotLinear` as ``MatMul(input chain, weight) + bias``.

The weight chain is folded: every element before the weight quantizer (a mask, ...) is applied to
the float weight at export time, then

* with a uniform weight quantizer (per tensor or per output channel) *and* an input chain that
  ends in an INT8 Q/DQ pair → :class:`QDQLinear` with integer weight codes: an ``[in, out]``
  initializer with a per-output-channel ``DequantizeLinear`` (axis 1 of the MatMul weight, i.e.
  axis 0 of the ``[out, in]`` PyTorch weight) feeding ``MatMul`` directly, then the float bias
  ``Add`` — the shape ONNX Runtime fuses into ``MatMulIntegerToFloat`` / ``QLinearMatMul`` and
  TensorRT into an INT8 GEMM. Zeros of a masked weight stay exact zeros: their code is the
  (integer, in-range) zero-point.
* otherwise → the same module with the chain's float weight values: a Linear whose *input* has no
  INT8 Q/DQ (a log/TanQ input, or none) keeps its dequantized weight in float, because runtimes
  turn a lone weight ``DequantizeLinear`` into a weight-only kernel that re-quantizes the
  activation (ONNX Runtime's ``MatMulNBits`` at its default accuracy level 4 does; measured output
  cosine 0.97 instead of 1.0 on an AdaLog W4A4 ViT).

``weight_dtype``: ``"int8"`` stores the codes as ``q − 2^(b−1)`` in INT8 (TensorRT needs it);
``"uint8"`` stores ``q ∈ [0, 2^b − 1]`` itself in UINT8 with zero-point ``z``. ONNX Runtime then
runs u8×u8 instead of u8×s8 kernels. On x86 CPUs without VNNI its u8×s8 kernels use
``VPMADDUBSW``, whose int16 pair sums saturate for full-range 8-bit weights (measured on an
AVX2-only AMD EPYC: a 384×1536 W8A8 layer off by 27 % of its output range); the u8×u8 kernels
widen first and are exact (same layer: error 4e-6, still 1.75× faster than the float path). See
:func:`edgecompress.export.runtime.resolve_weight_dtype`.
"""

from __future__ import annotations

import torch
from torch import nn

from edgecompress.export.forms.registry import DEFAULT_OPTIONS, ExportOptions, register_form
from edgecompress.export.forms.uniform import QDQActivation, decomposed_ops, int8_params, quant_axis
from edgecompress.models.slots import QUANTIZER, SlotLinear
from edgecompress.quantize.modules import UniformQuantizer
from edgecompress.quantize.uniform import quantize_uniform


def _export_chain(chain, opts: ExportOptions) -> nn.Sequential:
    from edgecompress.export.forms import export_module

    return nn.Sequential(*[export_module(m, opts) for m in chain])


def _split_weight_chain(layer: SlotLinear) -> tuple[torch.Tensor, nn.Module | None]:
    """(float weight after every element before the quantizer, the quantizer or None)."""
    w = layer.weight.detach()
    wq = None
    with torch.no_grad():
        for m in layer.weight_chain:
            if getattr(m, "SLOT_KIND", None) == QUANTIZER:
                wq = m
                break
            w = m(w)
    return w.float(), wq


class QDQLinear(nn.Module):
    """``MatMul(input_chain(x), W) + bias``: W = ``DequantizeLinear(codesᵀ, axis=1)`` or float values."""

    def __init__(self, layer: SlotLinear, opts: ExportOptions = DEFAULT_OPTIONS):
        super().__init__()
        decomposed_ops()
        self.input_chain = _export_chain(layer.input_chain, opts)
        self.bias = (
            None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        )
        w, wq = _split_weight_chain(layer)  # [out, in]
        self.int8 = (
            isinstance(wq, UniformQuantizer)
            and quant_axis(wq.scale) in (None, 0)
            and len(self.input_chain) > 0
            and isinstance(self.input_chain[-1], QDQActivation)  # weight-only DQ: see the module docstring
        )
        if not self.int8:  # the chain's weight values, in float
            self.register_buffer("w_t", layer.effective_weight().float().t().contiguous())  # [in, out]
            return
        self._codes(w, wq, opts.weight_dtype)

    def _codes(self, w: torch.Tensor, wq: UniformQuantizer, weight_dtype: str) -> None:
        scale, zp, qmin, qmax = int8_params(wq)
        codes = quantize_uniform(w, wq.scale.float(), wq.zero_point.float(), wq.bits)  # [0, 2^b - 1]
        self.dtype = torch.uint8 if weight_dtype == "uint8" else torch.int8
        if self.dtype == torch.uint8:  # the codes themselves, zero-point z
            zp, qmin, qmax = torch.round(wq.zero_point.float()), 0, 255
        else:  # shifted onto the INT8 grid, zero-point z - 2^(b-1)
            codes = codes - 2 ** (wq.bits - 1)
        out = w.shape[0]
        self.qmin, self.qmax = qmin, qmax
        self.register_buffer("w_codes", codes.t().contiguous().to(self.dtype))  # [in, out]
        self.register_buffer("w_scale", scale.expand(out, *scale.shape[1:]).reshape(out).contiguous())
        # int32, not int8: eager dequantize_per_channel subtracts in the input's dtype (int8 would wrap);
        # the exporters cast it to the INT8 / UINT8 zero-point initializer ONNX wants
        self.register_buffer("w_zp", zp.expand(out, *zp.shape[1:]).reshape(out).to(torch.int32).contiguous())

    def weight_t(self) -> torch.Tensor:
        if not self.int8:
            return self.w_t
        return torch.ops.quantized_decomposed.dequantize_per_channel(
            self.w_codes, self.w_scale, self.w_zp, 1, self.qmin, self.qmax, self.dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(self.input_chain(x), self.weight_t())  # [..., out]
        return y if self.bias is None else y + self.bias


@register_form(SlotLinear, "float")  # its quantizers carry the "quantized" category themselves
def _slot_linear(layer: SlotLinear, opts: ExportOptions) -> nn.Module:
    return QDQLinear(layer, opts)
