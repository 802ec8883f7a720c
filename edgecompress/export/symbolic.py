"""TorchScript-exporter symbolics for the ops our export forms use that it does not know.

Only needed on the fallback path (``torch.onnx.export(dynamo=False)``); the dynamo exporter
translates the ``quantized_decomposed`` ops itself. Activations are INT8 per-tensor here
(per-channel activation quantizers use ``fake_quantize_per_channel_affine``, which both exporters
know).
"""

from __future__ import annotations

_REGISTERED: set[int] = set()


def _dequantize_per_channel(g, x, scales, zero_points, axis, quant_min, quant_max, dtype, out_dtype=None):
    """``quantized_decomposed::dequantize_per_channel`` → ``DequantizeLinear(axis)`` (INT8 zero-points,
    or UINT8 ones for UINT8 codes, whose range starts at 0)."""
    from torch.onnx import symbolic_helper

    axis_i = symbolic_helper._get_const(axis, "i", "axis")
    unsigned = symbolic_helper._get_const(quant_min, "i", "quant_min") == 0
    zp8 = g.op("Cast", zero_points, to_i=2 if unsigned else 3)  # UINT8 / INT8, folded into an initializer
    return g.op("DequantizeLinear", x, scales, zp8, axis_i=axis_i)


def _quantize_per_tensor(g, x, scale, zero_point, quant_min, quant_max, dtype):
    """``quantized_decomposed::quantize_per_tensor`` (INT8 range) → ``QuantizeLinear``."""
    s = g.op("Constant", value_t=_scalar(g, scale, "f", torch_dtype="float32"))
    z = g.op("Constant", value_t=_scalar(g, zero_point, "i", torch_dtype="int8"))
    return g.op("QuantizeLinear", x, s, z)


def _dequantize_per_tensor(g, x, scale, zero_point, quant_min, quant_max, dtype, out_dtype=None):
    """``quantized_decomposed::dequantize_per_tensor`` (INT8) → ``DequantizeLinear``."""
    s = g.op("Constant", value_t=_scalar(g, scale, "f", torch_dtype="float32"))
    z = g.op("Constant", value_t=_scalar(g, zero_point, "i", torch_dtype="int8"))
    return g.op("DequantizeLinear", x, s, z)


def _scalar(g, value, kind: str, torch_dtype: str):
    import torch
    from torch.onnx import symbolic_helper

    return torch.tensor(symbolic_helper._get_const(value, kind, "qparam"), dtype=getattr(torch, torch_dtype))


def register_symbolics(opset: int) -> None:
    """Register our symbolics once per opset (idempotent)."""
    import torch

    from edgecompress.export.forms.uniform import decomposed_ops

    if opset in _REGISTERED:
        return
    decomposed_ops()
    for name, fn in (
        ("dequantize_per_channel", _dequantize_per_channel),
        ("quantize_per_tensor", _quantize_per_tensor),
        ("dequantize_per_tensor", _dequantize_per_tensor),
    ):
        torch.onnx.register_custom_op_symbolic(f"quantized_decomposed::{name}", fn, opset)
    _REGISTERED.add(opset)
