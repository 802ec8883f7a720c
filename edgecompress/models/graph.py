"""Graph helpers on a real forward pass: calibration units found by tensor identity, block keys.

Units are found from one forward on the example batch, by tensor identity, so the same code serves
timm ViT/DeiT/Swin and Hugging Face ViT/BERT without per-architecture tables:

* Linears whose input is the *same tensor* form one unit (HF ``query``/``key``/``value``): they
  share one input quantizer and are searched as one concatenated weight, exactly like timm's
  fused ``qkv``.
* A unit whose input is the output tensor of a LayerNorm is a reparameterization candidate. timm's
  Swin partitions windows between ``norm1`` and ``attn.qkv``; there the ``norm1``/``attn.qkv``
  naming convention supplies the pair.
* A unit whose input is the output tensor of a GELU module is post-GELU.
* Every :class:`~edgecompress.models.attention.AttentionAdapter` is one attention unit.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from edgecompress.calib import head
from edgecompress.models.attention import AttentionAdapter


@dataclass
class LinearUnit:
    names: tuple[str, ...]  # SlotLinears sharing one input tensor, in call order
    norm: str | None  # LayerNorm producing that input (reparameterization candidate)
    post_gelu: bool


@dataclass
class AttnUnit:
    name: str  # the AttentionAdapter module


Unit = LinearUnit | AttnUnit


def _key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()))


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm) or "LayerNorm" in type(m).__name__


def _is_gelu(m: nn.Module) -> bool:
    return "GELU" in type(m).__name__


def _trace(
    model: nn.Module, linear_names: list[str], example, call: Callable
) -> list[tuple[str, str, object]]:
    """(kind, name, tensor-key) events of one forward, in call order; tensors kept alive meanwhile."""
    events, alive, hooks = [], [], []
    wanted = set(linear_names)

    def rec(kind, name, t):
        if torch.is_tensor(t) and all(n != name for _, n, _ in events):
            alive.append(t)
            events.append((kind, name, _key(t)))

    try:
        for name, mod in model.named_modules():
            if name in wanted:
                hooks.append(mod.register_forward_pre_hook(lambda m, a, n=name: rec("linear", n, a[0])))
            elif isinstance(mod, AttentionAdapter):
                hooks.append(mod.register_forward_pre_hook(lambda m, a, n=name: rec("attn", n, a[0])))
            elif _is_norm(mod) or _is_gelu(mod):
                kind = "norm" if _is_norm(mod) else "gelu"
                hooks.append(mod.register_forward_hook(lambda m, a, o, n=name, k=kind: rec(k, n, o)))
        with torch.no_grad():
            call(model, head(example, 2))
    finally:
        for h in hooks:
            h.remove()
    return events


def _swin_norm(model: nn.Module, name: str) -> str | None:
    """timm naming convention: ``<block>.attn.qkv`` is fed (through window partition) by ``<block>.norm1``."""
    if not name.endswith(".attn.qkv"):
        return None
    cand = name[: -len(".attn.qkv")] + ".norm1"
    try:
        return cand if _is_norm(model.get_submodule(cand)) else None
    except AttributeError:
        return None


def discover_units(model: nn.Module, linear_names: list[str], example, call: Callable) -> list[Unit]:
    """Calibration units in call order (see the module docstring); ``call(model, inputs)`` runs it."""
    events = _trace(model, linear_names, example, call)
    norms = {k: n for kind, n, k in events if kind == "norm"}
    gelus = {k for kind, _, k in events if kind == "gelu"}
    units: list[Unit] = []
    last_key = None
    for kind, name, key in events:
        if kind == "attn":
            units.append(AttnUnit(name))
        elif kind == "linear":
            prev = units[-1] if units else None
            if isinstance(prev, LinearUnit) and key == last_key:
                prev.names = (*prev.names, name)
            else:
                units.append(LinearUnit((name,), norms.get(key) or _swin_norm(model, name), key in gelus))
            last_key = key
    return units


def block_key(name: str) -> str:
    """The enclosing repeated block of a module name (up to its last numeric component)."""
    m = re.match(r"(.*\.\d+)(\.|$)", name)
    return m.group(1) if m else name
