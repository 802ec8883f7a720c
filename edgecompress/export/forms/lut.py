"""Export forms of the non-uniform quantizers (log2, log√2, AdaLog, TanQ): code, then table lookup.

No runtime has an INT8 kernel for a log or companded grid, so these export as the faithful
dequantization subgraph: compute the integer code with the quantizer's own pure function
(``Div → Clip → Log → Mul → Round → Where``, or the tangent compander for TanQ), then
``Gather`` the unit value of that code from the quantizer's ``code_table()`` and ``Mul`` by the
scale. That is exactly ``scale * table[code]``, which the quantizer modules document to equal
their fake-quant output (without the straight-through ``x + (x̂ − x)`` rounding noise).

The code computation is made exact against PyTorch's (:func:`code_boundaries`): ONNX Runtime's
``Log``/``Div`` differ from ``torch.log2`` by an ulp now and then, and an input within that ulp of
a code boundary gets the neighbouring code (measured on a random ViT-S AdaLog W4A4: 2 of 6.7 M
post-GELU codes on identical inputs, each moving its layer's output by ~2e-4 relative, carried on
by the residual stream). So the graph corrects its first estimate ``c₀`` with two comparisons
against the exact float32 boundaries of PyTorch's code function, found by bisection over the
float32 line at export: ``c = c₀ + [u < T[c₀]] − [u ≥ T[c₀−1]]`` (decreasing codes: log forms;
mirrored for TanQ). Comparisons are exact in every runtime, so identical inputs give identical
codes; the estimate is never off by more than one code, which is all the correction needs.

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

_F32_MAX_KEY = 0x7F7FFFFF  # the largest finite float32, as an ordered integer key


def _to_float(key: torch.Tensor) -> torch.Tensor:
    """Ordered int64 keys → float32: ``k ≥ 0`` are the bit patterns of +floats, ``k < 0`` of −floats."""
    bits = torch.where(key >= 0, key, (-key - 1) | 0x80000000)
    return bits.to(torch.int64).bitwise_and(0xFFFFFFFF).to(torch.uint32).view(torch.float32)


def code_boundaries(codes: Callable[[torch.Tensor], torch.Tensor], n_codes: int) -> tuple[torch.Tensor, bool]:
    """The exact float32 boundaries of a monotone code function with codes ``0 … n_codes − 1``.

    Decreasing (log forms): ``T[k]`` = the smallest float with code ≤ k (k = 0 … n − 2), so code k
    is ``T[k] ≤ u < T[k−1]``. Increasing (TanQ): ``T[k]`` = the smallest float with code ≥ k + 1.
    Bisection over the ordered float32 line (34 steps, all boundaries at once), evaluating
    ``codes`` itself: the boundaries are where *PyTorch's* rounding changes the code.
    """
    ends = codes(_to_float(torch.tensor([-_F32_MAX_KEY - 1, _F32_MAX_KEY])))
    decreasing = bool(ends[0] > ends[1])
    k = torch.arange(n_codes - 1, dtype=torch.float32)
    lo = torch.full((n_codes - 1,), -_F32_MAX_KEY - 1, dtype=torch.int64)  # predicate false here
    hi = torch.full((n_codes - 1,), _F32_MAX_KEY, dtype=torch.int64)  # … and true here
    while bool((hi - lo > 1).any()):
        mid = lo + (hi - lo) // 2
        c = codes(_to_float(mid)).float()
        ok = c <= k if decreasing else c >= k + 1
        hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid)
    return _to_float(hi), decreasing


class LUTQuantizer(nn.Module):
    """``y = scale · table[codes(x + shift)] − unshift``: a Gather on the code→value table, codes
    made exact by :func:`code_boundaries` (module docstring)."""

    def __init__(self, codes: Callable[[torch.Tensor], torch.Tensor], table: torch.Tensor, scale: torch.Tensor,
                 shift: float = 0.0, unshift: float = 0.0, kind: str = ""):  # fmt: skip
        super().__init__()
        self._codes = codes
        self.register_buffer("table", table.detach().float().clone())  # [n_codes]
        self.register_buffer("scale", scale.detach().float().clone())
        self.shift, self.unshift, self.kind = shift, unshift, kind
        bounds, self.decreasing = code_boundaries(codes, self.table.numel())
        inf = torch.tensor([float("inf")])
        # padded so that bounds[c₀] / bounds[c₀ + 1] are the two boundaries around code c₀
        pad = (inf, -inf) if self.decreasing else (-inf, inf)
        self.register_buffer("bounds", torch.cat([pad[0], bounds, pad[1]]))

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integer code of every element of the quantizer's input ``x`` (zero code included),
        exactly PyTorch's: the estimate, then one step where ``u`` is on the other side of a boundary."""
        u = x + self.shift if self.shift else x
        c0 = self._codes(u).to(torch.int64)
        below, above = self.bounds[c0], self.bounds[c0 + 1]
        if self.decreasing:  # code k: bounds[k + 1] ≤ u < bounds[k]
            return c0 + (u < above).to(torch.int64) - (u >= below).to(torch.int64)
        return (
            c0 + (u >= above).to(torch.int64) - (u < below).to(torch.int64)
        )  # bounds[k] ≤ u < bounds[k + 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.scale * self.table[self.codes(x)]  # Gather, then Mul
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
