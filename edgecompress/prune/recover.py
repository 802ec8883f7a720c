"""Closed-form recovery of a pruned group's output projection on calibration data.

With ``X̃ = [X, 1]`` the projection's input on the calibration tokens (padding excluded) and
``W̃ = [W, b]`` its weight and bias, the kept columns ``S`` (plus the bias column when the layer has
a bias) are refit so that the pruned group reproduces the dense group's output ``Y``:

* ``none`` — the kept columns as they are;
* ``bias`` — bias compensation (FLAP, An et al., AAAI 2024): the removed columns' mean contribution
  ``W_R · E[X_R]`` moves into the bias;
* ``scale`` — Kwon et al.'s mask tuning as published ("A Fast Post-Training Pruning Framework for
  Transformers", NeurIPS 2022, arXiv 2204.09656 v2; code WoosukKwon/retraining-free-pruning,
  ``prune/rescale.py``): one scale per kept head / neuron, ``argmin_s ‖Σ_u s_u X_u W_uᵀ − (Y −
  1bᵀ)‖²``, the bias held (their FFN form; their MHA form adds one constant shared by every output
  dimension and then drops it — not done here). Their solver is LSMR with ``damp=1`` on the normal
  equations for ``s − 1``, i.e. a ridge towards ``s = 1``; here the ridge towards 1 is explicit with
  ``λ = ridge ×`` the mean diagonal of the normal matrix. Their guard is kept: a layer whose scales
  leave ``[−10, 10]`` is not tuned (their code then stops tuning every later layer too; we go on
  with the next layer). They skip the first layer's attention; we do not (no reason is given);
* ``lstsq`` — least-squares reconstruction of the whole kept weight and the bias:
  ``W̃_S = argmin ‖X̃_S W̃_Sᵀ − Y‖² + λ‖W_S − W_S⁰‖²``, a ridge towards the kept columns as they were
  (``W⁰``), with ``λ`` = ``ridge`` × the mean of ``diag(X_SᵀX_S)`` (the bias is not penalised) —
  CORP's ridge form; Kwon et al.'s scales are its special case with the columns of a unit tied.

:mod:`.reconstruct` runs ``scale`` and ``lstsq`` layer after layer in model order with the *pruned*
model's inputs and Kwon et al.'s target (the dense layer output plus the dense residual stream minus
the pruned one, so each layer also makes up for the layers before it); the per-group curves use the
same solves with the dense inputs (:func:`refit`, from the Gram matrix).

Measured on MiniLM (50 % of the attention + MLP parameters, activation importance, uniform, 64
calibration texts, embedding cosine on the 310 test texts; benchmarks/prune_diagnose.py): no
recovery 0.611; ``scale`` 0.585 (every layer's error falls by only 2–32 %: six scales cannot
rebuild what six removed heads wrote); ``lstsq`` 0.806 at ``ridge`` 1 (0.800 at 3, 0.785 at 10,
0.793 at 0.1, 0.748 at 0.01, 0.717 at 0.001 — a weaker ridge fits the calibration texts better and
the others worse; a ridge towards zero was worse still: 0.55 vs 0.80 in an earlier run with 32 texts).
With layer_adaptive allocation the best ridge is lower: 0.835 / 0.884 / 0.874 / 0.849 at 0.1 / 0.3 /
1 / 3; the fixed ``ridge`` stays 1 (one model, one budget; every row measured before 2026-12-06 noon
uses it). Since then the layer-by-layer refit picks each layer's ridge by held-out error
(``ridge_folds``, :mod:`.reconstruct`); the curves' single-group refits keep the fixed ``ridge``.
With layer_adaptive allocation (benchmarks/prune.py, ridge 1, 30 / 50 / 70 %): none 0.848 / 0.719 /
0.536, ``scale`` 0.854 / 0.692 / 0.533, ``lstsq`` 0.926 / 0.874 / 0.795. ``lstsq``'s limit is not the
solver: at 50 % it reaches cosine 0.955 on the 64 calibration texts themselves and 0.880 on the other
246 train texts; with more texts the two meet (uniform: 0.970 / 0.812 with 64, 0.944 / 0.835 with
128, 0.913 on the calibration texts and 0.848 on the test texts with all 310) — refitting only the
output projections tops out near 0.88 at 50 % on this model with 64 texts; with all 310 train texts,
the held-out ridge and the input-side refit it reaches 0.910 (:mod:`.reconstruct` has the table).

A removed branch (no kept column) becomes its mean output under ``bias``, ``scale`` and ``lstsq``.
"""

