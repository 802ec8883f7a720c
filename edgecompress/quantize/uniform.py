"""Uniform (affine) quantizers as pure functions.

Conventions used by every quantizer in this package:

* ``scale`` and ``zero_point`` broadcast against ``x`` (per tensor: 0-d tensors; per output
  channel of a ``[out, in]`` weight: ``[out, 1]``; per head of ``[B, H, N, D]``: ``[1, H, 1, 1]``).
* Codes are integers in ``[0, 2**bits - 1]`` (asymmetric) held in a float tensor, so the same code
  path serves 2..8 bits. ``symmetric=True`` uses zero-point ``2**(bits-1)`` (the signed INT range
  shifted by the zero-point), which is what INT8 Q/DQ export with zero-point 0 expects.
* ``fake_quant_*`` returns ``dequantize(quantize(x))`` with a straight-through gradient.
"""

from __future__ import annotations

import torch

SCALE_EPS = 1e-8


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(‖ref‖² / ‖ref − approx‖²)`` in dB."""
    noise = (ref.double() - approx.double()).pow(2).sum()
    signal = ref.double().pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise.clamp_min(1e-300)))


def levels(bits: int) -> int:
    """Number of representable codes."""
    return 2**bits


def quantize_uniform(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int
) -> torch.Tensor:
    """Integer codes ``clamp(round(x / s) + z, 0, 2^b - 1)`` (float dtype)."""
    return torch.clamp(torch.round(x / scale) + zero_point, 0, levels(bits) - 1)


def dequantize_uniform(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_uniform`: ``(q - z) * s``."""
    return (codes - zero_point) * scale


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (``0 ≤ q < 2**bits``, any shape) → a flat uint8 tensor: one code per byte up to
    8 bits, two per byte (low nibble first) up to 4 bits."""
    flat = codes.reshape(-1).to(torch.uint8)
    if bits > 4:
        return flat
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_codes(packed: torch.Tensor, bits: int, shape) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 codes of ``shape``."""
    numel = 1
    for d in shape:
        numel *= int(d)
    if bits > 4:
        flat = packed.reshape(-1)
    else:
        flat = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1)
    if flat.numel() < numel:
        raise ValueError(f"{flat.numel()} stored codes for a weight of {numel} values")
    return flat[:numel].reshape(*shape)


def straight_through(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """``xq`` forward, identity gradient to ``x``. Without a gradient to carry (inference,
    calibration, ``no_grad``) it is ``xq`` itself: the training form ``x + (xq − x)`` differs from
    ``xq`` by up to an ulp of ``x``, and a runtime's ``DequantizeLinear`` computes ``xq`` exactly,
    so that ulp would be one more rounding difference between PyTorch and the exported graph."""
    if torch.is_grad_enabled() and x.requires_grad:
        return x + (xq - x).detach()
    return xq


def fake_quant_uniform(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int
) -> torch.Tensor:
    """``dequantize(quantize(x))`` with a straight-through estimator for the rounding."""
    xq = dequantize_uniform(quantize_uniform(x, scale, zero_point, bits), scale, zero_point)
    return straight_through(x, xq)


def params_from_range(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point that map ``[lo, hi]`` (widened to contain 0) onto the code range.

    Asymmetric: ``s = (hi - lo) / (2^b - 1)``, ``z = round(-lo / s)``.
    Symmetric: ``s = max(|lo|, |hi|) / (2^(b-1) - 1)`` and ``z = 2^(b-1)``, so the codes minus the
    zero-point fill the signed range ``[-(2^(b-1)-1), 2^(b-1)-1]`` after clamping (the extra
    negative code is representable but never produced by rounding a value inside the range).
    """
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    if symmetric:
        amax = torch.maximum(-lo, hi)
        scale = torch.clamp(amax / (2 ** (bits - 1) - 1), min=SCALE_EPS)
        zero_point = torch.full_like(scale, float(2 ** (bits - 1)))
        return scale, zero_point
    scale = torch.clamp((hi - lo) / (levels(bits) - 1), min=SCALE_EPS)
    zero_point = torch.clamp(torch.round(-lo / scale), 0, levels(bits) - 1)
    return scale, zero_point


def reduce_except(x: torch.Tensor, dims_kept: tuple[int, ...], op: str) -> torch.Tensor:
    """min/max of ``x`` over every dim not in ``dims_kept``, keeping dims for broadcasting."""
    dims_kept = tuple(d % x.dim() for d in dims_kept)
    reduce_dims = [d for d in range(x.dim()) if d not in dims_kept]
    if not reduce_dims:
        return x.clone()
    fn = torch.amin if op == "min" else torch.amax
    return fn(x, dim=reduce_dims, keepdim=True)


def weight_params(w: torch.Tensor, bits: int, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel min/max parameters for a ``[out, ...]`` weight (scale shaped ``[out, 1, ...]``)."""
    return params_from_range(reduce_except(w, (0,), "min"), reduce_except(w, (0,), "max"), bits, symmetric)


def mse_search_range(
    x: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    bits: int,
    symmetric: bool = False,
    n_grid: int = 100,
    min_ratio: float = 0.3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink a per-tensor range ``[lo, hi]`` to the clip ratio minimizing ``||x - Q(x)||^2``.

    Vectorised: all ``n_grid`` ratios in ``[min_ratio, 1]`` are scored in one batched op. ``x`` is a
    flat sample of the tensor's values.
    """
    ratios = torch.linspace(min_ratio, 1.0, n_grid, dtype=x.dtype, device=x.device)  # [G]
    scale, zp = params_from_range(lo * ratios, hi * ratios, bits, symmetric)  # [G]
    xs = x.reshape(1, -1)  # [1, S]
    err = (fake_quant_uniform(xs, scale[:, None], zp[:, None], bits) - xs).pow(2).mean(dim=1)  # [G]
    best = int(torch.argmin(err))
    return scale[best], zp[best]
