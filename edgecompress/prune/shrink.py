"""Shrinking: the kept units of a group become smaller modules, recorded as ``resize`` ops.

:func:`shrink` keeps the units' slices of every tensor the group touches (one ``resize`` op per
module, with the Linear sizes and the size attributes the forward reads), so ``restore`` rebuilds
the smaller model by replaying the log. :func:`remove_branch` replaces a group whose every unit
goes by a constant (``swap`` ops, :mod:`.modules`). :func:`zero_units` is the oracle both must
equal: the unpruned model with the removed units' output-projection columns set to zero.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from edgecompress.models.attention import explicit_attention_
from edgecompress.prune.groups import Group
from edgecompress.prune.modules import ConstantBranch, Skip
from edgecompress.structure import replace_module, resize_module


def keep_plan(model: nn.Module, group: Group, keep: Sequence[int]) -> dict[str, tuple[dict, dict]]:
    """``{module: (keep {tensor: {dim: indices}}, attrs)}`` for keeping units ``keep`` of ``group``."""
    plan: dict[str, tuple[dict, dict]] = {}
    for cut in group.cuts:
        idx = cut.indices(group.units, keep)
        tensors, attrs = plan.setdefault(cut.module, ({}, {}))
        tensors.setdefault(cut.tensor, {})[cut.dim] = idx
        if isinstance(model.get_submodule(cut.module), nn.Linear) and cut.tensor == "weight":
            attrs["out_features" if cut.dim == 0 else "in_features"] = len(idx)
    for module, attr, per_unit in group.attrs:
        plan.setdefault(module, ({}, {}))[1][attr] = per_unit * len(keep)
    return plan


def shrink(model: nn.Module, group: Group, keep: Sequence[int]) -> None:
    """Keep only units ``keep`` (sorted indices, at least one) of ``group``, recorded."""
    if not keep:
        raise ValueError(f"{group.name}: shrink keeps at least one unit (remove_branch removes them all)")
    if group.explicit and len(keep) < group.units:
        explicit_attention_(model)  # idempotent: one op for the whole model
    for module, (tensors, attrs) in keep_plan(model, group, keep).items():
        resize_module(model, module, tensors, attrs)


def remove_branch(model: nn.Module, group: Group, constant: torch.Tensor) -> None:
    """Replace ``group``'s residual branch by ``constant`` (``[width]``) for every token, recorded."""
    same = group.entry == group.exit
    if not same:
        replace_module(model, group.entry, Skip(group.tuple_out))
    const = ConstantBranch(constant.numel(), group.tuple_out and same)
    with torch.no_grad():
        const.bias.copy_(constant.detach().reshape(-1))
    out = model.get_submodule(group.out)
    replace_module(model, group.exit, const.to(device=out.weight.device, dtype=out.weight.dtype))


def out_bias(out: nn.Linear) -> torch.Tensor:
    return out.bias.detach() if out.bias is not None else out.weight.new_zeros(out.out_features)


def unit_columns(group: Group, keep: Sequence[int]) -> torch.Tensor:
    """The output projection's input columns that units ``keep`` own."""
    w = group.col_width
    return torch.tensor([u * w + j for u in keep for j in range(w)], dtype=torch.long)


@torch.no_grad()
def zero_units(model: nn.Module, group: Group, keep: Sequence[int]) -> None:
    """The oracle: the units not in ``keep`` contribute nothing (their output columns are zeroed)."""
    out: nn.Linear = model.get_submodule(group.out)
    drop = sorted(set(range(group.units)) - set(keep))
    out.weight[:, unit_columns(group, drop)] = 0


@contextlib.contextmanager
def patched(layer: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None):
    """``layer`` computes with ``weight`` and ``bias`` inside the block (a layer without a bias gets one
    for the block when ``bias`` is given), then with its own tensors again."""
    old_w, had_bias = layer.weight.data, layer.bias is not None
    old_b = layer.bias.data if had_bias else None
    layer.weight.data = weight.to(old_w.dtype)
    if bias is not None and had_bias:
        layer.bias.data = bias.to(old_b.dtype)
    elif bias is not None:
        layer.bias = nn.Parameter(bias.to(old_w.dtype), requires_grad=False)
    try:
        yield layer
    finally:
        layer.weight.data = old_w
        if had_bias:
            layer.bias.data = old_b
        elif bias is not None:
            layer.bias = None
