"""The N:M passes (see :mod:`edgecompress.sparsity.nm`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from edgecompress.calib import example_run
from edgecompress.errors import UserError
from edgecompress.models.slots import MASK, SlotLinear, add_to_chain, slot_linears
from edgecompress.models.targeting import explicitly_named
from edgecompress.pipeline import Context, register_pass
from edgecompress.sparsity.nm.masks import check_nm, fits, nm_mask
from edgecompress.sparsity.nm.modules import NMMask
from edgecompress.sparsity.nm.step import StepAdamW
from edgecompress.train import FitResult, default_loss, fit

DEFAULT_IGNORE = ("re:(.*\\.)?(head|classifier|lm_head)", "re:(.*\\.)?pooler\\.dense")
AFTER_QUANT = (
    "N:M masks are chosen on float weights and quantizers calibrated on the masked ones: put it first"
)


def nm_targets(model: nn.Module, p, ctx: Context) -> list[str]:
    """Targeted Linears that can carry ``p.m``-groups, as SlotLinears (see the package docstring)."""
    names, skipped = slot_linears(model, p.targets, p.ignore, example_run(ctx))
    for name, why in skipped:
        ctx.notes.append(f"{name}: left dense ({why})")
    out = []
    for name in names:
        layer: SlotLinear = model.get_submodule(name)
        if layer.weight_chain.find(MASK) is not None:
            raise UserError(f"{name} already has a sparsity mask from an earlier pass")
        if not fits(tuple(layer.weight.shape), p.m):
            why = f"{name}: in_features {layer.in_features} is not a multiple of m={p.m}"
            if explicitly_named(name, p.targets):
                raise UserError(f"{why} (it is named in targets)")
            ctx.notes.append(f"{why}; left dense")
            continue
        out.append(name)
    if not out:
        raise UserError(f"{p.name}: no targeted Linear can take a {p.n}:{p.m} pattern")
    return out


def reinitialise_(model: nn.Module) -> None:
    """Fresh random weights, the way the model's library initialises it (from-scratch training)."""
    if callable(getattr(model, "_init_weights", None)) and hasattr(model, "config"):  # transformers
        model.apply(model._init_weights)
    elif callable(getattr(model, "init_weights", None)):  # timm
        model.init_weights()
    else:
        for m in model.modules():
            if m is not model and callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()


def _masks(model: nn.Module, names: list[str], p, mode: str, decay: float = 0.0) -> dict[str, NMMask]:
    """One NMMask per target, first in its weight chain, NOT recorded (training state)."""
    out = {}
    for name in names:
        layer: SlotLinear = model.get_submodule(name)
        el = NMMask(p.n, p.m, layer.out_features, layer.in_features, mode, decay).to(layer.weight.device)
        el.set_mask(nm_mask(layer.effective_weight(), p.n, p.m))
        layer.weight_chain.insert(0, el)
        out[name] = el
    return out


def _commit(model: nn.Module, masks: dict[str, NMMask]) -> None:
    """Freeze every mask at the weights' final pattern and record it (first in the weight chain)."""
    for name, el in masks.items():
        layer: SlotLinear = model.get_submodule(name)
        weight = layer.weight.detach()
        el.freeze(weight if el.mode != "fixed" else None)
        del layer.weight_chain[0]
        if len(layer.weight_chain):  # the order check keeps quantizers (and other masks) out
            raise UserError(f"{name}: its weight chain is not empty; N:M must be its first element")
        with torch.no_grad():
            layer.weight.mul_(el.mask.to(weight.dtype))  # the pruned weights are gone for good
        add_to_chain(model, f"{name}.weight_chain", el)


@dataclass(frozen=True)
class _NM:
    family: ClassVar[str] = "sparsity"
    VERSION: ClassVar[int] = 1
    cannot_follow: ClassVar[dict] = {"quantize": AFTER_QUANT, "prune": "prune first, then learn N:M masks"}

    n: int = 2
    m: int = 4
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = DEFAULT_IGNORE

    def __post_init__(self):
        check_nm(self.n, self.m)

    def report(self, ctx: Context, masks: dict, fitted: FitResult | None) -> None:
        ctx.notes.append(f"{len(masks)} Linears at {self.n}:{self.m}")
        if fitted is not None:
            ctx.info["training"] = {
                "steps": fitted.steps, "final_loss": fitted.final_loss, "seconds": fitted.seconds,
                "losses": fitted.losses, "world_size": fitted.world_size,
            }  # fmt: skip


@register_pass
@dataclass(frozen=True)
class NMOneShot(_NM):
    """Magnitude N:M sparsity with no training (the floor of every N:M method)."""

    name: ClassVar[str] = "nm_oneshot"

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        masks = _masks(model, nm_targets(model, self, ctx), self, "fixed")
        _commit(model, masks)
        self.report(ctx, masks, None)
        return model


