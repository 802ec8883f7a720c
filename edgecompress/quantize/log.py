"""Logarithmic quantizers as pure functions: log2 (FQ-ViT), log√2 (RepQ-ViT) and AdaLog.

All three share one form. With ``k`` the number of codes per octave (log2: ``k = 1``; log√2:
``k = 2``; AdaLog: ``k = r / q`` with ``r = 37`` fixed and the integer ``q`` searched in 10..137)::

    x_s  = clamp(x / s, 1e-15, 1)
    code = round(-log2(x_s) * k)          # 0 means x = s; larger codes are smaller values
    x̂    = s * 2^(-code / k)

AdaLog follows the ECCV 2024 paper and its official code (GoatWu/AdaLog, ``quantizers/
logarithm.py``), which is what METHODS.md §2 describes. Its deployed ("hardware") dequantizer
avoids a non-integer power: with ``m = code * q`` (an integer), ``2^(-code*q/r) =
2^(-floor(m / r)) * 2^(-(m mod r) / r)``; the fractional power comes from a table of ``r`` entries
``T[j] = round(2^(-j/r) * (2^(b+1) - 2)) / (2^(b+1) - 2)`` and the integer power is a shift.

Conventions beyond those of :mod:`edgecompress.quantize.uniform`:

* **Zero.** A log grid has no zero, yet softmax and post-GELU inputs are full of values far below
  the smallest level. Values whose code would reach ``n_value_codes`` are *flushed* to exact 0 and
  receive the reserved code ``n_value_codes`` (the "zero code"). Default (``strict_bits=False``,
  the papers' and official code's convention): ``2^b`` value codes ``0 .. 2^b-1`` plus the zero
  code ``2^b`` — i.e. ``2^b + 1`` levels, a b-bit code plus a zero flag. ``strict_bits=True``
  keeps exactly ``2^b`` levels: value codes ``0 .. 2^b-2`` and zero code ``2^b - 1``. The
  published accuracy figures use the first convention, so it is the default; the exporter's
  lookup table (:func:`log_code_table`, :func:`adalog_code_table`) has one entry per code,
  the zero code included (its entry is 0).
* ``scale`` (and ``q`` for AdaLog) broadcast against ``x``, so a leading candidate dimension can
  be scored in one batched op by the searches in :mod:`edgecompress.quantize.search`.
* Inputs ``≤ 0`` get the zero code. (The official code clamps them to ``1e-15`` and relies on the
  code overflowing, which fails for coarse bases: AdaLog with ``q = 137`` at 4 bits maps
  ``1e-15`` to code 13, a value of ~3.5e-15 instead of 0.) Softmax probabilities and shifted GELU
  outputs are ``≥ 0``.
"""

from __future__ import annotations

import torch

from edgecompress.quantize.uniform import levels, straight_through

ADALOG_R = 37
"""AdaLog's fixed numerator ``r`` (the log base is ``2^(q/r)``)."""
ADALOG_Q_RANGE = (10, 137)
"""Inclusive range of AdaLog's searched integer ``q`` (base ``2^(q/37)`` ≈ 1.21 … 13.0)."""
_X_MIN = 1e-15


def n_value_codes(bits: int, strict_bits: bool = False) -> int:
    """Number of nonzero levels; the zero code equals this number (see module docstring)."""
    return levels(bits) - 1 if strict_bits else levels(bits)


def _quantize_log(
    x: torch.Tensor, scale: torch.Tensor, inv_step: torch.Tensor | float, bits: int, strict_bits: bool
) -> torch.Tensor:
    """Codes ``round(-log2(clamp(x/s)) * inv_step)``; codes past the last level become the zero code."""
    n = n_value_codes(bits, strict_bits)
    x_s = torch.clamp(x / scale, _X_MIN, 1.0)
    codes = torch.round(-torch.log2(x_s) * inv_step)
    return torch.where((codes >= n) | (x <= 0), torch.full_like(codes, float(n)), codes)


def _dequantize_log(
    codes: torch.Tensor, scale: torch.Tensor, inv_step: torch.Tensor | float, bits: int, strict_bits: bool
) -> torch.Tensor:
    """``s * 2^(-code / inv_step)``, exact 0 for the zero code."""
    zero = codes >= n_value_codes(bits, strict_bits)
    values = scale * torch.exp2(-codes / inv_step)
    return torch.where(zero, torch.zeros_like(values), values)


