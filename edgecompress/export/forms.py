"""Export-time forms of quantizer modules: what each quantizer becomes in the ONNX graph.

Before export, :func:`to_export_form` swaps (on a copy of the model) every quantizer for a module
whose ``forward`` emits the ops a runtime understands:

* :class:`~edgecompress.quantize.modules.UniformQuantizer` on an activation → :class:`QDQActivation`:
  ``torch.ops.quantized_decomposed.{quantize,dequantize}_per_tensor`` (per-tensor; kept as ops by
  ``torch.export``, whereas ``fake_quantize_per_tensor_affine`` gets decomposed under dynamic
  shapes) or ``torch.fake_quantize_per_channel_affine`` (one axis), INT8 range, which the ONNX
  exporters lower to a ``QuantizeLinear → DequantizeLinear`` pair (both round half to even, like
  ``torch.round``). Our codes ``q ∈ [0, 2^b − 1]`` with
  zero-point ``z`` map to INT8 as ``q − 2^(b−1)`` with zero-point ``z − 2^(b−1)`` (so 8-bit
  symmetric quantizers get zero-point 0). Below 8 bits a ``Clip`` to the low-bit range precedes
  the pair, so the INT8 tensor only holds values of the ``b``-bit grid.
* :class:`~edgecompress.quantize.modules.QuantLinear` with a uniform weight quantizer →
  :class:`QDQLinear`: the weight codes are stored as an INT8 ``[in, out]`` initializer with a
  per-output-channel ``DequantizeLinear`` (axis 1 of the MatMul weight, i.e. axis 0 of the
  ``[out, in]`` PyTorch weight) feeding ``MatMul`` directly, then the float bias ``Add`` — the
  shape ONNX Runtime fuses into ``MatMulIntegerToFloat`` / ``QLinearMatMul`` and TensorRT into an
  INT8 GEMM. A Linear whose *input* has no INT8 Q/DQ (a log/TanQ input, or none) keeps its
  dequantized weight in float instead: runtimes turn a lone weight ``DequantizeLinear`` into a
  weight-only kernel that re-quantizes the activation (ONNX Runtime's ``MatMulNBits`` at its
  default accuracy level 4 does; measured output cosine 0.97 instead of 1.0 on an AdaLog W4A4
  ViT), which would break the exported model's fidelity.
* ``weight_dtype``: ``"int8"`` stores the weight codes as ``q − 2^(b−1)`` in INT8 (TensorRT needs
  it); ``"uint8"`` stores the codes ``q ∈ [0, 2^b − 1]`` themselves in UINT8 with zero-point ``z``.
  ONNX Runtime then runs ``MatMulIntegerToFloat`` with u8×u8 instead of u8×s8 kernels. On x86 CPUs
  without VNNI its u8×s8 kernels use ``VPMADDUBSW``, whose int16 pair sums saturate for
  full-range 8-bit weights (measured on an AVX2-only AMD EPYC: a 384×1536 W8A8 layer off by 27 %
  of its output range); the u8×u8 kernels widen first and are exact (same layer: error 4e-6, still
  1.75× faster than the float path). See :func:`edgecompress.export.runtime.resolve_weight_dtype`.
* ``target="tensorrt"``: TensorRT only accepts zero-point 0. An activation quantizer whose INT8
  zero-point ``z'`` is not 0 (asymmetric, or the unsigned softmax output) is written in the exact
  offset form ``DQ(Q(x + s·z')) − s·z'`` with zero-point 0. Weight zero-points cannot be moved
  like that; they stay and :func:`edgecompress.export.tensorrt.check_tensorrt_ready` reports them.
* Any other quantizer: its own ``onnx_export_module()`` if it has one, else a factory registered
  with :func:`register_export_form` under its class name, else its plain torch ``forward`` (a
  faithful float subgraph of the fake-quant math).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from edgecompress.quantize.modules import QuantLinear, UniformQuantizer
from edgecompress.quantize.uniform import quantize_uniform

EXPORT_FORMS: dict[str, Callable[[nn.Module, str], nn.Module]] = {}
TARGETS = ("onnxruntime", "tensorrt")
WEIGHT_DTYPES = ("int8", "uint8")
INT8_MIN, INT8_MAX = -128, 127


def register_export_form(class_name: str):
    """Decorator: ``factory(module, target) -> nn.Module`` used to export modules of ``class_name``."""

    def deco(factory):
        EXPORT_FORMS[class_name] = factory
        return factory

    return deco


def _decomposed_ops() -> None:
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
        _decomposed_ops()
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


class QDQLinear(nn.Module):
    """``MatMul(in_quant(x), DequantizeLinear(W_int8ᵀ, axis=1)) + bias`` (float weight if not uniform)."""

    def __init__(self, layer: QuantLinear, target: str = "onnxruntime", weight_dtype: str = "int8"):
        super().__init__()
        _decomposed_ops()
        if weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype must be one of {WEIGHT_DTYPES}, got {weight_dtype!r}")
        self.in_quant = export_module(layer.in_quant, target)
        self.bias = (
            None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        )
        wq = layer.w_quant
        self.int8 = (
            isinstance(wq, UniformQuantizer)
            and quant_axis(wq.scale) in (None, 0)
            and isinstance(self.in_quant, QDQActivation)  # weight-only DQ: see the module docstring
        )
        w = layer.weight.detach().float()  # [out, in]
        if not self.int8:  # its dequantized weight values, in float
            self.register_buffer("w_t", layer.quantized_weight().float().t().contiguous())  # [in, out]
            return
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
        y = torch.matmul(self.in_quant(x), self.weight_t())  # [..., out]
        return y if self.bias is None else y + self.bias


def export_module(mod: nn.Module, target: str = "onnxruntime", weight_dtype: str = "int8") -> nn.Module:
    """The export form of one module (itself when it has none)."""
    _load_forms()
    own = getattr(mod, "onnx_export_module", None)
    if callable(own):
        return own()
    factory = EXPORT_FORMS.get(type(mod).__name__)
    if factory is not None:
        return factory(mod, target)
    if isinstance(mod, QuantLinear):
        return QDQLinear(mod, target, weight_dtype)
    if isinstance(mod, UniformQuantizer):
        try:
            return QDQActivation(mod, target)
        except ValueError:  # scale varies along several axes: no Q/DQ form, keep the float math
            return mod
    return mod


def _load_forms() -> None:
    """Import the modules that register export forms (kept lazy to avoid an import cycle)."""
    from edgecompress.export import lut  # noqa: F401


def _is_quantizer(mod: nn.Module) -> bool:
    return (
        callable(getattr(mod, "onnx_export_module", None))
        or type(mod).__name__ in EXPORT_FORMS
        or isinstance(mod, (QuantLinear, UniformQuantizer))
    )


def to_export_form(
    model: nn.Module, target: str = "onnxruntime", weight_dtype: str = "int8"
) -> tuple[nn.Module, dict[str, int]]:
    """A copy of ``model`` with every quantizer in its export form; returns it and a count per form."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    _load_forms()
    model = copy.deepcopy(model).eval()
    counts: dict[str, int] = {}
    names = [n for n, m in model.named_modules() if n and _is_quantizer(m)]
    done: list[str] = []
    for name in names:
        if any(name.startswith(d + ".") for d in done):  # inside a QuantLinear already converted
            continue
        new = export_module(model.get_submodule(name), target, weight_dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        counts[type(new).__name__] = counts.get(type(new).__name__, 0) + 1
        done.append(name)
    return model, counts


def has_quantizers(model: nn.Module) -> bool:
    """Whether ``model`` holds any quantizer module (decides float vs quantized verification)."""
    _load_forms()
    return any(_is_quantizer(m) for m in model.modules())
