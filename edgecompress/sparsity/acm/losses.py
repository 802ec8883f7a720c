"""ACM's training objectives as pure functions on tensors (arXiv 2312.10193 v3, section 3; the
official code's ``methods/acm``):

* :func:`distill_loss` — phase I: MSE of every prefix ``h(z, n)``, ``n = 1..L``, to the replaced
  module's output ``o`` (mean over prefixes, tokens and features);
* :func:`gate_labels` — phase II: with ``e_n = ‖h(z, n) − o‖``, the label is the smallest
  ``n ≥ k_min`` whose next learner improves the error by less than the factor ``τ``
  (``e_n / e_{n+1} < τ``), ``L`` when every learner does. (The official code takes ``n + 1``
  here, the first learner that does *not* help, and maps a match at ``n = 0`` to ``L``; we
  follow the paper's definition.)
* :func:`budget_loss` — phase III: ``|Σ_layers cost-weighted mean fraction − β|`` (L1, the code's
  default), the fraction of each layer being ``E[k] / L``;
* :func:`entropy_loss` — ``−`` the normalised entropy of each sample's distribution of choices per
  layer (spreads compute across the tokens of a sample), averaged;
* :func:`diversity_loss` — ``−2 ×`` the mean pairwise L1 distance between the samples' mean
  compute (spreads compute across samples).

Without the last two the gates collapse to one static choice (the paper's ablation).
"""

from __future__ import annotations

import math

import torch


def distill_loss(prefixes: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """prefixes [T, L+1, d] (k = 0..L), target [T, d] -> mean squared error over k = 1..L."""
    return (prefixes[:, 1:] - target[:, None, :]).pow(2).mean()


def gate_labels(prefixes: torch.Tensor, target: torch.Tensor, tau: float, k_min: int = 0) -> torch.Tensor:
    """Phase II labels, as choice indices ``k − k_min`` [T] (see the module docstring)."""
    err = torch.linalg.vector_norm(prefixes.float() - target[:, None, :].float(), dim=-1)  # [T, L+1]
    n_learners = err.shape[1] - 1
    ratio = err[:, :-1] / err[:, 1:].clamp_min(1e-12)  # [T, L]: improvement of adding learner n+1
    small = ratio < tau
    small[:, :k_min] = False
    none = torch.full(small.shape[:1], n_learners, dtype=torch.long, device=small.device)
    first = torch.where(small.any(1), small.float().argmax(1), none)
    return first.clamp(min=k_min) - k_min


def fraction(choice: torch.Tensor, k_min: int, n_learners: int) -> torch.Tensor:
    """Per-token executed fraction ``k / L`` [T] from a (straight-through) one-hot over k_min..L."""
    ks = torch.arange(k_min, n_learners + 1, device=choice.device, dtype=choice.dtype)
    return choice @ ks / n_learners


def budget_loss(fractions: list[torch.Tensor], costs: list[float], beta: float) -> torch.Tensor:
    """``|Σ_l c_l·mean(f_l) / Σ_l c_l − β|``; ``fractions[l]`` [T_l] per-token fractions of layer l."""
    total = sum(costs)
    used = sum(c * f.mean() for f, c in zip(fractions, costs, strict=True))
    return (used / total - beta).abs()


def entropy_loss(choices: list[torch.Tensor], batch: int) -> torch.Tensor:
    """choices[l] [B·S, C] one-hots of layer l -> −mean normalised entropy of per-sample histograms."""
    terms = []
    for y in choices:
        counts = y.double().reshape(batch, -1, y.shape[-1]).sum(1)  # [B, C]
        p = counts / counts.sum(-1, keepdim=True)
        ent = -(p * (p + 1e-20).log()).sum(-1) / math.log(max(y.shape[-1], 2))
        terms.append(ent)
    return -torch.stack(terms).mean().float()


def _mean_index(y: torch.Tensor, batch: int) -> torch.Tensor:
    """Each sample's mean chosen index over its tokens, divided by C (the code's scale) [B]."""
    idx = torch.arange(y.shape[-1], device=y.device, dtype=torch.double)
    return (y.double() @ idx).reshape(batch, -1).mean(1) / y.shape[-1]


def diversity_loss(choices: list[torch.Tensor], batch: int) -> torch.Tensor:
    """−2 × mean pairwise |c_i − c_j| of the samples' mean chosen index / C (over tokens and layers)."""
    per_sample = torch.stack([_mean_index(y, batch) for y in choices]).mean(0)  # [B]
    return (-2 * (per_sample[:, None] - per_sample[None, :]).abs().mean()).float()
