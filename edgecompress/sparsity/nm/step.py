"""STEP's optimizer (Lu et al., ICML 2023, arXiv 2302.01172): Adam(W) in two phases with AutoSwitch.

Phase 1 (precondition) is plain AdamW on dense weights. After every phase-1 step the variance-change
statistic ``Z_t = mean|v_t − v_{t−1}| / mean(v_t)`` is taken over the maskable parameters (``v`` is
Adam's second moment, bias-corrected). AutoSwitch moves to phase 2 at the first step ``t`` with

* ``t ≥ t_max`` (mandatory: without it a run may never switch), or
* ``t > t_min``, a full window of ``W = round(1/(1 − β2))`` statistics, and the window mean at most
  ``switch_tol · (1 − β2)``.

Phase 2 (mask learning) freezes ``v`` as a fixed preconditioner and keeps updating the first moment
with the straight-through gradients of the N:M-masked forward::

    m ← β1·m + (1 − β1)·g;   p ← p·(1 − lr·wd) − lr · (m / (1 − β1^t)) / (sqrt(v̂_frozen) + ε)

with ``v̂_frozen`` the bias-corrected second moment at the switch.

Choices where the paper could not be read (no public code; METHODS.md §4): ``Z_t`` is normalised by
``mean(v_t)`` so the test is scale-free, and the threshold is expressed in units of ``1 − β2``:
even for gradients drawn from a fixed distribution the estimate keeps moving by about
``(1 − β2)·E|g²/v − 1|`` per step (≈ 0.8·(1 − β2) for Gaussian gradients), so "settled" means "no
faster than ``switch_tol`` times that rate" (default 2; the bias-corrected estimate of a stationary
stream gets there after about one window, a drifting one later); parameters
that are not maskable follow the same two phases (their ``v`` freezes too), as the paper freezes the
optimizer's variance as a whole. The switch step is kept in the optimizer state and reported.
"""

from __future__ import annotations

import math

import torch


class StepAdamW(torch.optim.Optimizer):
    """AdamW with STEP's AutoSwitch and frozen-variance phase 2 (see the module docstring)."""

    def __init__(self, params, maskable, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 t_min: int = 0, t_max: int = 1000, switch_tol: float = 2.0):  # fmt: skip
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.maskable = {id(p) for p in maskable}
        g0 = self.param_groups[0]
        g0.update(phase=1, switch_step=None, t=0, t_min=t_min, t_max=t_max, switch_tol=switch_tol)
        g0.update(window=round(1 / (1 - betas[1])), z=[])

    @property
    def phase(self) -> int:
        return self.param_groups[0]["phase"]

    @property
    def switch_step(self) -> int | None:
        return self.param_groups[0]["switch_step"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        g0 = self.param_groups[0]
        g0["t"] += 1
        t, phase = g0["t"], g0["phase"]
        change, level = 0.0, 0.0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    dv, v = self._update(p, group, t, phase)
                    if phase == 1 and id(p) in self.maskable:
                        change, level = change + dv, level + v
        if phase == 1:
            self._autoswitch(g0, t, change / max(level, 1e-30))
        return loss

    def _update(self, p, group, t: int, phase: int) -> tuple[float, float]:
        b1, b2 = group["betas"]
        st = self.state[p]
        if not st:
            st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        m, v = st["exp_avg"], st["exp_avg_sq"]
        m.mul_(b1).add_(p.grad, alpha=1 - b1)
        dv = vsum = 0.0
        if phase == 1:
            before = v / (1 - b2 ** (t - 1)) if t > 1 else torch.zeros_like(v)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            v_hat = v / (1 - b2**t)
            dv, vsum = float((v_hat - before).abs().sum()), float(v_hat.sum())
        else:
            v_hat = st["v_frozen"]
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(m / (1 - b1**t), v_hat.sqrt().add_(group["eps"]), value=-group["lr"])
        return dv, vsum

    def _autoswitch(self, g0: dict, t: int, z: float) -> None:
        g0["z"] = (g0["z"] + [z])[-g0["window"] :]
        full = len(g0["z"]) == g0["window"]
        mean = sum(g0["z"]) / len(g0["z"])
        settled = full and t > g0["t_min"] and mean <= g0["switch_tol"] * (1 - g0["betas"][1])
        if t >= g0["t_max"] or settled:
            self._switch(g0, t)

    def _switch(self, g0: dict, t: int) -> None:
        g0["phase"], g0["switch_step"] = 2, t
        for group in self.param_groups:
            b2 = group["betas"][1]
            for p in group["params"]:
                st = self.state[p]
                if st:
                    st["v_frozen"] = st["exp_avg_sq"] / (1 - b2**t)

    def window_mean(self) -> float:
        z = self.param_groups[0]["z"]
        return sum(z) / len(z) if z else math.nan
