"""Uniform quantizers as INT8 ``QuantizeLinear → DequantizeLinear`` pairs (see :mod:`.linear` for
the weights).

A :class:`~edgecompress.quantize.modules.UniformQuantizer` on an activation becomes
:class:`QDQActivation`: ``torch.ops.quantized_decomposed.{quantize,dequantize}_per_tensor``
(per-tensor; kept as ops by ``torch.export``, whereas ``fake_quantize_per_tensor_affine`` gets
decomposed under dynamic shapes) or ``torch.fake_quantize_per_channel_affine`` (one axis), INT8
range, which the ONNX exporters lower to a ``QuantizeLinear → DequantizeLinear`` pair (both round
half to even, like ``torch.round``). Our codes ``q ∈ [0, 2^b − 1]`` with zero-point ``z`` map to
INT8 as ``q − 2^(b−1)`` with zero-point ``z − 2^(b−1)`` (so 8-bit symmetric quantizers get
zero-point 0). Below 8 bits a ``Clip`` to the low-bit range precedes the pair, so the INT8 tensor
only holds values of the ``b``-bit grid.

``target="tensorrt"``: TensorRT only accepts zero-point 0. An activation quantizer whose INT8
zero-point ``z'`` is not 0 (asymmetric, or the unsigned softmax output) is written in the exact
offset form ``DQ(Q(x + s·z')) − s·z'`` with zero-point 0.
"""

from __future__ import annotations

import torch
from torch import nn

from edgecompress.export.forms.registry import ExportOptions, register_form
from edgecompress.quantize.modules import UniformQuantizer

INT8_MIN, INT8_MAX = -128, 127


def decomposed_ops() -> None:
    """Register ``torch.ops.quantized_decomposed`` (dequantize of the INT8 weight initializers)."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401


def quant_axis(scale: torch.Tensor) -> int | None:
    """The one axis a broadcast-shaped ``scale`` varies along (``None`` for per-tensor)."""
    if scale.numel() == 1:
        return None
    axes = [d for d, n in enumerate(scale.shape) if n > 1]
    if len(axes) != 1:
        raise ValueError(f"scale of shape {tuple(scale.shape)} varies along more than one axis")
    return axes[0]


def int8_params(q: UniformQuantizer) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """``(scale, int8 zero-point, qmin, qmax)`` of a ``b``-bit quantizer on the INT8 grid."""
    off = 2 ** (q.bits - 1)
    zp = torch.round(q.zero_point.float()) - off
    return q.scale.float(), zp, -off, off - 1


class QDQActivation(nn.Module):
    """INT8 ``QuantizeLinear → DequantizeLinear`` of an activation (per tensor or along one axis)."""

    def __init__(self, q: UniformQuantizer, target: str = "onnxruntime"):
        super().__init__()
        decomposed_ops()
        scale, zp, self.qmin, self.qmax = int8_params(q)
        self.bits, self.role = q.bits, q.role
        self.axis = quant_axis(scale)
        self.offset = target == "tensorrt" and bool((zp != 0).any())
        self.register_buffer("scale", scale.clone())
        self.register_buffer("zp", zp.clone())  # float, broadcast shape
        # per-tensor parameters as Python numbers: graph constants, not data-dependent values
        self.scale_f, self.zp_i = float(scale.flatten()[0]), int(zp.flatten()[0])
        self.lo_f, self.hi_f = (self.qmin - self.zp_i) * self.scale_f, (self.qmax - self.zp_i) * self.scale_f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits < 8:  # keep the INT8 tensor on the b-bit grid: one Clip
            x = self._clip(x)
        if self.offset:  # TensorRT: zero-point 0, exact shift by s·z'
            shift = self.scale_f * self.zp_i if self.axis is None else self.scale * self.zp
            return self._fq(x + shift, zero=True) - shift
        return self._fq(x, zero=False)

    def _clip(self, x: torch.Tensor) -> torch.Tensor:
        if self.axis is None:
            return torch.clamp(x, self.lo_f, self.hi_f)
        s, z = self.scale, self.zp
        return torch.clamp(x, (self.qmin - z) * s, (self.qmax - z) * s)

    def _fq(self, x: torch.Tensor, zero: bool) -> torch.Tensor:
        if self.axis is None:
            z = 0 if zero else self.zp_i
            qd = torch.ops.quantized_decomposed
            q = qd.quantize_per_tensor(x, self.scale_f, z, INT8_MIN, INT8_MAX, torch.int8)
            return qd.dequantize_per_tensor(q, self.scale_f, z, INT8_MIN, INT8_MAX, torch.int8)
        s, zi = self.scale.flatten(), self.zp.flatten().to(torch.int32)
        if zero:
            zi = torch.zeros_like(zi)
        return torch.fake_quantize_per_channel_affine(x, s, zi, self.axis, INT8_MIN, INT8_MAX)

    def extra_repr(self) -> str:
        return f"role={self.role!r}, bits={self.bits}, axis={self.axis}, offset={self.offset}"


@register_form(UniformQuantizer, "quantized")
def _uniform(mod: UniformQuantizer, opts: ExportOptions) -> nn.Module:
    try:
        return QDQActivation(mod, opts.target)
    except ValueError:  # scale varies along several axes: no Q/DQ form, keep the float math
        return mod
