"""The ``acm`` pass: MLPs become Adaptive Computation Modules trained in the paper's three phases."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from edgecompress.errors import UserError
from edgecompress.models.targeting import matches
from edgecompress.pipeline import Context, register_pass
from edgecompress.sparsity.acm import losses as L
from edgecompress.sparsity.acm.modules import ACMMLP
from edgecompress.sparsity.acm.report import choice_stats
from edgecompress.sparsity.acm.sites import Site, build_acm, find_sites, install
from edgecompress.train import FitResult, default_loss, fit

AFTER_QUANT = "ACM learners are trained in float and replace the MLPs' Linears: quantize after acm"
AFTER_SPARSITY = "ACM rebuilds the MLPs from their weights, dropping N:M masks: put N:M after acm"
AFTER_DYNAMIC = "one acm per recipe: the MLPs are ACMs already (give the first one every target)"


class _Capture:
    """Inputs of each site module and outputs of its ``out`` module in a (teacher) model, per forward."""

    def __init__(self, model: nn.Module, sites: list[Site]):
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.hooks = []
        for s in sites:
            self.hooks.append(model.get_submodule(s.name).register_forward_pre_hook(self._in(s.name)))
            self.hooks.append(model.get_submodule(s.out).register_forward_hook(self._out(s.name)))

    def _in(self, name):
        def hook(_m, args):
            self.inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1])

        return hook

    def _out(self, name):
        def hook(_m, _args, out):
            self.outputs[name] = out.detach().reshape(-1, out.shape[-1])

        return hook

    def close(self):
        for h in self.hooks:
            h.remove()


class _LayerwiseObjective(nn.Module):
    """Phases I and II: every ACM fed the teacher's recorded MLP inputs; ``forward(batch)`` is the loss.

    The ACMs are this module's children (what DDP syncs); the teacher and its hooks are not."""

    def __init__(self, acms: dict[str, ACMMLP], teacher: nn.Module, capture: _Capture, call, phase: str, tau):
        super().__init__()
        self.acms = nn.ModuleDict({n.replace(".", "/"): m for n, m in acms.items()})
        self.__dict__["teacher"], self.__dict__["capture"], self.__dict__["call"] = teacher, capture, call
        self.phase, self.tau = phase, tau

    def forward(self, batch) -> torch.Tensor:
        with torch.no_grad():
            self.teacher.eval()
            self.call(self.teacher, batch)
        terms = []
        for key, acm in self.acms.items():
            name = key.replace("/", ".")
            x, o = self.capture.inputs[name], self.capture.outputs[name]
            if self.phase == "distill":
                terms.append(L.distill_loss(acm.prefix_outputs(x), o))
                continue
            with torch.no_grad():
                labels = L.gate_labels(acm.prefix_outputs(x), o, self.tau, acm.k_min)
            terms.append(nn.functional.cross_entropy(acm.gate(x).float(), labels))
        return torch.stack(terms).mean()


def _cost(acm: ACMMLP) -> float:
    """Multiply-adds per token of all learners."""
    width = acm.n_learners * acm.h
    return float(acm.d * width * (2 if acm.gated else 1) + width * acm.d_out)


