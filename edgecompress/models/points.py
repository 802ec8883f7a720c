"""Named points in a forward pass where a pass may insert an activation quantizer (or observer)."""

from __future__ import annotations

import torch
from torch import nn

from edgecompress.models.targeting import register_swap


@register_swap
class QuantPoint(nn.Module):
    """Identity placeholder. ``role`` says what flows through it (``"linear_in"``, ``"attn_q"``,
    ``"attn_k"``, ``"attn_probs"``, ``"attn_v"``) and ``head_dim`` is the axis of heads (1) for
    ``[B, H, N, D]`` attention tensors or ``None``. Passes find points by role and swap them."""

    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"role={self.role!r}"

    def swap_config(self) -> dict:
        return {"role": self.role}

    @classmethod
    def from_swap(cls, original: nn.Module | None, config: dict) -> QuantPoint:
        return cls(config["role"])


def points(model: nn.Module, roles: tuple[str, ...] | None = None) -> list[tuple[str, nn.Module]]:
    """Every point (still a :class:`QuantPoint`) whose role is in ``roles`` (all roles if None)."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, QuantPoint) and (roles is None or m.role in roles)
    ]
