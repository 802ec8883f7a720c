"""Quantizer modules: what a quantization pass puts into a slot (:mod:`edgecompress.models.slots`).

A quantizer module holds its parameters as buffers (so they live in ``model.safetensors``; their
saved per-channel/per-head shapes are restored by :func:`edgecompress.structure.load_tensors`),
fake-quantizes in ``forward``, declares ``SLOT_KIND = "quantizer"`` and a ``VERSION``, and
implements ``swap_config`` / ``from_swap`` (rebuild from ``structure.json``) and ``describe`` (one
row of the per-layer report).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from edgecompress.quantize.uniform import (
    dequantize_uniform,
    fake_quant_uniform,
    pack_codes,
    quantize_uniform,
    sqnr_db,
    unpack_codes,
)
from edgecompress.structure import register_swap

__all__ = ["Quantizer", "UniformQuantizer", "deployed_size_bytes", "sqnr_db"]


class Quantizer(nn.Module):
    """Base of every quantizer module (a slot element of kind ``"quantizer"``)."""

    SLOT_KIND: ClassVar[str] = "quantizer"
    VERSION: ClassVar[int] = 1


@register_swap
class UniformQuantizer(Quantizer):
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

    def rows(self, values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Fake-quantize rows ``values = W[ids]`` of a per-row (``channel``) quantized table with
        their own rows' parameters: ``self(W)[ids]`` without touching the other rows."""
        s = self.scale.reshape(-1, 1)[ids].to(values.dtype)
        z = self.zero_point.reshape(-1, 1)[ids].to(values.dtype)
        return fake_quant_uniform(values, s, z, self.bits)

    # ---- integer storage of a weight (called by SlotLinear's state-dict hooks) ----
    def encode_weight(self, w: torch.Tensor) -> torch.Tensor | None:
        """``w``'s codes packed as uint8 (:func:`~edgecompress.quantize.uniform.pack_codes`), or
        None above 8 bits."""
        if self.bits > 8:
            return None
        return pack_codes(quantize_uniform(w.float(), self.scale, self.zero_point, self.bits), self.bits)

    def decode_weight(self, packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, shape):
        """The dequantized weight of ``shape`` from packed codes and the saved scale/zero-point."""
        codes = unpack_codes(packed, self.bits, shape).float()
        return dequantize_uniform(codes, scale.float(), zero_point.float())

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
