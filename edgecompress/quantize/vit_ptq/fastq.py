"""Search-time quantize-dequantize for a batch of candidates, written to allocate one output.

The searches score 128 candidates × a whole activation tensor per call. On CPU a chain of
out-of-place ops allocates (and page-faults) a fresh candidate-sized tensor per op, which measured
~20× slower than one allocation followed by in-place ops. These functions compute *the same
numbers* as the reference quantizers in :mod:`~edgecompress.quantize.uniform`,
:mod:`~edgecompress.quantize.log` and :mod:`~edgecompress.quantize.tan` (same operations in the
same order, dequantization through the same code tables; tests check bit equality) without the
straight-through bookkeeping, and return a new tensor shaped like the broadcast of ``x`` and the
parameters (the candidate dimension leading).
"""

from __future__ import annotations

import functools
import math

import torch

from edgecompress.quantize.log import ADALOG_R, adalog_code_table, log_code_table, n_value_codes
from edgecompress.quantize.tan import _unit_tables
from edgecompress.quantize.uniform import levels
from edgecompress.quantize.vit_ptq import fused

_X_MIN = 1e-15


def fq_uniform(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int) -> torch.Tensor:
    """``(clamp(round(x / s) + z, 0, 2^b - 1) - z) * s``."""
    y = x / scale
    return y.round_().add_(zp).clamp_(0, levels(bits) - 1).sub_(zp).mul_(scale)


@functools.lru_cache(maxsize=1024)
def _adalog_table(q: int, bits: int) -> torch.Tensor:
    return adalog_code_table(q, bits)


