"""Closed-form recovery of a pruned group's output projection on calibration data.

With ``X̃ = [X, 1]`` the projection's input on the calibration tokens (padding excluded) and
``W̃ = [W, b]`` its weight and bias, the kept columns ``S`` (plus the bias column when the layer has
a bias) are refit so that the pruned group reproduces the dense group's output ``Y``:

* ``none`` — the kept columns as they are;
* ``bias`` — bias compensation (FLAP, An et al., AAAI 2024): the removed columns' mean contribution
  ``W_R · E[X_R]`` moves into the bias;
* ``lstsq`` — least-squares reconstruction: ``W̃_S = argmin ‖X̃_S W̃_Sᵀ − Y‖² + λ‖W_S − W_S⁰‖²``, a
  ridge towards the kept columns as they were (``W⁰``), with ``λ`` = ``ridge`` × the mean of
  ``diag(X_SᵀX_S)`` (the bias is not penalised). Kwon et al. (NeurIPS 2022, "A Fast Post-Training
  Pruning Framework for Transformers") fit one scale per kept head / neuron to the layer output with
  the pruned model's inputs; we fit every kept column (CORP's ridge form; those scales are a special
  case), and the ridge towards ``W⁰`` keeps the fit from following the few calibration tokens (a
  ridge towards zero measured worse on MiniLM: embedding cosine 0.55 instead of 0.80 at 50 % with 32
  calibration texts). :mod:`.reconstruct` runs it layer after layer in model order with the
  *pruned* model's inputs and Kwon et al.'s target (the dense layer output plus the dense residual
  stream minus the pruned one, so each layer also makes up for the layers before it); the
  per-group curves use the same solve with the dense inputs (:func:`refit`, from the Gram matrix).

A removed branch (no kept column) becomes its mean output under ``bias`` and ``lstsq``.
"""

from __future__ import annotations

import torch

RECOVERIES = ("none", "bias", "lstsq")


def ridge_solve(
    gram: torch.Tensor,
    cross: torch.Tensor,
    ridge: float,
    bias_index: int | None,
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """``argmin_V ‖A V − B‖² + λ‖V_w − P_w‖²`` given ``gram = AᵀA`` (``[m, m]``) and ``cross = AᵀB``
    (``[m, d]``): a ridge towards ``prior`` (``Pᵀ``, ``[d, m]``; zero when None); row ``bias_index``
    of ``V`` is not penalised. ``λ = ridge ×`` the mean diagonal of the penalised part of ``gram``.
    Returns ``Vᵀ`` (``[d, m]``), float64."""
    g, c = gram.double(), cross.double()
    m = g.shape[0]
    reg = torch.ones(m, dtype=torch.float64)
    if bias_index is not None:
        reg[bias_index] = 0.0
    w_diag = g.diagonal()[reg > 0]
    lam = max(ridge * float(w_diag.mean()) if len(w_diag) else 0.0, 1e-12)
    lhs = g + torch.diag(reg * lam)
    rhs = c if prior is None else c + (reg * lam)[:, None] * prior.double().T
    try:
        sol = torch.linalg.solve(lhs, rhs)
    except RuntimeError:  # singular (e.g. an all-zero column without a ridge): least norm
        sol = torch.linalg.lstsq(lhs, rhs).solution
    return sol.T


def refit(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gram: torch.Tensor,
    cols: torch.Tensor,
    mode: str,
    ridge: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The projection with only columns ``cols`` kept, recovered by ``mode`` with the dense inputs.

    ``gram`` is ``X̃ᵀX̃`` (``[K+1, K+1]``, last index the constant). Returns the full-size weight
    (removed columns zero), the bias (None without one) and the removed branch's constant output
    (the bias for ``none``, the mean output otherwise) for when ``cols`` is empty."""
    k = weight.shape[1]
    w = weight.double()
    b = bias.double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    wt = torch.cat([w, b[:, None]], 1)  # [d, K+1]
    drop = torch.ones(k, dtype=torch.bool)
    drop[cols] = False
    mean = gram[k, :k].double() / gram[k, k].double().clamp_min(1.0)
    out_w = torch.zeros_like(w)
    if mode == "lstsq" and (len(cols) or bias is not None):
        sel = torch.cat([cols, torch.tensor([k])]) if bias is not None else cols
        v = ridge_solve(
            gram[sel][:, sel], gram[sel].double() @ wt.T, ridge, len(cols) if bias is not None else None
        )
        out_w[:, cols] = v[:, : len(cols)]
        new_b = v[:, -1] if bias is not None else None
    else:
        out_w[:, cols] = w[:, cols]
        shift = w[:, drop] @ mean[drop] if mode == "bias" else torch.zeros_like(b)
        new_b = b + shift if bias is not None else None
    constant = b if mode == "none" else wt @ torch.cat([mean, torch.ones(1, dtype=torch.float64)])
    return out_w, new_b, constant


def projection(weight, bias, gram, cols: torch.Tensor, mode: str, ridge: float):
    """(weight, bias) of the projection with columns ``cols`` kept and recovered; with no column kept the
    weight is zero and the bias is the removed branch's constant (given even to a layer without one)."""
    w, b, constant = refit(weight, bias, gram, cols, mode, ridge)
    return (w, constant) if len(cols) == 0 else (w, b)