@register_pass
@dataclass(frozen=True)
class ACM:
    """ACM (arXiv 2312.10193 v3, AAAI 2025): each MLP becomes learners + a per-token gate, trained in 3 phases.

    The package docstring (:mod:`edgecompress.sparsity.acm`) has the phases and the choices made where
    the paper is silent."""

    name: ClassVar[str] = "acm"
    family: ClassVar[str] = "dynamic"
    VERSION: ClassVar[int] = 1
    needs_teacher: ClassVar[bool] = True
    needs_training: ClassVar[bool] = True
    cannot_follow: ClassVar[dict] = {
        "quantize": AFTER_QUANT,
        "sparsity": AFTER_SPARSITY,
        "acm": AFTER_DYNAMIC,
    }

    n_learners: int = 4
    budget: float = 0.5
    tau: float = 1.2
    gumbel_tau: float = 0.8  # phase III's Gumbel-softmax temperature (the official ViT-B scripts' 0.8)
    budget_weight: float = 0.1
    entropy_weight: float = 0.05
    diversity_weight: float = 0.05
    gate_width: int | None = None
    distill_steps: int = 200
    distill_lr: float = 1e-3
    gate_steps: int = 100
    gate_lr: float = 1e-2
    steps: int | None = None  # phase III (default: the recipe's train.steps)
    lr: float | None = None
    batch_size: int | None = None
    train_all: bool = True  # phase III trains the whole model (the paper), else only the ACMs
    fixed_k: int | None = None  # static baseline: no gate, every token runs fixed_k learners
    targets: tuple[str, ...] = ("re:.*",)
    ignore: tuple[str, ...] = ()

    def __post_init__(self):
        checks = [
            ("n_learners", isinstance(self.n_learners, int) and self.n_learners >= 1, "an integer >= 1"),
            ("budget", _num(self.budget) and 0 < self.budget <= 1, "in (0, 1]"),
            ("tau", _num(self.tau) and self.tau > 0, "a number > 0"),
            ("gumbel_tau", _num(self.gumbel_tau) and self.gumbel_tau > 0, "a number > 0"),
            ("gate_width", self.gate_width is None or (isinstance(self.gate_width, int) and self.gate_width >= 1),
             "an integer >= 1 or null"),
            ("distill_steps", isinstance(self.distill_steps, int) and self.distill_steps >= 0, "an integer >= 0"),
            ("gate_steps", isinstance(self.gate_steps, int) and self.gate_steps >= 0, "an integer >= 0"),
            ("fixed_k", self.fixed_k is None or (isinstance(self.fixed_k, int) and 0 <= self.fixed_k <= self.n_learners),
             f"an integer in [0, n_learners={self.n_learners}] or null"),
        ] + [
            (f, _num(getattr(self, f)) and getattr(self, f) >= 0, "a number >= 0")
            for f in ("budget_weight", "entropy_weight", "diversity_weight")
        ] + [(f, _num(getattr(self, f)) and getattr(self, f) > 0, "a number > 0") for f in ("distill_lr", "gate_lr")]  # fmt: skip
        for field, ok, what in checks:
            if not ok:
                raise ValueError(f"{field} must be {what}, got {getattr(self, field)!r}")

    # ---- the pass -------------------------------------------------------------------------------

    def sites(self, model: nn.Module, ctx: Context) -> list[Site]:
        out = []
        for s in find_sites(model):
            mod = model.get_submodule(s.name)
            if not matches(s.name, mod, self.targets) or matches(s.name, mod, self.ignore):
                continue
            why = s.why or (None if s.act is not None else "its activation has no ACM form")
            if why is not None:
                ctx.notes.append(f"{s.name}: left dense ({why})")
                continue
            if s.fc1.out_features % self.n_learners:
                raise UserError(
                    f"acm: n_learners={self.n_learners} does not divide the hidden width "
                    f"{s.fc1.out_features} of {s.name}"
                )
            out.append(s)
        if not out:
            raise UserError(
                "acm: no MLP of a supported form (timm Mlp/SwiGLU, HF BERT/ViT, Llama-style) matched"
            )
        return out

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        sites = self.sites(model, ctx)
        teacher = ctx.teacher
        tsites = [s for s in find_sites(teacher) if s.name in {x.name for x in sites}]
        cap = _Capture(teacher, tsites)
        try:
            acms = self._build(model, sites, ctx, cap)
            cfg = ctx.train.override(batch_size=self.batch_size)
            fits = {}
            for phase, steps, lr in (("distill", self.distill_steps, self.distill_lr), ("gates", self.gate_steps, self.gate_lr)):  # fmt: skip
                if steps and not (phase == "gates" and self.fixed_k is not None):
                    fits[phase] = self._layerwise(
                        acms, ctx, cap, phase, cfg.override(steps=steps, lr=lr, optimizer="adam")
                    )
        finally:
            cap.close()
        for acm in acms.values():
            acm.fixed_k = self.fixed_k
        for acm in acms.values():
            acm.use_gate, acm.gumbel_tau = True, self.gumbel_tau
        try:
            fits["end_to_end"] = self._end_to_end(
                model, acms, ctx, cfg.override(steps=self.steps, lr=self.lr)
            )
        finally:
            for acm in acms.values():
                acm.use_gate, acm.last_choice = False, None  # a graph tensor: keep the model deep-copyable
        self._report(model, acms, ctx, fits)
        return model

    def _build(self, model, sites, ctx, cap) -> dict[str, ACMMLP]:
        """Record each MLP's inputs on the calibration data, build and install its ACM."""
        seen: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
        with torch.no_grad():
            for batch in ctx.batches("calib"):
                ctx.call(ctx.teacher, batch)
                for s in sites:
                    seen[s.name].append(cap.inputs[s.name])
        acms = {}
        for s in sites:
            acm = build_acm(s, self.n_learners, self.gate_width, 0, torch.cat(seen[s.name]))
            install(model, s, acm)
            acms[s.name] = acm
        return acms

    def _layerwise(self, acms, ctx, cap, phase, cfg) -> FitResult:
        objective = _LayerwiseObjective(acms, ctx.teacher, cap, ctx.call, phase, self.tau)
        params = [
            p for a in acms.values() for p in (a.gate.parameters() if phase == "gates" else _learners(a))
        ]
        return fit(objective, lambda m, b: m(b), ctx.batches("train"), cfg, params=params, device=ctx.device,
                   desc=f"acm {phase}")  # fmt: skip

    def _end_to_end(self, model, acms, ctx, cfg) -> FitResult:
        task = default_loss(ctx.teacher, ctx.call, ctx.kind)
        mods = list(acms.values())
        costs = [_cost(a) for a in mods]

        def loss(m, batch):
            value = task(m, batch)
            if self.fixed_k is not None:  # static baseline: no gate, no compute terms
                return value
            choices = [a.last_choice for a in mods]
            fracs = [L.fraction(y, a.k_min, a.n_learners) for y, a in zip(choices, mods, strict=True)]
            b = len(batch)
            value = value + self.budget_weight * L.budget_loss(fracs, costs, self.budget)
            if self.entropy_weight:
                value = value + self.entropy_weight * L.entropy_loss(choices, b)
            if self.diversity_weight:
                value = value + self.diversity_weight * L.diversity_loss(choices, b)
            return value

        params = None if self.train_all else [p for a in mods for p in a.parameters()]
        return fit(
            model, loss, ctx.batches("train"), cfg, params=params, device=ctx.device, desc="acm end-to-end"
        )

    def _report(self, model, acms, ctx, fits) -> None:
        stats = choice_stats(model, acms, ctx)
        ctx.info["acm"] = stats
        ctx.info["training"] = {
            phase: {"steps": f.steps, "final_loss": f.final_loss, "seconds": round(f.seconds, 1), "world_size": f.world_size, "losses": f.losses}
            for phase, f in fits.items()
        }  # fmt: skip
        ctx.notes.append(
            f"{len(acms)} MLPs as ACMs ({self.n_learners} learners each); executed fraction on the eval "
            f"data {stats['mean_fraction']:.3f} (budget {self.budget})"
        )


def _learners(acm: ACMMLP):
    return [p for n, p in acm.named_parameters() if not n.startswith("gate.")]


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