def _gather_rows(tables: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``tables[c, codes[c, ...]]`` for tables ``[C, L]`` and float codes ``[C, ...]`` (a single
    table row serves every leading index). One ``index_select`` on the flattened tables with int32
    indices: measured 3× faster than ``gather``, whose int64 index conversion dominated."""
    rows, width = tables.shape
    idx = codes.to(torch.int32)
    if rows > 1:
        offsets = torch.arange(rows, dtype=torch.int32, device=codes.device) * width
        idx += offsets.reshape(-1, *([1] * (codes.dim() - 1)))
    return torch.index_select(tables.reshape(-1), 0, idx.reshape(-1)).reshape(codes.shape)


def _div(x: torch.Tensor, scale: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``x / scale`` as a new tensor already shaped like the broadcast with ``other``."""
    shape = torch.broadcast_shapes(x.shape, scale.shape, other.shape)
    return x.expand(shape) / scale if x.shape != shape else x / scale


def _log_codes_(y: torch.Tensor, inv_step: torch.Tensor | float, n: int, zero: torch.Tensor) -> torch.Tensor:
    """In place on ``y = x / s``: codes as :func:`~edgecompress.quantize.log._quantize_log`."""
    y.clamp_(_X_MIN, 1.0).log2_().neg_().mul_(inv_step).round_()
    return y.clamp_(max=float(n)).masked_fill_(zero, float(n))


def fq_adalog(x: torch.Tensor, scale: torch.Tensor, q: torch.Tensor, bits: int) -> torch.Tensor:
    """AdaLog with the hardware (LUT) dequant; ``q`` must be shaped ``[C, 1, …]`` (or 0-d)."""
    n = n_value_codes(bits)
    qs = q.reshape(-1)
    tables = torch.stack([_adalog_table(int(v), bits) for v in qs.tolist()]).to(x.device, x.dtype)  # [C, n+1]
    inv_step = ADALOG_R / q.to(x.dtype)
    y = _log_codes_(_div(x, scale, inv_step), inv_step, n, x <= 0)
    return _gather_rows(tables, y).mul_(scale)


def fq_log(x: torch.Tensor, scale: torch.Tensor, bits: int, codes_per_octave: float) -> torch.Tensor:
    """log2 (``codes_per_octave = 1``) or log√2 (``2``)."""
    n = n_value_codes(bits)
    table = log_code_table(bits, codes_per_octave).to(x.device, x.dtype)
    y = _log_codes_(x / scale, codes_per_octave, n, x <= 0)
    return _gather_rows(table[None], y).mul_(scale)


def fq_tanq(x: torch.Tensor, scale: torch.Tensor, alpha: torch.Tensor, bits: int) -> torch.Tensor:
    """TanQ; ``alpha`` must be shaped ``[C, 1, …]`` (or 0-d)."""
    top = levels(bits) - 1
    a = alpha.to(x.dtype)
    y = _div(x, scale, a).clamp_(0.0, 1.0).sub_(0.5).mul_(a * math.pi)
    y.tan_().div_(2.0 * torch.tan(a * math.pi / 2)).add_(0.5)
    y.mul_(top).round_().clamp_(0, top)
    tables = _unit_tables(alpha.reshape(-1).to(torch.float64), bits).to(x.dtype)  # [C, L]
    return _gather_rows(tables, y).mul_(scale)


# --- candidate families: exact x̂ (fp32) and the fast Δ = x̂ − x of the bf16 scoring path ---------
#
# ``prepare(x)`` returns per-element tensors shaped like ``x`` (computed once per search, sliced
# with ``x``); ``delta(x, prep, *params, dtype)`` returns ``x̂ − x`` for the candidates, computed
# in fp32 with fewer passes than ``quant(x) − x`` and rounded once to ``dtype``. The fast forms
# agree with the exact ones up to fp32 rounding (``x/s`` rounded once vs ``log2(x) − log2(s)``):
# tests bound the difference; they serve only the bf16 scores, whose survivors are re-scored with
# the exact ``__call__``.


def _minus(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a − b`` in fp32, written (rounded once) straight into a ``dtype`` tensor."""
    if dtype == a.dtype:
        return a.sub_(b)
    return torch.sub(a, b, out=torch.empty(a.shape, dtype=dtype, device=a.device))


class UniformCandidates:
    """Asymmetric uniform quantizer at ``bits``: params ``(scale, zero_point)``."""

    def __init__(self, bits: int):
        self.bits = bits

    def __call__(self, x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        return fq_uniform(x, scale, zp, self.bits)

    def prepare(self, x: torch.Tensor) -> tuple:
        return ()

    def delta(self, x, prep, scale, zp, *, dtype: torch.dtype) -> torch.Tensor:
        """``clamp(round(x/s), −z, 2^b−1−z)·s − x`` (the same fp32 values as ``fq_uniform − x``:
        integer bounds commute with the shift by ``z``), in five passes instead of eight."""
        top = levels(self.bits) - 1
        u = _div(x, scale, zp).round_()
        u.clamp_min_(-zp).clamp_max_(top - zp)  # tensor bounds: 4× faster than clamp_
        return _minus(u.mul_(scale), x, dtype)

    def fused_error(self, x, prep, scale, zp, p, b) -> torch.Tensor:
        """``Σ_r (Δ P + B)²`` of one candidate in one compiled pass (:mod:`~edgecompress.quantize.vit_ptq.fused`)."""
        return fused.uniform_error(x, scale, -zp, levels(self.bits) - 1 - zp, p, b)

    def stacked_error(self, x, prep, scale, zp, p, b) -> torch.Tensor:
        """:meth:`fused_error` of ``C`` candidates (params ``[..., C, 1, 1]``) in one product: ``[..., C, T]``."""
        return fused.uniform_stacked_error(x, scale, -zp, levels(self.bits) - 1 - zp, p, b)

    # the step-function view of :mod:`~edgecompress.quantize.vit_ptq.sweep`: x̂ − x = a·V(key) − base
    sweep_kind = "uniform"

    def sweep_view(self, x: torch.Tensor, prep: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """``(key, base)``: ``V`` is a non-decreasing step function of ``key = x``; ``base = x``."""
        return x, x

    def sweep_group(self, scale: torch.Tensor, zp: torch.Tensor) -> float:
        """Candidates of one group share ``V``'s levels (here: the zero-point)."""
        return float(zp)

    def sweep_factor(self, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        return scale

    def sweep_thresholds(self, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        """Keys where ``V`` steps up (float64, up to ties): ``V ≥ v ⟺ x ≥ (v − ½)·s``."""
        v = torch.arange(1, levels(self.bits), dtype=torch.float64) - float(zp)
        return (v - 0.5) * float(scale)

    def sweep_values(self, key: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        """``V`` of the given keys, with :meth:`delta`'s operations: ``clamp(round(x/s), −z, 2^b−1−z)``."""
        u = (key / scale).round_()
        return u.clamp_min_(-zp).clamp_max_(levels(self.bits) - 1 - zp)


class AdaLogCandidates:
    """AdaLog (LUT dequant) on ``x + shift``, minus ``shift``: params ``(scale, q)``, or ``(q,)``
    with a fixed ``scale`` (the softmax quantizer, scale 1)."""

    def __init__(self, bits: int, shift: float = 0.0, scale: float | None = None):
        self.bits, self.shift, self.scale = bits, shift, scale

    def __call__(self, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        scale, q = self._params(params, x)
        if not self.shift:
            return fq_adalog(x, scale, q, self.bits)
        return fq_adalog(x + self.shift, scale, q, self.bits).sub_(self.shift)

    def _params(self, params, x) -> tuple[torch.Tensor, torch.Tensor]:
        if self.scale is None:
            return params
        return torch.tensor(self.scale, dtype=x.dtype, device=x.device), params[0]

    def prepare(self, x: torch.Tensor) -> tuple:
        """``(x + shift, λ)`` with ``λ = −log2(x + shift)``, ``+inf`` where ``x + shift ≤ 0`` (zero code)."""
        xs = x + self.shift if self.shift else x
        lam = torch.where(xs > 0, xs, 1.0).log2_().neg_().masked_fill_(xs <= 0, float("inf"))
        return xs, lam

    def delta(self, x, prep, *params, dtype: torch.dtype) -> torch.Tensor:
        """Codes ``round(max(λ + log2 s, 0)·r/q)`` (≥ 2^b → the zero code), then ``s·T_q[code] − (x + shift)``.

        With a fixed scale 1 the codes are the exact ones (``λ·r/q`` is what the exact form computes)
        except for ``0 < x < 1e-15`` (flushed to 0 here; a value ~1e-15 in the exact form); with a
        searched scale ``log2 x − log2 s`` may round apart from ``log2(x/s)`` by an ulp."""
        xs, lam = prep
        scale, q = self._params(params, x)
        n = n_value_codes(self.bits)
        tables, inv_step = self._tables(x, scale, q), ADALOG_R / q.to(x.dtype)
        if self.scale is None:
            u = torch.add(lam, torch.log2(scale)).mul_(inv_step)
        else:
            u = lam * inv_step
        u.clamp_(min=0.0).round_().clamp_(max=float(n))
        return _minus(_gather_rows(tables, u), xs, dtype)

    def _tables(self, x, scale, q) -> torch.Tensor:
        """``s·T_q`` per candidate: ``[C, n + 1]`` (zero code last)."""
        tables = torch.stack([_adalog_table(int(v), self.bits) for v in q.reshape(-1).tolist()])
        return tables.to(x.device, x.dtype) * (scale.reshape(-1, 1) if self.scale is None else self.scale)

    def fused_error(self, x, prep, *params_and_pb) -> torch.Tensor:
        """``Σ_r (Δ P + B)²`` of one candidate in one compiled pass (:mod:`~edgecompress.quantize.vit_ptq.fused`)."""
        *params, p, b = params_and_pb
        xs, lam = prep
        scale, q = self._params(params, x)
        l2s = torch.log2(scale).reshape(()) if self.scale is None else torch.zeros(())
        inv = (ADALOG_R / q.to(x.dtype)).reshape(())
        tab = self._tables(x, scale, q)[0]
        return fused.adalog_error(lam, xs, l2s, inv, tab, n_value_codes(self.bits), p, b)

    # the step-function view of :mod:`~edgecompress.quantize.vit_ptq.sweep`: x̂ − x = a·V(λ) − (x + shift)
    sweep_kind = "adalog"

    def sweep_view(self, x: torch.Tensor, prep: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """``(key, base) = (λ, x + shift)``: ``V = T_q[code]`` is a step function of ``λ`` whose
        levels descend (the zero code last); only the thresholds need to be ordered."""
        xs, lam = prep
        return lam, xs

    def sweep_group(self, *params: torch.Tensor) -> float:
        return float(params[-1])  # q: one code table

    def sweep_factor(self, *params: torch.Tensor) -> torch.Tensor:
        scale = params[0] if self.scale is None else torch.tensor(self.scale)
        return scale

    def sweep_thresholds(self, *params: torch.Tensor) -> torch.Tensor:
        """``code ≥ j ⟺ λ ≥ (j − ½)·q/r − log2 s`` for ``j = 1 … n`` (float64, up to ties)."""
        scale = float(self.sweep_factor(*params))
        j = torch.arange(1, n_value_codes(self.bits) + 1, dtype=torch.float64)
        return (j - 0.5) * float(params[-1]) / ADALOG_R - math.log2(scale)

    def sweep_values(self, lam: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        """``T_q[code]`` of the given ``λ``, codes with :meth:`delta`'s operations."""
        scale, q = self._params(params, lam)
        n = n_value_codes(self.bits)
        u = torch.add(lam, torch.log2(scale)) if self.scale is None else lam.clone()
        u.mul_(ADALOG_R / q.to(lam.dtype)).clamp_(min=0.0).round_().clamp_(max=float(n))
        return _adalog_table(int(q), self.bits).to(lam.device)[u.long()]
