""":class:`NMMask`: the N:M slot element of a SlotLinear's weight chain.

Modes:

* ``"fixed"`` — ``w ⊙ mask`` with a frozen mask (nm_oneshot, ASP, and every pass's result);
* ``"ste"`` — the mask is recomputed from ``|w|`` in every forward and the backward is
  straight-through; with ``decay = λ > 0`` the gradient gets SR-STE's sparse-refined term
  ``λ·(1 − mask) ⊙ w`` (SR-STE, Zhou et al., ICLR 2021: ``g̃ = g(W̃) + λ_W (1 − E) ⊙ W``);
* ``"dense"`` — identity (STEP's phase 1: the weights train dense while Adam's variance settles).

Only ``"fixed"`` elements are ever recorded in the structure log (training passes append the
element at the end, frozen), so a restored model computes exactly the masked weights it was
saved with. A frozen element makes its SlotLinear save the weight in packed N:M form
(:meth:`pack_weight`): a 2:4 float layer takes 2.125 bytes per weight on disk instead of 4.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from edgecompress.sparsity.nm.masks import density, index_bits, nm_mask, pack, unpack
from edgecompress.structure import register_swap

MODES = ("fixed", "ste", "dense")


class _SparseRefinedSTE(torch.autograd.Function):
    """Forward ``w ⊙ mask``; backward ``g + λ·(1 − mask) ⊙ w`` (straight through the mask)."""

    @staticmethod
    def forward(ctx, w, mask, decay: float):
        ctx.save_for_backward(w, mask)
        ctx.decay = decay
        return w * mask

    @staticmethod
    def backward(ctx, g):
        w, mask = ctx.saved_tensors
        grad = g if ctx.decay == 0 else g + ctx.decay * (1 - mask) * w
        return grad, None, None


@register_swap
class NMMask(nn.Module):
    """Keep ``n`` of every ``m`` weights along the input dimension of an ``[out, in]`` weight."""

    SLOT_KIND: ClassVar[str] = "mask"
    VERSION: ClassVar[int] = 1
    PACKED_KEYS: ClassVar[tuple[str, ...]] = ("nm_values", "nm_positions")

    def __init__(
        self, n: int, m: int, out_features: int, in_features: int, mode: str = "fixed", decay: float = 0.0
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.n, self.m, self.mode, self.decay = n, m, mode, decay
        self.out_features, self.in_features = out_features, in_features
        first = torch.zeros(out_features, in_features // m, m, dtype=torch.bool)
        first[..., :n] = True  # a valid placeholder until a real mask is set or loaded
        self.register_buffer("mask", first.reshape(out_features, in_features), persistent=False)

    def set_mask(self, mask: torch.Tensor) -> NMMask:
        self.mask = mask.to(torch.bool).clone()
        return self

    semi_structured: torch.Tensor | None = None  # set by sparsity.nm.cuda.accelerate_2to4 (not saved)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.semi_structured is not None and not self.training and not torch.is_grad_enabled():
            return self.semi_structured  # F.linear dispatches to the 2:4 sparse kernel
        if self.mode == "dense":
            return w
        if self.mode == "ste":
            with torch.no_grad():
                self.mask = nm_mask(w, self.n, self.m).to(w.device)
            return _SparseRefinedSTE.apply(w, self.mask.to(w.dtype), self.decay)
        return w * self.mask.to(w.dtype)

    def freeze(self, weight: torch.Tensor | None = None) -> NMMask:
        """Fixed mode with the current mask (or the mask of ``weight``)."""
        if weight is not None:
            self.mask = nm_mask(weight, self.n, self.m).to(weight.device)
        self.mode = "fixed"
        return self

    # ---- packed storage (called by SlotLinear's state-dict hooks) ----
    def pack_weight(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        values, positions = pack(weight * self.mask.to(weight.dtype), self.mask, self.n, self.m)
        return {"nm_values": values, "nm_positions": positions}

    def unpack_weight(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        dense, mask = unpack(parts["nm_values"], parts["nm_positions"], self.n, self.m, self.in_features)
        self.mask = mask.to(self.mask.device)
        return dense

    def values_shape(self) -> tuple[int, int]:
        """Shape of the kept values of a packed weight."""
        return self.out_features, self.in_features * self.n // self.m

    def weight_bytes(self, numel: int, value_bits: int) -> int:
        """Deployed bytes of an N:M weight: kept values at ``value_bits`` plus their positions."""
        kept = numel * self.n // self.m
        return (kept * value_bits + kept * index_bits(self.m) + 7) // 8

    def swap_config(self) -> dict:
        if self.mode != "fixed":
            raise RuntimeError("only a frozen N:M mask is recorded; call freeze() first")
        return {"n": self.n, "m": self.m, "out_features": self.out_features, "in_features": self.in_features}

    @classmethod
    def from_swap(cls, original, config: dict) -> NMMask:
        return cls(**config)

    def describe(self) -> dict:
        pattern = f"{self.n}:{self.m}"
        return {
            "layer": "N:M mask",
            "mask": pattern,
            "sparsity": pattern,
            "density": round(density(self.mask), 4),
        }

    def extra_repr(self) -> str:
        return f"{self.n}:{self.m}, mode={self.mode!r}" + (f", decay={self.decay}" if self.decay else "")