from __future__ import annotations

import torch

RECOVERIES = ("none", "bias", "lstsq", "scale")
SEQUENTIAL = ("lstsq", "scale")  # refit layer by layer on the pruned model (:mod:`.reconstruct`)
SCALE_LIMIT = 10.0  # Kwon et al.'s code rejects a layer's scales outside [−10, 10]


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


def scale_solve(
    current: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, width: int, ridge: float, bias: bool
) -> torch.Tensor:
    """Kwon et al.'s mask tuning: one scale ``s_u`` per kept unit (its ``width`` contiguous columns of
    ``current`` = ``[W, b]``, ``[d, m]``), the bias kept, ``s = argmin ‖Σ_u s_u X_u W_uᵀ − (Y − 1bᵀ)‖²
    + λ‖s − 1‖²`` from the sums ``gram = X̃ᵀX̃`` and ``cross = X̃ᵀY`` (``λ = ridge ×`` the mean diagonal
    of the normal matrix). Scales outside ``[−SCALE_LIMIT, SCALE_LIMIT]`` (an ill-posed fit) leave the
    layer as it is. Returns the new ``[W, b]`` (``[d, m]``, float64)."""
    v = current.double()
    k = v.shape[1] - int(bias)
    w, g = v[:, :k], gram.double()[:k, :k]
    target = cross.double()[:k] - (
        g.new_zeros(k, v.shape[0]) if not bias else gram.double()[:k, k:] @ v[:, k:].T
    )
    units = k // width
    ata = ((w.T @ w) * g).reshape(units, width, units, width).sum((1, 3))
    atb = (w.T * target).sum(1).reshape(units, width).sum(1)
    lam = max(ridge * float(ata.diagonal().mean()), 1e-12)
    ones = torch.ones(units, dtype=torch.float64)
    s = torch.linalg.lstsq(
        ata + lam * torch.eye(units, dtype=torch.float64), (atb + lam * ones)[:, None]
    ).solution[:, 0]
    if not bool(torch.isfinite(s).all()) or float(s.abs().max()) > SCALE_LIMIT:
        return v
    out = v.clone()
    out[:, :k] = w * s.repeat_interleave(width)[None, :]
    return out


def refit(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gram: torch.Tensor,
    cols: torch.Tensor,
    mode: str,
    ridge: float,
    width: int = 1,
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
    sel = torch.cat([cols, torch.tensor([k])]) if bias is not None else cols
    if (mode == "lstsq" and (len(cols) or bias is not None)) or (mode == "scale" and len(cols)):
        gs, cross = gram[sel][:, sel], gram[sel].double() @ wt.T  # the dense output is the target
        v = (
            ridge_solve(gs, cross, ridge, len(cols) if bias is not None else None)
            if mode == "lstsq"
            else scale_solve(wt[:, sel], gs, cross, width, ridge, bias is not None)
        )
        out_w[:, cols] = v[:, : len(cols)]
        new_b = v[:, -1] if bias is not None else None
    else:
        out_w[:, cols] = w[:, cols]
        shift = w[:, drop] @ mean[drop] if mode == "bias" else torch.zeros_like(b)
        new_b = b + shift if bias is not None else None
    constant = b if mode == "none" else wt @ torch.cat([mean, torch.ones(1, dtype=torch.float64)])
    return out_w, new_b, constant


def projection(weight, bias, gram, cols: torch.Tensor, mode: str, ridge: float, width: int = 1):
    """(weight, bias) of the projection with columns ``cols`` (units of ``width`` columns) kept and
    recovered; with no column kept the weight is zero and the bias is the removed branch's constant
    (given even to a layer without one)."""
    w, b, constant = refit(weight, bias, gram, cols, mode, ridge, width)
    return (w, constant) if len(cols) == 0 else (w, b)
