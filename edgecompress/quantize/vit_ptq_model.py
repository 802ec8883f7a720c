"""Model-side plumbing of the ViT PTQ passes: find the calibration units, capture their float
inputs, and fold the post-LN reparameterization only where it provably keeps the model's function.

Units are found from one forward on the example batch, by tensor identity, so the same code serves
timm ViT/DeiT/Swin and Hugging Face ViT/BERT without per-architecture tables:

* Linears whose input is the *same tensor* form one unit (HF ``query``/``key``/``value``): they
  share one input quantizer and are searched as one concatenated weight, exactly like timm's
  fused ``qkv``.
* A unit whose input is the output tensor of a LayerNorm is a reparameterization candidate. timm's
  Swin partitions windows between ``norm1`` and ``attn.qkv``; there the ``norm1``/``attn.qkv``
  naming convention supplies the pair. Every fold is then *verified* on the example batch and
  undone if the model output moved (post-LN models such as BERT feed the LayerNorm output to the
  residual too, so folding there would change the function).
* A unit whose input is the output tensor of a GELU module is post-GELU.
* Every :class:`~edgecompress.models.attention.AttentionMatmuls` is one attention unit.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from edgecompress.calib import capture_inputs
from edgecompress.models.attention import AttentionMatmuls
from edgecompress.quantize.reparam import reparameterize_

ATTN_POINTS = ("q_point", "k_point", "v_point", "probs_point")
FOLD_REL_TOL = 1e-4


@dataclass
class LinearUnit:
    names: tuple[str, ...]  # QuantLinears sharing one input tensor, in call order
    norm: str | None  # LayerNorm producing that input (reparameterization candidate)
    post_gelu: bool


@dataclass
class AttnUnit:
    name: str  # the AttentionMatmuls module


Unit = LinearUnit | AttnUnit


def call_model(model: nn.Module, example, n: int | None = None):
    """Run ``model`` on the first ``n`` samples of ``example`` (tensor or dict of tensors); main output."""
    if isinstance(example, dict):
        ex = {k: (v[:n] if torch.is_tensor(v) and n else v) for k, v in example.items()}
        out = model(**ex)
    else:
        out = model(example[:n] if n else example)
    for key in ("logits", "last_hidden_state"):
        if hasattr(out, key):
            return getattr(out, key)
    return out[0] if isinstance(out, (tuple, list)) else out


def _key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()))


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm) or "LayerNorm" in type(m).__name__


def _is_gelu(m: nn.Module) -> bool:
    return "GELU" in type(m).__name__


def _trace(model: nn.Module, linear_names: list[str], example) -> list[tuple[str, str, object]]:
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
            elif isinstance(mod, AttentionMatmuls):
                hooks.append(mod.register_forward_pre_hook(lambda m, a, n=name: rec("attn", n, a[0])))
            elif _is_norm(mod) or _is_gelu(mod):
                kind = "norm" if _is_norm(mod) else "gelu"
                hooks.append(mod.register_forward_hook(lambda m, a, o, n=name, k=kind: rec(k, n, o)))
        with torch.no_grad():
            call_model(model, example, 2)
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


def discover_units(model: nn.Module, linear_names: list[str], example) -> list[Unit]:
    """Calibration units in call order (see the module docstring)."""
    events = _trace(model, linear_names, example)
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


def _batch_info(args, kwargs) -> tuple[int, torch.Tensor | None]:
    """Batch size of a model call and its ``attention_mask`` (text models), if any."""
    mask = kwargs.get("attention_mask")
    for t in list(args) + list(kwargs.values()):
        if torch.is_tensor(t) and t.dim() > 0:
            return int(t.shape[0]), mask
    return 1, mask


@dataclass
class Captured:
    """Per-call inputs of the captured modules and the matching attention masks (or None)."""

    inputs: dict[str, list[torch.Tensor]]
    masks: list[torch.Tensor | None]

    def tokens(self, name: str) -> torch.Tensor:
        """Rows ``[T, K]`` of a Linear's input, without padding tokens where a mask says so."""
        rows = []
        for i, t in enumerate(self.inputs[name]):
            m = self.masks[i] if i < len(self.masks) else None
            if m is not None and t.dim() == 3 and tuple(t.shape[:2]) == tuple(m.shape):
                rows.append(t[m.bool()])
            else:
                rows.append(t.reshape(-1, t.shape[-1]))
        return torch.cat(rows)

    def attention_groups(self, names: list[str]) -> list[tuple[torch.Tensor, ...]]:
        """The attention operands ``names`` (q, k, v, probs: ``[b, H, N, ·]`` per call) grouped by
        shape: tuples of ``[B_g, H, N_g, ·]``, smallest first. Where a call has an attention mask
        ``[b, N]``, each sample keeps only its real tokens (rows of q, k, v; rows and columns of
        the probabilities) and samples with equal token counts are stacked."""
        groups: dict[tuple, list[tuple[torch.Tensor, ...]]] = {}
        for i, ts in enumerate(zip(*(self.inputs[n] for n in names))):
            m = self.masks[i] if i < len(self.masks) else None
            if m is None or not _mask_fits(m, ts):
                groups.setdefault(tuple(t.shape[1:] for t in ts), []).append(ts)
                continue
            for j, keep in enumerate(m.bool()):
                if keep.any():
                    part = tuple(t[j : j + 1, :, keep] for t in ts[:-1]) + (
                        ts[-1][j : j + 1, :, keep][..., keep],
                    )
                    groups.setdefault(tuple(t.shape[1:] for t in part), []).append(part)
        return [tuple(torch.cat(p) for p in zip(*groups[key])) for key in sorted(groups)]


def _mask_fits(mask: torch.Tensor, ts: tuple[torch.Tensor, ...]) -> bool:
    """A ``[b, N]`` mask applies to q, k, v ``[b, H, N, D]`` and probabilities ``[b, H, N, N]``."""
    if mask.dim() != 2:
        return False
    b, n = mask.shape
    return all(t.dim() == 4 and t.shape[0] == b and t.shape[2] == n for t in ts) and ts[-1].shape[3] == n


def capture(
    model: nn.Module, names: list[str], forward_loop: Callable[[nn.Module], None], max_samples: int
) -> Captured:
    """Inputs of each named module over the loop (one tensor per call), limited to the first
    ``max_samples`` samples (a module called once per model call; Swin windows stay batch-major)."""
    calls: list[tuple[int, torch.Tensor | None]] = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: calls.append(_batch_info(a, kw)), with_kwargs=True
    )
    try:
        seen = capture_inputs(model, names, forward_loop)
    finally:
        hook.remove()
    sizes = [b for b, _ in calls]
    masks = _first_samples([m if m is not None else torch.empty(b, 0) for b, m in calls], sizes, max_samples)
    masks = [m if m.numel() else None for m in masks]
    return Captured({n: _first_samples(ts, sizes, max_samples) for n, ts in seen.items()}, masks)


def _first_samples(ts: list[torch.Tensor], sizes: list[int], max_samples: int) -> list[torch.Tensor]:
    if len(ts) != len(sizes):  # not once per model call: keep everything
        return ts
    out, left = [], max_samples
    for t, b in zip(ts, sizes):
        if left <= 0:
            break
        take = min(b, left)
        out.append(t if take == b else t[: t.shape[0] * take // b])
        left -= take
    return out


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
        out = call_model(model, example, ref.shape[0])
    err = (out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)
    if not torch.isfinite(err) or err > FOLD_REL_TOL:
        _undo(snap)
        return None
    return folded