def _ste(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    return straight_through(x, xq)


# --- log2 (FQ-ViT) -------------------------------------------------------------------------------


def quantize_log2(x: torch.Tensor, scale: torch.Tensor, bits: int, strict_bits: bool = False) -> torch.Tensor:
    """FQ-ViT log2 codes ``round(-log2(x / s))`` (zero code for flushed values)."""
    return _quantize_log(x, scale, 1.0, bits, strict_bits)


def dequantize_log2(
    codes: torch.Tensor, scale: torch.Tensor, bits: int, strict_bits: bool = False
) -> torch.Tensor:
    """``s * 2^(-code)``; 0 for the zero code."""
    return _dequantize_log(codes, scale, 1.0, bits, strict_bits)


def fake_quant_log2(
    x: torch.Tensor, scale: torch.Tensor, bits: int, strict_bits: bool = False
) -> torch.Tensor:
    """log2 quantize-dequantize with a straight-through gradient."""
    return _ste(x, dequantize_log2(quantize_log2(x, scale, bits, strict_bits), scale, bits, strict_bits))


# --- log√2 (RepQ-ViT) ----------------------------------------------------------------------------


def quantize_logsqrt2(
    x: torch.Tensor, scale: torch.Tensor, bits: int, strict_bits: bool = False
) -> torch.Tensor:
    """RepQ-ViT log√2 codes ``round(-2 * log2(x / s))`` (zero code for flushed values)."""
    return _quantize_log(x, scale, 2.0, bits, strict_bits)


def dequantize_logsqrt2(
    codes: torch.Tensor, scale: torch.Tensor, bits: int, strict_bits: bool = False
) -> torch.Tensor:
    """``s * 2^(-code / 2)``; 0 for the zero code.

    RepQ-ViT deploys this as ``s * 2^(-ceil(code/2)) * (√2 if code is odd else 1)``, which is the
    same number (one shift and one optional constant multiply), so no separate hardware form.
    """
    return _dequantize_log(codes, scale, 2.0, bits, strict_bits)


def fake_quant_logsqrt2(
    x: torch.Tensor, scale: torch.Tensor, bits: int, strict_bits: bool = False
) -> torch.Tensor:
    """log√2 quantize-dequantize with a straight-through gradient."""
    return _ste(
        x, dequantize_logsqrt2(quantize_logsqrt2(x, scale, bits, strict_bits), scale, bits, strict_bits)
    )


# --- AdaLog (ECCV 2024) --------------------------------------------------------------------------


def adalog_fraction_table(bits: int, r: int = ADALOG_R, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """AdaLog's table ``T[j] = round(2^(-j/r) * (2^(b+1)-2)) / (2^(b+1)-2)`` for ``j = 0..r-1``.

    The entries are multiples of ``1 / (2^(b+1) - 2)``, i.e. each is within half that step of
    ``2^(-j/r)`` (computed in float64, then cast).
    """
    denom = float(2 ** (bits + 1) - 2)
    j = torch.arange(r, dtype=torch.float64)  # [r]
    return (torch.round(torch.exp2(-j / r) * denom) / denom).to(dtype)


def quantize_adalog(
    x: torch.Tensor,
    scale: torch.Tensor,
    q: torch.Tensor | int,
    bits: int,
    r: int = ADALOG_R,
    strict_bits: bool = False,
) -> torch.Tensor:
    """AdaLog codes ``round(-log2(clamp(x/s, 1e-15, 1)) * r / q)`` (zero code for flushed values).

    ``q`` may be an int or a tensor broadcasting against ``x`` (a batch of candidates).
    """
    q_t = torch.as_tensor(q, dtype=x.dtype, device=x.device)
    return _quantize_log(x, scale, r / q_t, bits, strict_bits)


def dequantize_adalog(
    codes: torch.Tensor,
    scale: torch.Tensor,
    q: torch.Tensor | int,
    bits: int,
    r: int = ADALOG_R,
    hardware: bool = True,
    strict_bits: bool = False,
) -> torch.Tensor:
    """AdaLog values for ``codes``.

    ``hardware=True`` (the deployed form, and what the official code runs at evaluation):
    ``s * 2^(-floor(code*q/r)) * T[(code*q) mod r]`` with integer arithmetic on ``code*q``.
    ``hardware=False``: the ideal ``s * 2^(-code*q/r)``. Zero code → exact 0 in both.
    """
    if not hardware:
        q_t = torch.as_tensor(q, dtype=codes.dtype, device=codes.device)
        return _dequantize_log(codes, scale, r / q_t, bits, strict_bits)
    n = n_value_codes(bits, strict_bits)
    zero = codes >= n
    m = (
        torch.clamp(codes, max=n - 1).long() * torch.as_tensor(q, device=codes.device).long()
    )  # code * q, exact
    table = adalog_fraction_table(bits, r, codes.dtype).to(codes.device)  # [r]
    unit = torch.exp2(-torch.div(m, r, rounding_mode="floor").to(codes.dtype)) * table[m % r]  # exact product
    values = scale * unit
    return torch.where(zero, torch.zeros_like(values), values)


def fake_quant_adalog(
    x: torch.Tensor,
    scale: torch.Tensor,
    q: torch.Tensor | int,
    bits: int,
    r: int = ADALOG_R,
    hardware: bool = True,
    strict_bits: bool = False,
) -> torch.Tensor:
    """AdaLog quantize-dequantize with a straight-through gradient."""
    codes = quantize_adalog(x, scale, q, bits, r, strict_bits)
    return _ste(x, dequantize_adalog(codes, scale, q, bits, r, hardware, strict_bits))


# --- lookup tables for export --------------------------------------------------------------------


def log_code_table(bits: int, codes_per_octave: float, strict_bits: bool = False) -> torch.Tensor:
    """Unit-scale value of every code of a log2 (``1``) or log√2 (``2``) quantizer, zero code last.

    Shape ``[n_value_codes + 1]``; multiply by the scale to get values. Float32.
    """
    codes = torch.arange(n_value_codes(bits, strict_bits) + 1, dtype=torch.float32)
    return _dequantize_log(codes, torch.tensor(1.0), codes_per_octave, bits, strict_bits)


def adalog_code_table(
    q: int, bits: int, r: int = ADALOG_R, hardware: bool = True, strict_bits: bool = False
) -> torch.Tensor:
    """Unit-scale value of every AdaLog code, zero code last: ``[n_value_codes + 1]`` float32.

    ``dequantize_adalog(codes, s, q, bits) == s * adalog_code_table(q, bits)[codes]``, which is the
    form the ONNX exporter needs (a Gather on this table, then a Mul by the scale).
    """
    codes = torch.arange(n_value_codes(bits, strict_bits) + 1, dtype=torch.float32)
    return dequantize_adalog(codes, torch.tensor(1.0), int(q), bits, r, hardware, strict_bits)
