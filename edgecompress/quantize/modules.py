"""Quantizer modules and the quantized Linear they plug into.

A quantizer module holds its parameters as buffers (so they live in ``model.safetensors``),
fake-quantizes in ``forward``, and implements ``swap_config`` / ``from_swap`` (rebuild from
``structure.json``) and ``describe`` (one row of the per-layer report). Buffers are resized on
load, so a module rebuilt from its config accepts the saved per-channel/per-head shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgecompress.models.points import QuantPoint
from edgecompress.models.targeting import register_swap
from edgecompress.quantize.uniform import fake_quant_uniform


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(‖ref‖² / ‖ref − approx‖²)`` in dB."""
    noise = (ref.double() - approx.double()).pow(2).sum()
    signal = ref.double().pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise.clamp_min(1e-300)))


class ResizableBuffers(nn.Module):
    """Mixin: on ``load_state_dict`` take the saved buffer's shape instead of failing on a mismatch."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, buf in list(self._buffers.items()):
            saved = state_dict.get(prefix + name)
            if buf is not None and saved is not None and saved.shape != buf.shape:
                self._buffers[name] = torch.empty_like(saved, dtype=buf.dtype, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@register_swap
class UniformQuantizer(ResizableBuffers):
    """Affine fake-quantizer: ``granularity`` is ``tensor``, ``channel`` (axis 0) or ``head`` (axis 1)."""

    def __init__(self, bits: int, symmetric: bool = False, granularity: str = "tensor", role: str = ""):
        super().__init__()
        self.bits, self.symmetric, self.granularity, self.role = bits, symmetric, granularity, role
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))
        self.stats: dict = {}

    def set_params(self, scale: torch.Tensor, zero_point: torch.Tensor) -> UniformQuantizer:
        self.scale = scale.detach().float().clone()
        self.zero_point = zero_point.detach().float().clone()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_uniform(x, self.scale.to(x.dtype), self.zero_point.to(x.dtype), self.bits)

    def swap_config(self) -> dict:
        return {
            "bits": self.bits,
            "symmetric": self.symmetric,
            "granularity": self.granularity,
            "role": self.role,
        }

    @classmethod
    def from_swap(cls, original, config: dict) -> UniformQuantizer:
        return cls(**config)

    def describe(self) -> dict:
        s = self.scale.flatten()
        row = {
            "quantizer": "uniform",
            "role": self.role,
            "bits": self.bits,
            "symmetric": self.symmetric,
            "granularity": self.granularity,
            "scale": float(s[0])
            if s.numel() == 1
            else {"min": float(s.min()), "max": float(s.max()), "n": s.numel()},
        }
        return {**row, **self.stats}


@register_swap
class QuantLinear(nn.Module):
    """``F.linear(in_quant(x), w_quant(W), b)``; both quantizers start as :class:`QuantPoint`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.in_quant: nn.Module = QuantPoint("linear_in")
        self.w_quant: nn.Module = QuantPoint("linear_weight")

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuantLinear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None)
        q.weight = linear.weight
        if linear.bias is not None:
            q.bias = linear.bias
        return q.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.in_quant(x), self.w_quant(self.weight), self.bias)

    def quantized_weight(self) -> torch.Tensor:
        with torch.no_grad():
            return self.w_quant(self.weight)

    def swap_config(self) -> dict:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
        }

    @classmethod
    def from_swap(cls, original, config: dict) -> QuantLinear:
        if isinstance(original, nn.Linear):
            return cls.from_linear(original)
        return cls(**config)

    def deployed_bytes(self) -> int:
        """Weight bytes at the weight quantizer's bit width plus its parameters, bias in fp32."""
        bits = getattr(self.w_quant, "bits", 32)
        n = self.weight.numel() * bits // 8
        n += sum(b.numel() * b.element_size() for b in self.w_quant.buffers())
        return n + (self.bias.numel() * 4 if self.bias is not None else 0)

    def describe(self) -> dict:
        wq = self.quantized_weight()
        return {
            "layer": "QuantLinear",
            "shape": [self.out_features, self.in_features],
            "w_bits": getattr(self.w_quant, "bits", None),
            "a_bits": getattr(self.in_quant, "bits", None),
            "weight_sqnr_db": round(sqnr_db(self.weight.detach(), wq), 2),
        }


def deployed_size_bytes(model: nn.Module) -> int:
    """Bytes of the deployable model: quantized layers at their bit width, the rest as stored."""
    total, counted = 0, set()
    for mod in model.modules():
        fn = getattr(mod, "deployed_bytes", None)
        if callable(fn):
            total += fn()
            counted.update(id(p) for p in mod.parameters())
            counted.update(id(b) for b in mod.buffers())
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in counted:
            counted.add(id(t))
            total += t.numel() * t.element_size()
    return total
