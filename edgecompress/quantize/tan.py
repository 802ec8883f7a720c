"""TanQ — a tangent-companded quantizer for post-softmax values (DopQ-ViT, arXiv 2408.03291).

The paper (v1–v3) says TanQ "better preserves the power-law distribution of post-Softmax
activations by focusing more on values near 1" but its closed form could not be read. We use the
construction of METHODS.md §3, and say so wherever it is reported: quantize uniformly in a
companded domain ``u = c(x)`` whose slope is large at both ends of ``[0, 1]``::

    c(x)    = 1/2 + tan(α·π·(x − 1/2)) / (2·tan(α·π/2))          x ∈ [0, 1], α ∈ (0, 1)
    c⁻¹(u)  = 1/2 + atan((2u − 1)·tan(α·π/2)) / (α·π)
    code    = round(c(clamp(x/s, 0, 1)) · (2^b − 1))                 codes 0 .. 2^b − 1
    x̂       = s · c⁻¹(code / (2^b − 1))

Properties that justify it: ``c(0) = 0``, ``c(1) = 1`` and ``c`` is odd about ``(½, ½)``, so the
grid is exact at 0 and at ``s`` (code 0 is an exact zero: no reserved code is needed, unlike
the log quantizers) and symmetric, dense near both 0 and ``s``, sparse in the middle. The slope at
the ends is ``c'(0) = α·π / sin(α·π)`` (1 at α → 0, where TanQ becomes the uniform quantizer; 19
at α = 0.95; 99 at α = 0.99), so the steepness α trades resolution in the middle for resolution
at the ends. α is searched per layer (:func:`tanq_alpha_candidates`); the scale is 1 for softmax
probabilities (as AdaLog fixes it), a searched value elsewhere.
"""

from __future__ import annotations

import math

import torch

from edgecompress.quantize.uniform import levels, straight_through


def tanq_alpha_candidates(n: int = 64, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Search grid for α: ``1 − 10^(−t)`` for ``t`` evenly spaced in ``[0.05, 3]`` (α ≈ 0.11 … 0.999).

    Denser near 1, where a small change of α changes the end slope ``απ/sin(απ)`` the most.
    """
    t = torch.linspace(0.05, 3.0, n, dtype=torch.float64)
    return (1.0 - torch.pow(10.0, -t)).to(dtype)  # [n]


def tan_compand(x: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """``c(x)`` for ``x`` in ``[0, 1]``; ``alpha`` broadcasts against ``x``."""
    a = torch.as_tensor(alpha, dtype=x.dtype, device=x.device)
    return 0.5 + torch.tan(a * math.pi * (x - 0.5)) / (2.0 * torch.tan(a * math.pi / 2))


def tan_expand(u: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """``c⁻¹(u)`` for ``u`` in ``[0, 1]``, with the end points pinned to exactly 0 and 1."""
    a = torch.as_tensor(alpha, dtype=u.dtype, device=u.device)
    x = 0.5 + torch.atan((2.0 * u - 1.0) * torch.tan(a * math.pi / 2)) / (a * math.pi)
    x = torch.where(u <= 0, torch.zeros_like(x), x)
    return torch.where(u >= 1, torch.ones_like(x), x)


def quantize_tanq(
    x: torch.Tensor, scale: torch.Tensor, alpha: torch.Tensor | float, bits: int
) -> torch.Tensor:
    """TanQ codes ``round(c(clamp(x/s, 0, 1)) · (2^b − 1))`` in ``[0, 2^b − 1]`` (float dtype)."""
    top = levels(bits) - 1
    u = tan_compand(torch.clamp(x / scale, 0.0, 1.0), alpha)
    return torch.clamp(torch.round(u * top), 0, top)


def _unit_tables(alpha: torch.Tensor, bits: int) -> torch.Tensor:
    """``c⁻¹(k / (2^b − 1))`` for every code k and every α in the flat ``alpha`` [A]: [A, 2^b] float64."""
    u = torch.arange(levels(bits), dtype=torch.float64, device=alpha.device) / (levels(bits) - 1)  # [L]
    return tan_expand(u[None, :], alpha.to(torch.float64)[:, None])  # [A, L]


def dequantize_tanq(
    codes: torch.Tensor, scale: torch.Tensor, alpha: torch.Tensor | float, bits: int
) -> torch.Tensor:
    """``s · c⁻¹(code / (2^b − 1))``; code 0 → exactly 0, the top code → exactly ``s``.

    Implemented as a lookup in the float64 table of the ``2^b`` unit levels (then cast), so it is
    bit-identical to ``s * tanq_code_table(α, b)[code]``, the exporter's form. ``alpha`` is a
    scalar or, for a batch of candidates, shaped ``[C, 1, …, 1]`` against ``codes`` ``[C or 1, …]``.
    """
    a = torch.as_tensor(alpha, dtype=torch.float64, device=codes.device)
    tables = _unit_tables(a.reshape(-1), bits).to(codes.dtype)  # [A, L]
    idx = codes.long()
    if a.numel() == 1:
        return scale * tables[0][idx]
    idx = idx.expand(torch.broadcast_shapes(idx.shape, a.shape))  # [C, ...]
    unit = torch.gather(tables, 1, idx.reshape(a.numel(), -1)).reshape(idx.shape)
    return scale * unit


def fake_quant_tanq(
    x: torch.Tensor, scale: torch.Tensor, alpha: torch.Tensor | float, bits: int
) -> torch.Tensor:
    """TanQ quantize-dequantize with a straight-through gradient."""
    xq = dequantize_tanq(quantize_tanq(x, scale, alpha, bits), scale, alpha, bits)
    return straight_through(x, xq)


def tanq_code_table(alpha: float, bits: int) -> torch.Tensor:
    """Unit-scale value of every TanQ code, ``[2^b]`` float32 (for a lookup-table export)."""
    return _unit_tables(torch.tensor([float(alpha)], dtype=torch.float64), bits)[0].float()
