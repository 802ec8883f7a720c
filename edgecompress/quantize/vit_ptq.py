"""ViT/transformer PTQ passes of the AdaLog family: ``adalog``, ``repq_vit`` and ``dopq_vit``.

One calibration procedure (METHODS.md §1), three sets of defaults:

| pass | softmax (A of A@V) | post-GELU (fc2 input) | post-LN reparameterization |
|---|---|---|---|
| ``adalog`` (ECCV 2024, official code GoatWu/AdaLog) | AdaLog, scale 1, q searched | AdaLog + shift c, joint (q, scale) | mean (RepQ-ViT's) |
| ``repq_vit`` (ICCV 2023) | log√2 | uniform | mean |
| ``dopq_vit`` (arXiv 2408.03291; no code) | TanQ (our construction) | uniform | median (v1 MOSF) |

Every choice is a field, so an ablation is one recipe line: ``softmax_quantizer`` (adalog, log2,
logsqrt2, tanq, uniform), ``post_gelu`` (adalog, uniform), ``reparam`` (mean, median, mad, none).
Weights: asymmetric uniform per output channel. Linear inputs, Q, K, V: asymmetric uniform (per
tensor; Q/K/V per head). All searched with FPCS against the layer's output MSE on float inputs.

Procedure: make attention explicit; swap targeted Linears for QuantLinear; find the units
(:mod:`~edgecompress.quantize.vit_ptq_model`); then, block by block in module order, capture the
block's float inputs (first ``calib_samples`` samples of the loop; padding tokens of text batches
dropped, attention operands grouped by sequence length) and search each unit
(:mod:`~edgecompress.quantize.vit_ptq_objectives`, :mod:`~edgecompress.quantize.vit_ptq_attn`).
Post-LN inputs are first calibrated per channel, folded into the LayerNorm and its Linears (kept
only if the model output is unchanged), then searched per tensor. Quantizers are installed after
every block is calibrated, so all searches see full-precision inputs as in the official code. The
report carries, per quantizer, the layer's output SQNR on float inputs (``layer_sqnr_db``), the
alternation rounds its search ran (``search_rounds``; fewer than asked where it reached a fixed
point) and, for Linears, the SQNR of the layer output inside the fully quantized model
(``model_sqnr_db``) on up to 8 example samples.

Not quantized here: convolutions (the patch embedding stays float; the papers quantize its weights
and 8-bit input) and grouped-query attention (K/V with fewer heads than Q is refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from edgecompress.errors import UserError
from edgecompress.models.attention import explicit_attention_
from edgecompress.pipeline import Context, register_pass
from edgecompress.quantize.modules import sqnr_db
from edgecompress.quantize.ptq import check_bits, quantize_linears_
from edgecompress.quantize.reparam import GELU_SHIFT
from edgecompress.quantize.vit_ptq_attn import search_probs_v, search_qk
from edgecompress.quantize.vit_ptq_install import install_attention, install_linear
from edgecompress.quantize.vit_ptq_model import (
    ATTN_POINTS,
    AttnUnit,
    LinearUnit,
    block_key,
    call_model,
    capture,
    discover_units,
    fold_verified_,
)
from edgecompress.quantize.vit_ptq_objectives import channel_act_search, search_linear

SoftmaxQ = Literal["adalog", "log2", "logsqrt2", "tanq", "uniform"]
PostGelu = Literal["adalog", "uniform"]
Reparam = Literal["mean", "median", "mad", "none"]
REPORT_SAMPLES = 8


def _db(ref_power: float, mse: float) -> float:
    return round(10 * float(torch.log10(torch.tensor(ref_power / max(mse, 1e-30)))), 2)


def _subsample_rows(x: torch.Tensor, max_rows: int | None, gen: torch.Generator) -> torch.Tensor:
    if max_rows is None or x.shape[0] <= max_rows:
        return x
    return x[torch.randperm(x.shape[0], generator=gen)[:max_rows].sort().values]


class _Calibrator:
    """Runs the procedure of the module docstring for one pass configuration."""

    def __init__(self, cfg, model: nn.Module, ctx: Context):
        self.cfg, self.model, self.ctx = cfg, model, ctx
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.example = ctx.example_inputs[0]
        self.installs: list = []

    def run(self, units) -> None:
        with torch.no_grad():
            self.ref = call_model(self.model, self.example, REPORT_SAMPLES).detach().clone()
        groups: list[list] = []
        for u in units:
            key = block_key(u.names[0] if isinstance(u, LinearUnit) else u.name)
            if groups and block_key(_unit_name(groups[-1][0])) == key:
                groups[-1].append(u)
            else:
                groups.append([u])
        for group in groups:
            names = [n for u in group for n in _capture_names(u)]
            cache = capture(self.model, names, self.ctx.forward_loop, self.cfg.calib_samples)
            for u in group:
                self._linear(u, cache) if isinstance(u, LinearUnit) else self._attention(u, cache)
            del cache

    def _linear(self, u: LinearUnit, cache) -> None:
        cfg = self.cfg
        x = cache.tokens(u.names[0]).float()  # [T, K], padding tokens dropped
        x = _subsample_rows(x, cfg.max_tokens, self.gen)
        info: dict = {}
        if u.norm is not None and cfg.reparam != "none" and not u.post_gelu:
            s_c, z_c = channel_act_search(x, cfg.a_bits)
            folded = fold_verified_(self.model, u, s_c, z_c, cfg.reparam, cfg.a_bits, self.example, self.ref)
            if folded is None:
                info["reparam"] = "skipped (output not equivalent or no bias)"
            else:
                _, _, r, b = folded
                x = x / r - b
                info["reparam"] = {
                    "rule": cfg.reparam,
                    "norm": u.norm,
                    "r_max_over_min": round(float(r.max() / r.min()), 3),
                }
        lins = [self.model.get_submodule(n) for n in u.names]
        w = torch.cat([lin.weight.detach().float() for lin in lins])  # [O_total, K]
        shift = GELU_SHIFT if (u.post_gelu and cfg.post_gelu == "adalog") else None
        p = search_linear(x, w, cfg.w_bits, cfg.a_bits, cfg.search_rounds, shift)
        info["layer_sqnr_db"] = _db(p.ref_power, p.mse)
        info["search_rounds"] = p.rounds
        self.installs.append(lambda: install_linear(self.model, u.names, p, cfg.w_bits, cfg.a_bits, info))

    def _attention(self, u: AttnUnit, cache) -> None:
        cfg = self.cfg
        groups = cache.attention_groups([f"{u.name}.{p}" for p in ATTN_POINTS])  # padding dropped
        q, k, v, a = ([g[i].float() for g in groups] for i in range(4))  # [B_g, H, N_g, ·] each
        if k[0].shape[1] != q[0].shape[1]:
            raise UserError(
                f"{u.name}: grouped-query attention is not supported by {cfg.name} (use uniform_ptq)"
            )
        samples = sum(x.shape[0] for x in q)
        if cfg.max_tokens is not None and sum(x.shape[0] * x.shape[2] for x in q) > cfg.max_tokens:
            per_sample = max(1, cfg.max_tokens // samples)  # query rows kept per sample
            for i, x in enumerate(q):
                rows = torch.randperm(x.shape[2], generator=self.gen)[:per_sample].sort().values
                q[i], a[i] = x[:, :, rows], a[i][:, :, rows]
        qk = search_qk(q, k, cfg.a_bits, cfg.search_rounds)
        av = search_probs_v(a, v, cfg.a_bits, cfg.a_bits, cfg.softmax_quantizer, cfg.search_rounds)
        self.installs.append(
            lambda: install_attention(self.model, u.name, qk, av, cfg.softmax_quantizer, cfg.a_bits)
        )

    def finish(self, linear_names: list[str]) -> None:
        """Install every quantizer, then add the in-model output SQNR of each Linear to its report."""
        ref_out = _linear_outputs(self.model, linear_names, self.example)
        for install in self.installs:
            install()
        got = _linear_outputs(self.model, linear_names, self.example)
        for n in linear_names:
            q = self.model.get_submodule(n).in_quant
            if hasattr(q, "stats") and n in got:
                q.stats["model_sqnr_db"] = round(sqnr_db(ref_out[n], got[n]), 2)


def _unit_name(u) -> str:
    return u.names[0] if isinstance(u, LinearUnit) else u.name


def _capture_names(u) -> list[str]:
    return [u.names[0]] if isinstance(u, LinearUnit) else [f"{u.name}.{p}" for p in ATTN_POINTS]


def _linear_outputs(model: nn.Module, names: list[str], example) -> dict[str, torch.Tensor]:
    outs, hooks = {}, []
    try:
        for n in names:
            hooks.append(
                model.get_submodule(n).register_forward_hook(
                    lambda m, a, o, n=n: outs.setdefault(n, o.detach())
                )
            )
        with torch.no_grad():
            call_model(model, example, REPORT_SAMPLES)
    finally:
        for h in hooks:
            h.remove()
    return outs


def calibrate_(cfg, model: nn.Module, ctx: Context) -> nn.Module:
    """The shared procedure of the three passes (``cfg`` is one of them).

    ``cfg.threads > 0`` sets torch's intra-op threads for the calibration only (restored after):
    the searches run thousands of small tensor ops, and on a CPU shared with other jobs every
    multi-threaded op can wait a scheduler tick for its second thread (measured: 4 ms per op,
    ~20× slower than one thread).
    """
    before = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        torch.manual_seed(cfg.seed)
        explicit_attention_(model)
        linears = quantize_linears_(model, cfg.targets, cfg.ignore)
        units = discover_units(model, linears, ctx.example_inputs[0])
        cal = _Calibrator(cfg, model, ctx)
        cal.run(units)
        cal.finish(linears)
    finally:
        torch.set_num_threads(before)
    return model


@dataclass(frozen=True)
class _ViTPTQBase:
    """Fields shared by the three passes (see the module docstring)."""

    needs_data: ClassVar[bool] = True
    w_bits: int = 4
    a_bits: int = 4
    calib_samples: int = 32
    softmax_quantizer: SoftmaxQ = "adalog"
    post_gelu: PostGelu = "adalog"
    reparam: Reparam = "mean"
    search_rounds: int = 3
    max_tokens: int | None = None  # subsample calibration tokens (speed); None = all, as the papers
    threads: int = 0  # intra-op threads during calibration; 0 = leave torch's setting
    seed: int = 0
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ()
    version: int = 1

    def __post_init__(self):
        check_bits(self.w_bits, self.a_bits)
        if self.calib_samples < 1 or self.search_rounds < 1:
            raise ValueError("calib_samples and search_rounds must be ≥ 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be ≥ 1 or null")
        if self.threads < 0:
            raise ValueError("threads must be ≥ 0")

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        return calibrate_(self, model, ctx)


@register_pass
@dataclass(frozen=True)
class AdaLogPTQ(_ViTPTQBase):
    """AdaLog (ECCV 2024; official code GoatWu/AdaLog, calibration-only numbers, no block reconstruction)."""

    name: ClassVar[str] = "adalog"


@register_pass
@dataclass(frozen=True)
class RepQViTPTQ(_ViTPTQBase):
    """RepQ-ViT (ICCV 2023): mean reparameterization + log√2 softmax, in AdaLog's FPCS calibration."""

    name: ClassVar[str] = "repq_vit"
    softmax_quantizer: SoftmaxQ = "logsqrt2"
    post_gelu: PostGelu = "uniform"


@register_pass
@dataclass(frozen=True)
class DopQViTPTQ(_ViTPTQBase):
    """DopQ-ViT (arXiv 2408.03291 v1 MOSF = median; TanQ as our companded construction; no block
    reconstruction, so not comparable with the paper's reconstructed numbers)."""

    name: ClassVar[str] = "dopq_vit"
    softmax_quantizer: SoftmaxQ = "tanq"
    post_gelu: PostGelu = "uniform"
    reparam: Reparam = "median"
