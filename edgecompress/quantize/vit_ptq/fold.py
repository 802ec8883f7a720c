"""Post-LN reparameterization folded only where it provably keeps the model's function.

Every fold is *verified* on the example batch and undone if the model output moved: post-LN
models such as BERT feed the LayerNorm output to the residual too, so folding there would change
the function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from edgecompress.calib import head
from edgecompress.models.graph import LinearUnit
from edgecompress.quantize.reparam import reparameterize_

FOLD_REL_TOL = 1e-4


def _snapshot(mods: list[nn.Module]) -> list[tuple]:
    return [(m, m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone()) for m in mods]


def _undo(snap: list[tuple]) -> None:
    with torch.no_grad():
        for m, w, b in snap:
            m.weight.copy_(w)
            if b is None:
                m.bias = None
            else:
                m.bias.copy_(b)


def fold_verified_(
    model: nn.Module,
    unit: LinearUnit,
    scale: torch.Tensor,
    zp: torch.Tensor,
    rule: str,
    bits: int,
    example,
    ref: torch.Tensor,
    call: Callable,
) -> tuple | None:
    """Fold the per-channel (scale, zp) into ``unit.norm`` and the unit's Linears if the model output
    on ``example`` stays within ``FOLD_REL_TOL`` (relative L2) of ``ref``; else undo and return None.
    Returns ``(s*, z*, r, b)`` on success. Linears without bias are left alone (None)."""
    ln = model.get_submodule(unit.norm)
    lins = [model.get_submodule(n) for n in unit.names]
    if any(lin.bias is None for lin in lins) or getattr(ln, "weight", None) is None:
        return None
    snap = _snapshot([ln, *lins])
    folded = reparameterize_(ln, lins, scale, zp, rule, bits)
    with torch.no_grad():
        out = call(model, head(example, ref.shape[0]))
    err = (out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)
    if not torch.isfinite(err) or err > FOLD_REL_TOL:
        _undo(snap)
        return None
    return folded
