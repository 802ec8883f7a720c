"""Scale reparameterization of post-LayerNorm activations (RepQ-ViT, ICCV 2023) and its target
rules, plus the post-GELU shift fold of AdaLog.

Post-LN activations have a few channels with a much wider range than the rest, so they are
calibrated per input channel ``(s_c, z_c)``; a per-tensor target ``(s*, z*)`` is then chosen and
the difference folded into the float model::

    r_c = s_c / s*                         # [C]
    b_c = m_c / r_c - m*                   # m_c = -z_c·s_c (channel minimum), m* = -z*·s*
    LayerNorm:  γ' = γ / r,  β' = β / r - b        so  LN'(x) = LN(x) / r - b
    Linear:     W' = W · r (along the input),  bias' = bias + W' · b

so ``Linear'(LN'(x)) == Linear(LN(x))`` exactly in real arithmetic, and channel ``c`` of ``LN'``
maps its calibrated window ``[m_c, m_c + (2^b - 1)·s_c]`` onto the common window
``[m*, m* + (2^b - 1)·s*]``: per-tensor quantization of ``LN'`` equals the per-channel one.

Target rules (``(s*, z*)`` from the channel parameters):

* ``"mean"`` — RepQ-ViT: ``s* = mean(s_c)``, ``z* = round(mean(z_c))``.
* ``"median"`` — DopQ-ViT v1 (MOSF): ``s* = median(s_c)``, ``z* = round(median(z_c))``; robust to
  the few outlier channels that inflate the mean.
* ``"mad"`` — DopQ-ViT v3 calls MOSF "MAD-guided" (mean absolute deviation) and says it needs no
  extra computation; its exact rule could not be read. Our reading: channels whose scale lies
  within one mean-absolute-deviation of the median scale, ``|s_c - med(s)| ≤ mean|s_c - med(s)|``,
  are the inliers, and the target is the mean ``(s, z)`` over the inliers (a trimmed mean). The
  zero-point target is rounded.

Note (measured and reported by the PTQ passes): because the fold is exact, the target only
changes the per-tensor activation window by a *global* affine map, and per-row weight
quantization of ``W · r`` is invariant to a global factor; the rule therefore matters only through
what is not scale-equivariant afterwards (the rounded ``z*``, the 1e-4 scale clamp and the
re-search after the fold).

Post-GELU shift (AdaLog): the fc2 input quantizer sees ``x + c`` with ``c = 0.16997124254703522``
(``-min GELU``), so the input is ≥ 0 for a log quantizer; the deployed fc2 computes
``W·(x + c) + bias - c·W·1``, i.e. the shift is folded into the bias ``b' = b - c·W·1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

GELU_SHIFT = 0.16997124254703522
"""AdaLog's post-GELU shift: ``-min_x GELU(x)`` (exact GELU, 0.1699712075…) as the official code
writes it, 3.5e-8 larger than the float64 value, so ``GELU(x) + c`` stays ≥ 0."""

TargetRule = Literal["mean", "median", "mad"]


def _median(x: torch.Tensor) -> torch.Tensor:
    """Median that averages the two middle values for even counts (``torch.median`` takes the lower)."""
    s = torch.sort(x.flatten()).values
    n = s.numel()
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def reparam_target(
    scale: torch.Tensor, zero_point: torch.Tensor, rule: TargetRule, bits: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor target ``(s*, z*)`` (0-d tensors) from channel ``scale``, ``zero_point`` [C].

    ``z*`` is rounded and, given ``bits``, clamped into ``[0, 2^b - 1]`` so it is a deployable
    zero-point (channel zero-points may lie outside it; the offsets ``b`` absorb any choice).
    """
    scale, zero_point = scale.flatten(), zero_point.flatten()
    if rule == "mean":
        s, z = scale.mean(), zero_point.mean()
    elif rule == "median":
        s, z = _median(scale), _median(zero_point)
    elif rule == "mad":
        med = _median(scale)
        dev = (scale - med).abs()
        inlier = dev <= dev.mean()  # never empty: the smallest deviation is ≤ the mean deviation
        s, z = scale[inlier].mean(), zero_point[inlier].mean()
    else:
        raise ValueError(f"unknown reparameterization rule {rule!r}; expected mean, median or mad")
    z = torch.round(z)
    return s, (z if bits is None else torch.clamp(z, 0, 2**bits - 1))


