"""Quantizer modules for the log-domain and tangent quantizers (log2, log√2, AdaLog, TanQ).

Same contract as :class:`edgecompress.quantize.modules.UniformQuantizer`: parameters are buffers
(saved in ``model.safetensors``, their shapes restored on load), ``forward`` fake-quantizes with the pure
functions of :mod:`~edgecompress.quantize.log` / :mod:`~edgecompress.quantize.tan`, the class is a
registered swap (``swap_config`` / ``from_swap``) so ``restore()`` rebuilds it, ``describe()`` is
one row of the per-layer report (merged with ``.stats``), and ``code_table()`` gives the
exporter the unit-scale value of every code (dequantized value = ``scale * table[code]``).
"""

from __future__ import annotations

import math

import torch

from edgecompress.quantize.log import (
    ADALOG_R,
    adalog_code_table,
    fake_quant_adalog,
    fake_quant_log2,
    fake_quant_logsqrt2,
    log_code_table,
)
from edgecompress.quantize.modules import Quantizer
from edgecompress.quantize.tan import fake_quant_tanq, tanq_code_table
from edgecompress.structure import register_swap

_LOG_KINDS = {"log2": (fake_quant_log2, 1.0), "logsqrt2": (fake_quant_logsqrt2, 2.0)}


def _scalar(t: torch.Tensor) -> float | dict:
    t = t.flatten()
    return float(t[0]) if t.numel() == 1 else {"min": float(t.min()), "max": float(t.max()), "n": t.numel()}


@register_swap
class LogQuantizer(Quantizer):
    """log2 (FQ-ViT, ``kind="log2"``) or log√2 (RepQ-ViT, ``kind="logsqrt2"``) per-tensor quantizer."""

    def __init__(self, bits: int, kind: str = "logsqrt2", role: str = "", strict_bits: bool = False):
        super().__init__()
        if kind not in _LOG_KINDS:
            raise ValueError(f"unknown log quantizer kind {kind!r}; expected one of {sorted(_LOG_KINDS)}")
        self.bits, self.kind, self.role, self.strict_bits = bits, kind, role, strict_bits
        self.register_buffer("scale", torch.ones(()))
        self.stats: dict = {}

    def set_params(self, scale: torch.Tensor) -> LogQuantizer:
        self.scale = scale.detach().float().clone()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fq, _ = _LOG_KINDS[self.kind]
        return fq(x, self.scale.to(x.dtype), self.bits, self.strict_bits)

    def code_table(self) -> torch.Tensor:
        return log_code_table(self.bits, _LOG_KINDS[self.kind][1], self.strict_bits)

    def swap_config(self) -> dict:
        return {"bits": self.bits, "kind": self.kind, "role": self.role, "strict_bits": self.strict_bits}

    @classmethod
    def from_swap(cls, original, config: dict) -> LogQuantizer:
        return cls(**config)

    def describe(self) -> dict:
        row = {"quantizer": self.kind, "role": self.role, "bits": self.bits, "scale": _scalar(self.scale)}
        return {**row, **self.stats}


@register_swap
class AdaLogQuantizer(Quantizer):
    """AdaLog (ECCV 2024): base ``2^(q/37)`` with searched integer ``q``; LUT + shift dequant.

    ``shift`` is added before quantizing (post-GELU: c = 0.16997…). With ``fold_shift=True`` it is
    *not* subtracted after: the consuming Linear's bias carries ``-c·W·1``
    (:func:`~edgecompress.quantize.reparam.fold_shift_into_bias_`); with ``False`` (a Linear
    without bias) the output is ``Q(x + c) - c``. ``hardware=True`` dequantizes with the lookup
    table, as the official code evaluates.
    """

    def __init__(
        self,
        bits: int,
        role: str = "",
        shift: float = 0.0,
        fold_shift: bool = True,
        hardware: bool = True,
        strict_bits: bool = False,
    ):
        super().__init__()
        self.bits, self.role, self.shift, self.fold_shift = bits, role, shift, fold_shift
        self.hardware, self.strict_bits = hardware, strict_bits
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("q", torch.tensor(float(ADALOG_R)))
        self.stats: dict = {}

    def set_params(self, scale: torch.Tensor, q: torch.Tensor | int) -> AdaLogQuantizer:
        self.scale = torch.as_tensor(scale).detach().float().clone()
        self.q = torch.as_tensor(q).detach().float().round().clone()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale.to(x.dtype)
        y = fake_quant_adalog(x + self.shift, s, self.q, self.bits, ADALOG_R, self.hardware, self.strict_bits)
        return y if self.fold_shift else y - self.shift

    def code_table(self) -> torch.Tensor:
        return adalog_code_table(int(self.q), self.bits, ADALOG_R, self.hardware, self.strict_bits)

    def swap_config(self) -> dict:
        return {
            "bits": self.bits, "role": self.role, "shift": self.shift, "fold_shift": self.fold_shift,
            "hardware": self.hardware, "strict_bits": self.strict_bits,
        }  # fmt: skip

    @classmethod
    def from_swap(cls, original, config: dict) -> AdaLogQuantizer:
        return cls(**config)

    def describe(self) -> dict:
        q = int(self.q)
        row = {
            "quantizer": "adalog", "role": self.role, "bits": self.bits, "q": q,
            "log_base": round(2 ** (q / ADALOG_R), 4), "scale": _scalar(self.scale), "shift": self.shift,
        }  # fmt: skip
        return {**row, **self.stats}


@register_swap
class TanQuantizer(Quantizer):
    """TanQ (our companded construction for DopQ-ViT; see :mod:`edgecompress.quantize.tan`)."""

    def __init__(self, bits: int, role: str = ""):
        super().__init__()
        self.bits, self.role = bits, role
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("alpha", torch.tensor(0.9, dtype=torch.float64))
        self.stats: dict = {}

    def set_params(self, scale: torch.Tensor, alpha: torch.Tensor | float) -> TanQuantizer:
        self.scale = torch.as_tensor(scale).detach().float().clone()
        self.alpha = torch.as_tensor(alpha, dtype=torch.float64).detach().clone()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_tanq(x, self.scale.to(x.dtype), self.alpha, self.bits)

    def code_table(self) -> torch.Tensor:
        return tanq_code_table(float(self.alpha), self.bits)

    def swap_config(self) -> dict:
        return {"bits": self.bits, "role": self.role}

    @classmethod
    def from_swap(cls, original, config: dict) -> TanQuantizer:
        return cls(**config)

    def describe(self) -> dict:
        a = float(self.alpha)
        row = {
            "quantizer": "tanq", "role": self.role, "bits": self.bits, "alpha": round(a, 6),
            "end_slope": round(a * math.pi / math.sin(a * math.pi), 3), "scale": _scalar(self.scale),
        }  # fmt: skip
        return {**row, **self.stats}
