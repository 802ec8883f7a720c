"""Export forms of the non-uniform quantizers (log2, log√2, AdaLog, TanQ): code, then table lookup.

No runtime has an INT8 kernel for a log or companded grid, so these export as the faithful
dequantization subgraph: compute the integer code with the quantizer's own pure function
(``Div → Clip → Log → Mul → Round → Where``, or the tangent compander for TanQ), then
``Gather`` the unit value of that code from the quantizer's ``code_table()`` and ``Mul`` by the
scale. That is exactly ``scale * table[code]``, which the quantizer modules document to equal
their fake-quant output (without the straight-through ``x + (x̂ − x)`` rounding noise).

The forms register by class with :func:`edgecompress.export.forms.registry.register_form`
(category ``"quantized"``), so a quantizer module needs nothing export-specific besides
``code_table()``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from edgecompress.export.forms.registry import ExportOptions, register_form
from edgecompress.quantize.log import ADALOG_R, quantize_adalog, quantize_log2, quantize_logsqrt2
from edgecompress.quantize.log_modules import AdaLogQuantizer, LogQuantizer, TanQuantizer
from edgecompress.quantize.tan import quantize_tanq


class LUTQuantizer(nn.Module):
    """``y = scale · table[codes(x + shift)] − unshift``: a Gather on the code→value table."""

    def __init__(self, codes: Callable[[torch.Tensor], torch.Tensor], table: torch.Tensor, scale: torch.Tensor,
                 shift: float = 0.0, unshift: float = 0.0, kind: str = ""):  # fmt: skip
        super().__init__()
        self._codes = codes
        self.register_buffer("table", table.detach().float().clone())  # [n_codes]
        self.register_buffer("scale", scale.detach().float().clone())
        self.shift, self.unshift, self.kind = shift, unshift, kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shift:
            x = x + self.shift
        codes = self._codes(x).to(torch.int64)  # integer codes, zero code included
        y = self.scale * self.table[codes]  # Gather, then Mul
        return y - self.unshift if self.unshift else y

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, codes={self.table.numel()}"


@register_form(LogQuantizer, "quantized")
def _log(mod: LogQuantizer, opts: ExportOptions) -> nn.Module:
    fn = quantize_log2 if mod.kind == "log2" else quantize_logsqrt2
    scale = mod.scale.float()
    return LUTQuantizer(
        lambda x: fn(x, scale.to(x.dtype), mod.bits, mod.strict_bits), mod.code_table(), scale, kind=mod.kind
    )


@register_form(AdaLogQuantizer, "quantized")
def _adalog(mod: AdaLogQuantizer, opts: ExportOptions) -> nn.Module:
    scale, q = mod.scale.float(), int(mod.q)
    unshift = 0.0 if mod.fold_shift else mod.shift
    return LUTQuantizer(
        lambda x: quantize_adalog(x, scale.to(x.dtype), q, mod.bits, ADALOG_R, mod.strict_bits),
        mod.code_table(), scale, shift=mod.shift, unshift=unshift, kind="adalog",
    )  # fmt: skip


@register_form(TanQuantizer, "quantized")
def _tanq(mod: TanQuantizer, opts: ExportOptions) -> nn.Module:
    scale, alpha = mod.scale.float(), float(mod.alpha)
    return LUTQuantizer(
        lambda x: quantize_tanq(x, scale.to(x.dtype), alpha, mod.bits), mod.code_table(), scale, kind="tanq"
    )
