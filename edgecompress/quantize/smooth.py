"""SmoothQuant (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models", ICML 2023; arXiv 2211.10438 v7) as a field of ``uniform_ptq``.

A Linear ``y = x Wᵀ`` is rewritten as ``y = (x / s) (W · s)ᵀ`` (``W · s`` scales input column
``j`` by ``s_j``): exact in real arithmetic, but the per-tensor activation quantizer now sees
``x / s``, whose outlier channels are divided down, while the per-output-channel weight quantizer
absorbs the factors. The paper's migration strength ``α``::

    s_j = max|X_j|^α / max|W_{:,j}|^(1-α)        (max over the calibration tokens / output rows)

Choices where the paper is silent or where we differ (stated):

* **Where 1/s lives.** The paper folds ``1/s`` into the preceding LayerNorm (no run-time cost),
  which is exact only when that LayerNorm feeds nothing else. In post-LN encoders (BERT, MiniLM)
  its output also feeds the residual, so we keep ``1/s`` as an explicit per-channel multiply at
  the head of the Linear's input chain (:class:`ChannelScale`, exported as one ``Mul`` before the
  Q/DQ pair; NNCF's SmoothQuant leaves the same ``Multiply``), and ``s`` in its weight chain
  (folded into the weight at export). Linears fed by the same normalization output (q, k and v)
  share one ``s``, from the largest weight column over the group, as in the paper: their
  multiplies and activation quantizers are then identical, which runtimes merge (OpenVINO does;
  per-Linear factors measured ~10 % slower there on MiniLM).
* **Which Linears** (``smooth_targets``): ``post_norm`` (default) — the paper's set, the Linears
  whose input is a LayerNorm/RMSNorm output (QKV and FC1 in a transformer block), found on the
  calibration run by tensor identity (the norm's output object is the Linear's input); ``all`` —
  every quantized Linear, the output projection and FC2 too. ``all`` is NNCF 3.4's transformer
  set (its quantized MiniLM IR has a SmoothQuant ``Multiply`` before the output-projection and
  FC2 quantizers as well); on MiniLM W8A8 it is what separates the two: ``all`` at α 0.8 gives
  embedding cosine 0.9982 to FP32 against ``post_norm``'s 0.9963 (``benchmarks/deploy_smooth_scan.py``).
* **Statistics.** ``max|X_j|`` over the real tokens of the calibration set (padding left out, as
  the observers do); a channel that never fires (max 0) or a weight column of zeros keeps
  ``s_j = 1``; ``s`` is clamped to [1e-5, 1e5].
* **α.** ``smooth_alpha`` (0 = off, the default). The paper uses 0.5 for most models and up to
  0.75–0.85 for the hardest LLMs; NNCF's transformer default is 0.95.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from edgecompress.calib import real_tokens, tracking_mask
from edgecompress.errors import UserError
from edgecompress.models.slots import add_to_chain
from edgecompress.structure import register_swap

SMOOTH_TARGETS = ("post_norm", "all")
S_MIN, S_MAX = 1e-5, 1e5


@register_swap
class ChannelScale(nn.Module):
    """Multiply by ``scale`` along one dimension: an input (``dim=-1``, channels last) or an
    ``[out, in]`` weight (``dim=1``, its input columns)."""

    SLOT_KIND: ClassVar[str] = "scale"
    VERSION: ClassVar[int] = 1

    def __init__(self, channels: int, dim: int = -1):
        super().__init__()
        self.dim = dim
        self.register_buffer("scale", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.dim] = -1
        return x * self.scale.to(x.dtype).view(shape)

    def swap_config(self) -> dict:
        return {"channels": int(self.scale.numel()), "dim": self.dim}

    @classmethod
    def from_swap(cls, original, config: dict) -> ChannelScale:
        return cls(int(config["channels"]), int(config["dim"]))

    def describe(self) -> dict:
        return {"layer": "SmoothQuant channel scale"}


def check_smooth(alpha: float, targets: str) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"smooth_alpha must be in [0, 1] (0 = off), got {alpha}")
    if targets not in SMOOTH_TARGETS:
        raise UserError(f"smooth_targets must be one of {', '.join(SMOOTH_TARGETS)}, got {targets!r}")


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm) or type(m).__name__.endswith(("LayerNorm", "RMSNorm"))


@torch.no_grad()
def input_absmax(model: nn.Module, linears: list[str], forward_loop) -> tuple[dict, dict[str, str]]:
    """Per-input-channel max |x| of each Linear over one run of ``forward_loop`` (real tokens only),
    and for the Linears whose input is a normalization layer's output object, that layer's name."""
    amax: dict[str, torch.Tensor] = {}
    post_norm: dict[str, str] = {}
    norm_outputs: list[tuple[torch.Tensor, str]] = []
    names = {m: n for n, m in model.named_modules()}
    hooks = []

    def on_norm(m, _a, out):
        norm_outputs.append((out, names[m]))

    def on_linear(name):
        def hook(_m, args):
            x = args[0]
            src = next((n for t, n in norm_outputs if x is t), None)
            if src is not None:
                post_norm[name] = src
            flat = real_tokens(x, current["mask"]).reshape(-1, x.shape[-1]).abs().amax(0).float()
            amax[name] = flat if name not in amax else torch.maximum(amax[name], flat)

        return hook

    with tracking_mask(model) as current:
        hooks.append(model.register_forward_pre_hook(lambda *_: norm_outputs.clear()))
        hooks += [m.register_forward_hook(on_norm) for m in model.modules() if _is_norm(m)]
        hooks += [model.get_submodule(n).register_forward_pre_hook(on_linear(n)) for n in linears]
        try:
            forward_loop(model)
        finally:
            for h in hooks:
                h.remove()
    return amax, post_norm


def smoothing_factors(x_absmax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^α / max|W_{:,j}|^(1-α)`` for an ``[out, in]`` weight; 1 where undefined."""
    w_absmax = w.detach().abs().amax(0).float()
    s = x_absmax.clamp_min(1e-12).pow(alpha) / w_absmax.clamp_min(1e-12).pow(1.0 - alpha)
    s = torch.where((x_absmax > 0) & (w_absmax > 0), s, torch.ones_like(s))
    return s.clamp(S_MIN, S_MAX)


def smooth_(model: nn.Module, linears: list[str], ctx, alpha: float, targets: str) -> list[str]:
    """Put ``1/s`` at the head of each chosen Linear's input chain and ``s`` in its weight chain
    (before any quantizer); returns the smoothed Linears' names."""
    amax, post_norm = input_absmax(model, linears, ctx.forward_loop)
    chosen = [n for n in linears if n in amax and (targets == "all" or n in post_norm)]
    groups: dict[str, list[str]] = {}
    for name in chosen:  # one s per normalization output (q, k, v); other inputs alone
        groups.setdefault(post_norm.get(name, name), []).append(name)
    for members in groups.values():
        x_absmax = torch.stack([amax[n] for n in members]).amax(0)
        w = torch.cat([model.get_submodule(n).effective_weight() for n in members])
        s = smoothing_factors(x_absmax, w, alpha)
        for name in members:
            _insert(model, name, s)
    return chosen


def _insert(model: nn.Module, name: str, s: torch.Tensor) -> None:
    w_scale, x_scale = ChannelScale(s.numel(), dim=1), ChannelScale(s.numel(), dim=-1)
    w_scale.scale.copy_(s)
    x_scale.scale.copy_(1.0 / s)
    add_to_chain(model, f"{name}.weight_chain", w_scale)
    add_to_chain(model, f"{name}.input_chain", x_scale)