def reparam_factors(
    scale: torch.Tensor, zero_point: torch.Tensor, target_scale: torch.Tensor, target_zero_point: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = s_c / s*`` and ``b = m_c / r - m*`` (both [C]) with ``m = -z·s`` the window minimum."""
    scale, zero_point = scale.flatten(), zero_point.flatten()
    r = scale / target_scale  # [C]
    b = (-zero_point * scale) / r - (-target_zero_point * target_scale)  # [C]
    return r, b


@torch.no_grad()
def fold_into_layernorm_(ln: nn.Module, r: torch.Tensor, b: torch.Tensor) -> None:
    """``γ ← γ / r``, ``β ← β / r - b`` in place, so the LayerNorm outputs ``LN(x) / r - b``.

    Needs an affine LayerNorm (weight present); a missing bias is created.
    """
    weight = getattr(ln, "weight", None)
    if weight is None:
        raise ValueError(
            f"{type(ln).__name__} has no affine weight; cannot fold a reparameterization into it"
        )
    r, b = r.to(weight), b.to(weight)
    bias = getattr(ln, "bias", None)
    new_bias = (bias / r if bias is not None else torch.zeros_like(weight)) - b
    weight.div_(r)
    if bias is not None:
        bias.copy_(new_bias)
    else:
        ln.bias = nn.Parameter(new_bias)


@torch.no_grad()
def fold_into_linear_(linear: nn.Linear, r: torch.Tensor, b: torch.Tensor) -> None:
    """``W ← W · r`` along the input and ``bias ← bias + W_new · b`` in place (bias created if absent)."""
    r, b = r.to(linear.weight), b.to(linear.weight)
    linear.weight.mul_(r[None, :])  # [O, K] * [1, K]
    delta = linear.weight @ b  # [O]
    if linear.bias is None:
        linear.bias = nn.Parameter(delta)
    else:
        linear.bias.add_(delta)


def reparameterize_(
    ln: nn.Module,
    linears: Sequence[nn.Linear],
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    rule: TargetRule,
    bits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold a per-channel LN-output quantizer into ``ln`` and every consumer in ``linears``.

    Returns ``(s*, z*, r, b)``: the per-tensor parameters now valid for the LN output, and the
    factors (so the caller can map cached activations: ``x' = x / r - b``).
    """
    s_t, z_t = reparam_target(scale, zero_point, rule, bits)
    r, b = reparam_factors(scale, zero_point, s_t, z_t)
    fold_into_layernorm_(ln, r, b)
    for lin in linears:
        fold_into_linear_(lin, r, b)
    return s_t, z_t, r, b


def shifted_bias(bias: torch.Tensor | None, weight: torch.Tensor, shift: float = GELU_SHIFT) -> torch.Tensor:
    """``b' = b - c·W·1`` for a ``[O, K]`` weight (the post-GELU shift folded into fc2's bias)."""
    delta = -shift * weight.sum(dim=1)  # [O]
    return delta if bias is None else bias + delta


@torch.no_grad()
def fold_shift_into_bias_(
    linear: nn.Linear, shift: float = GELU_SHIFT, weight: torch.Tensor | None = None
) -> None:
    """In place ``bias ← bias - c·W·1``; pass the deployed (dequantized) ``weight`` if it differs.

    After this the layer must be fed ``x + c`` (the shifted quantizer output) to compute the same
    function: ``W·(x + c) + b - c·W·1 = W·x + b``.
    """
    w = linear.weight if weight is None else weight
    new = shifted_bias(linear.bias, w, shift)
    if linear.bias is None:
        linear.bias = nn.Parameter(new)
    else:
        linear.bias.copy_(new)
