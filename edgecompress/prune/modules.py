"""What a removed residual branch becomes (granularity ``blocks``).

A branch whose every unit is removed outputs its output projection's bias for every token (the
removed units contribute nothing), so it is replaced by :class:`ConstantBranch`; where the branch's
first module is not its last (HF BERT: ``attention.self`` … ``attention.output.dense``), the first
becomes :class:`Skip` and the output projection the constant. The model's own residual additions,
layer scales and norms around the branch stay as they are, so the result equals the model with all
of the branch's units zeroed.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from edgecompress.structure import register_swap


def _first_tensor(args, kwargs) -> torch.Tensor:
    for t in (*args, *kwargs.values()):
        if torch.is_tensor(t):
            return t
    raise TypeError("a removed branch was called without a tensor input")


@register_swap
class ConstantBranch(nn.Module):
    """``bias`` (``[width]``) for every token of the input; ``(output, None)`` when ``tuple_out``."""

    VERSION: ClassVar[int] = 1

    def __init__(self, width: int, tuple_out: bool = False):
        super().__init__()
        self.tuple_out = tuple_out
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, *args, **kwargs):
        x = _first_tensor(args, kwargs)
        y = self.bias.to(x.dtype).expand(*x.shape[:-1], self.bias.shape[0]).contiguous()
        return (y, None) if self.tuple_out else y

    def swap_config(self) -> dict:
        return {"width": int(self.bias.shape[0]), "tuple_out": self.tuple_out}

    @classmethod
    def from_swap(cls, original, config: dict) -> ConstantBranch:
        return cls(int(config["width"]), bool(config.get("tuple_out", False)))

    def describe(self) -> dict:
        return {"layer": "removed branch (constant output)"}


@register_swap
class Skip(nn.Module):
    """The first module of a removed branch: passes its input on (``(x, None)`` when ``tuple_out``)."""

    VERSION: ClassVar[int] = 1

    def __init__(self, tuple_out: bool = False):
        super().__init__()
        self.tuple_out = tuple_out

    def forward(self, *args, **kwargs):
        x = _first_tensor(args, kwargs)
        return (x, None) if self.tuple_out else x

    def swap_config(self) -> dict:
        return {"tuple_out": self.tuple_out}

    @classmethod
    def from_swap(cls, original, config: dict) -> Skip:
        return cls(bool(config.get("tuple_out", False)))