@dataclass(frozen=True)
class _Trained(_NM):
    needs_teacher: ClassVar[bool] = True
    needs_training: ClassVar[bool] = True

    from_scratch: bool = False
    steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    weight_decay: float | None = None

    def config(self, ctx: Context):
        over = dict(steps=self.steps, lr=self.lr, batch_size=self.batch_size, weight_decay=self.weight_decay)
        return ctx.train.override(**over)

    def fit(self, model: nn.Module, ctx: Context, cfg, **kw) -> FitResult:
        loss = default_loss(ctx.teacher, ctx.call, ctx.kind)
        return fit(model, loss, ctx.batches("train"), cfg, device=ctx.device, desc=self.name, **kw)


@register_pass
@dataclass(frozen=True)
class ASP(_Trained):
    """ASP: magnitude N:M once, then fine-tune with the mask fixed.

    From scratch (ASP's own recipe: train dense, prune, retrain) the step budget is split:
    ``dense_fraction`` of it dense, the rest with the mask fixed.
    """

    name: ClassVar[str] = "asp"
    dense_fraction: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.dense_fraction < 1:
            raise ValueError(f"dense_fraction must be in (0, 1), got {self.dense_fraction}")

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        names = nm_targets(model, self, ctx)
        cfg = self.config(ctx)
        dense = None
        if self.from_scratch:
            reinitialise_(model)
            dense_steps = max(1, round(cfg.steps * self.dense_fraction))
            dense = self.fit(model, ctx, cfg.override(steps=dense_steps))
            cfg = cfg.override(steps=max(1, cfg.steps - dense_steps), seed=cfg.seed + 1)
        masks = _masks(model, names, self, "fixed")
        fitted = self.fit(model, ctx, cfg)
        _commit(model, masks)
        self.report(ctx, masks, fitted)
        if dense is not None:
            ctx.info["dense_training"] = {"steps": dense.steps, "final_loss": dense.final_loss}
        return model


@register_pass
@dataclass(frozen=True)
class SRSTE(_Trained):
    """SR-STE: N:M mask in every forward, straight-through backward with sparse-refined decay."""

    name: ClassVar[str] = "sr_ste"
    decay: float = 2e-4

    def __post_init__(self):
        super().__post_init__()
        if self.decay < 0:
            raise ValueError(f"decay must be ≥ 0, got {self.decay}")

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        names = nm_targets(model, self, ctx)
        if self.from_scratch:
            reinitialise_(model)
        masks = _masks(model, names, self, "ste", self.decay)
        fitted = self.fit(model, ctx, self.config(ctx))
        _commit(model, masks)
        self.report(ctx, masks, fitted)
        return model


@register_pass
@dataclass(frozen=True)
class STEP(_Trained):
    """STEP: dense AdamW until AutoSwitch, then frozen-variance Adam with straight-through N:M masks."""

    name: ClassVar[str] = "step"
    EXAMPLE: ClassVar[dict] = {"t_min": 100, "t_max": 1000}  # t_max has no default (see __post_init__)
    t_min: int = 0
    t_max: int | None = None
    switch_tol: float = 2.0  # AutoSwitch: relative variance change ≤ switch_tol · (1 − β2)
    decay: float = 0.0  # SR-STE's term in phase 2 (0: plain straight-through)

    def __post_init__(self):
        super().__post_init__()
        if self.t_max is None:
            raise ValueError("t_max is required (without it AutoSwitch may never switch)")
        if not 0 <= self.t_min < self.t_max:
            raise ValueError(f"need 0 ≤ t_min < t_max, got t_min={self.t_min}, t_max={self.t_max}")
        if not self.switch_tol > 0:
            raise ValueError(f"switch_tol must be > 0, got {self.switch_tol}")

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        cfg = self.config(ctx)
        if self.t_max >= cfg.steps:
            raise UserError(f"step: t_max ({self.t_max}) must be below the training steps ({cfg.steps})")
        names = nm_targets(model, self, ctx)
        if self.from_scratch:
            reinitialise_(model)
        masks = _masks(model, names, self, "dense", self.decay)
        maskable = [model.get_submodule(n).weight for n in names]
        history: list[tuple[int, float]] = []
        switched: list[int] = []

        def make_optimizer(params, c):
            args = (c.lr, c.betas, c.eps, c.weight_decay, self.t_min, self.t_max, self.switch_tol)
            return StepAdamW(params, maskable, *args)

        def on_step(step, _model, opt, _loss):
            if not switched:
                history.append((step, opt.param_groups[0]["z"][-1]))
            if opt.phase == 2 and not switched:
                switched.append(opt.switch_step)
                for el in masks.values():
                    el.mode = "ste"  # phase 2: straight-through masks from here on

        fitted = self.fit(model, ctx, cfg, make_optimizer=make_optimizer, callback=on_step)
        _commit(model, masks)
        self.report(ctx, masks, fitted)
        ctx.info.update(switch_step=switched[0] if switched else None, variance_change=history)
        ctx.notes.append(
            f"AutoSwitch at step {ctx.info['switch_step']} (t_min {self.t_min}, t_max {self.t_max})"
        )
        return model
