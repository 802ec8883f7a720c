"""The ``seer_attention`` pass: an AttnGate core in every targeted attention, gates trained by self-distillation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from edgecompress.calib import example_run
from edgecompress.errors import UserError
from edgecompress.models.attention import adapters, explicit_attention_
from edgecompress.models.targeting import matches
from edgecompress.pipeline import Context, register_pass
from edgecompress.sparsity.seer.cache import (
    CachedObjective,
    build_cache,
    calibrate_threshold,
    collecting,
    one_thread,
    samples,
)
from edgecompress.sparsity.seer.core import FORMS, SeerAttentionCore
from edgecompress.sparsity.seer.dropped import DROPPED
from edgecompress.sparsity.seer.losses import layer_kl, total_loss
from edgecompress.sparsity.seer.report import seer_report
from edgecompress.structure import replace_module
from edgecompress.train import fit

BLOCKS = (16, 32, 64, 128)
RULES = ("topk", "threshold")
AFTER_QUANT = (
    "the gates would train on quantized activations and the core would bypass the softmax quantizer: "
    "put uniform_ptq after seer_attention (it then quantizes q, k, v around the sparse core)"
)


@dataclass(frozen=True)
class Site:
    name: str  # the attention module (the adapter's parent)
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool


def _shapes_hook(seen: dict, parent: str):
    def hook(_m, args):
        seen.setdefault(parent, (args[0].shape, args[1].shape))  # q, k after the explicit form

    return hook


def find_sites(model: nn.Module, ctx: Context, targets, ignore) -> list[Site]:
    """Every targeted attention that runs, with its head counts (seen on one example call) and causality."""
    explicit_attention_(model)
    seen: dict[str, tuple] = {}
    hooks = []
    for name, adapter in adapters(model):
        parent = name.rpartition(".")[0]
        mod = model.get_submodule(parent)
        if matches(parent, mod, targets) and not matches(parent, mod, ignore):
            hooks.append(adapter.register_forward_pre_hook(_shapes_hook(seen, parent)))
    try:
        with torch.no_grad():
            example_run(ctx)(model)
    finally:
        for h in hooks:
            h.remove()
    sites = []
    for parent, (q, k) in seen.items():
        causal = bool(getattr(model.get_submodule(parent), "is_causal", False))
        sites.append(Site(parent, q[1], k[1], q[-1], causal))
    return sites


def rope_table(model: nn.Module) -> tuple[torch.Tensor | None, float]:
    """The inverse frequencies and attention scaling of a Hugging Face decoder's rotary embedding."""
    if not hasattr(model, "config"):
        return None, 1.0  # timm: EVA's 2-D RoPE is applied before the adapter; the gate sees it as is
    tables = [m for _, m in model.named_modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    if not tables:
        return None, 1.0
    first = tables[0]
    if any(
        t.inv_freq.shape != first.inv_freq.shape or not torch.equal(t.inv_freq, first.inv_freq)
        for t in tables
    ):
        raise UserError("seer_attention: the model has several RoPE tables (per-layer RoPE is not supported)")
    return first.inv_freq.detach().float().clone(), float(getattr(first, "attention_scaling", 1.0))


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@register_pass
@dataclass(frozen=True)
class SeerAttention:
    """SeerAttention (arXiv 2410.13276; code microsoft/SeerAttention aba03e3): learned block-sparse attention; see :mod:`edgecompress.sparsity.seer`."""

    name: ClassVar[str] = "seer_attention"
    family: ClassVar[str] = "dynamic"
    VERSION: ClassVar[int] = 1
    needs_training: ClassVar[bool] = True
    cannot_follow: ClassVar[dict] = {"quantize": AFTER_QUANT}

    block: int = 64
    density: float | None = 0.5
    rule: str = "topk"
    threshold: float | None = None
    gate_dim: int | None = None
    keep_diagonal: bool = True
    keep_first: bool = True
    dense_last_rows: int = 2
    min_seq_len: int = 0
    skip_first_rows: float = 0.25
    form: str = "auto"
    dropped: str = "skip"
    steps: int | None = None
    lr: float | None = 1e-3
    batch_size: int | None = None
    targets: tuple[str, ...] = ("re:.*",)
    ignore: tuple[str, ...] = ()

    def __post_init__(self):
        checks = [
            ("block", self.block in BLOCKS, f"one of {BLOCKS}"),
            ("density", self.density is None or (_num(self.density) and 0 < self.density <= 1), "in (0, 1] or null"),
            ("rule", self.rule in RULES, f"one of {RULES}"),
            ("threshold", self.threshold is None or (_num(self.threshold) and 0 <= self.threshold < 1),
             "in [0, 1) or null"),
            ("gate_dim", self.gate_dim is None or (isinstance(self.gate_dim, int) and self.gate_dim >= 1),
             "an integer >= 1 or null (the head dim)"),
            ("dense_last_rows", isinstance(self.dense_last_rows, int) and self.dense_last_rows >= 0, "an integer >= 0"),
            ("min_seq_len", isinstance(self.min_seq_len, int) and self.min_seq_len >= 0, "an integer >= 0"),
            ("skip_first_rows", _num(self.skip_first_rows) and 0 <= self.skip_first_rows < 1, "in [0, 1)"),
            ("form", self.form in FORMS, f"one of {FORMS}"),
            ("dropped", self.dropped in DROPPED, f"one of {DROPPED}"),
            ("lr", self.lr is None or (_num(self.lr) and self.lr > 0), "a number > 0 or null"),
        ]  # fmt: skip
        for field, ok, what in checks:
            if not ok:
                raise ValueError(f"{field} must be {what}, got {getattr(self, field)!r}")
        if (self.density is None) == (self.threshold is None):
            raise ValueError(
                f"set exactly one of density and threshold (got density={self.density!r}, "
                f"threshold={self.threshold!r}; density: null selects by threshold)"
            )

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        sites = find_sites(model, ctx, self.targets, self.ignore)
        if not sites:
            raise UserError(
                "seer_attention: no attention of a supported form (timm ViT/DeiT/EVA/BEiT, HF) matched"
            )
        cores = self._install(model, sites)
        kl_before = held_out_kl(model, cores, ctx, self.skip_first_rows)
        trained, cache = self._train(model, cores, ctx)
        if self.rule == "threshold" and self.density is not None:
            t, kept = calibrate_threshold(list(cores.values()), cache, self.density)
            for c in cores.values():
                c.density, c.threshold = None, t
            trained["calibrated"] = {"threshold": t, "kept_train": round(kept, 4), "samples": samples(cache)}
        kl_after = held_out_kl(model, cores, ctx, self.skip_first_rows)
        ctx.info["seer"] = seer_report(model, cores, ctx, {"before": kl_before, "after": kl_after})
        ctx.info["training"] = trained
        ctx.notes.append(
            f"{len(cores)} attentions with AttnGates (block {self.block}); held-out KL(truth ‖ gate) "
            f"{kl_before:.4f} → {kl_after:.4f}; kept {ctx.info['seer']['density']:.3f} of the blocks (eval data)"
            + (
                f"; threshold {trained['calibrated']['threshold']:.4g} (calibrated)"
                if "calibrated" in trained
                else ""
            )
        )
        return model

    def _install(self, model: nn.Module, sites: list[Site]) -> dict[str, SeerAttentionCore]:
        inv_freq, scaling = rope_table(model)
        cores = {}
        for s in sites:
            gdim = self.gate_dim or s.head_dim
            rope_dims = 0 if inv_freq is None else 2 * inv_freq.numel()
            if rope_dims and gdim != s.head_dim:
                raise UserError(
                    f"seer_attention: gate_dim must equal the head dim {s.head_dim} on a RoPE model"
                )
            core = SeerAttentionCore(
                s.heads, s.kv_heads, s.head_dim, gdim, self.block, s.causal, rope_dims, scaling, self.density,
                self.threshold, self.keep_diagonal, self.keep_first, self.dense_last_rows, self.min_seq_len, self.form,
                self.dropped,
            )  # fmt: skip
            if rope_dims:
                core.gate.inv_freq.copy_(inv_freq)
            dev = next((p.device for p in model.parameters()), torch.device("cpu"))
            cores[s.name] = replace_module(model, f"{s.name}.ec_attn.core", core.to(dev))
        return cores

    def _train(self, model: nn.Module, cores: dict, ctx: Context):
        """Train the gates: from the cache of their inputs and targets (:mod:`.cache`) when it fits in
        memory, else through the live model. Returns the training record and the cache."""
        cfg = ctx.train.override(steps=self.steps, lr=self.lr, batch_size=self.batch_size)
        mods = list(cores.values())
        cache, complete = build_cache(model, mods, ctx.batches("train"), ctx.call, cfg.batch_size)
        params = [p for c in mods for p in c.gate.parameters()]
        if complete:  # one CPU thread: a cached step is a few small einsums (see .cache.one_thread)
            objective, data, scope = (
                CachedObjective(mods, self.skip_first_rows),
                cache,
                one_thread(ctx.device),
            )
            loss_fn = _cached_loss
        else:
            objective, data = _Objective(model, mods, ctx.call, self.skip_first_rows), ctx.batches("train")
            scope = collecting(mods)
            objective.train(model.training)  # fit restores the wrapper's mode, and with it the model's
            loss_fn = _live_loss
        with scope:
            res = fit(objective, loss_fn, data, cfg, params=params, device=ctx.device, desc="seer gates")
        return {
            "steps": res.steps, "final_loss": res.final_loss, "seconds": round(res.seconds, 1),
            "losses": res.losses, "world_size": res.world_size, "lr": cfg.lr, "cached": complete,
        }, cache  # fmt: skip


def _cached_loss(objective, batch):
    return objective(batch.inputs)


def _live_loss(objective, batch):
    return objective(batch)


class _Objective(nn.Module):
    """``forward(batch)`` = the gates' loss, so that under torchrun the loss is DDP's output and DDP sees
    the gates it depends on (the model's own output does not depend on them while they train)."""

    def __init__(self, model: nn.Module, cores: list, call, skip_first: float):
        super().__init__()
        self.model = model
        self.__dict__["cores"], self.__dict__["call"] = cores, call
        self.skip_first = skip_first

    def forward(self, batch) -> torch.Tensor:
        self.call(self.model, batch)
        return total_loss(self.cores, self.skip_first)


@torch.no_grad()
def held_out_kl(model: nn.Module, cores: dict, ctx: Context, skip_first: float) -> float:
    """Mean over the eval samples of the summed-over-layers KL(truth ‖ gate)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with collecting(cores.values()) as mods:
            for batch in ctx.batches("eval"):
                ctx.call(model, batch)
                per_sample = sum(
                    layer_kl(
                        c.last["logits"], c.last["truth"], c.last["rows"], skip_first if c.causal else 0.0
                    )
                    for c in mods
                )
                total, count = total + float(per_sample.sum()), count + per_sample.numel()
    finally:
        model.train(was)
    return total / max(count, 1)
