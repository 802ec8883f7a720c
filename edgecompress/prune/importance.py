"""Unit importance scores: pure functions on tensors, one per ``importance`` field value.

Every score is ``[units]`` (higher = more important); the units a group keeps are its top scores
(:func:`ranking`). ``W`` is the group's output projection (``[d_out, K]``, unit ``u`` owning columns
``[u·w, (u+1)·w)``), ``X`` its input on the calibration tokens (padding excluded) and ``G = XᵀX``.

* ``magnitude`` — the L2 norm of every weight the unit owns in the coupled group (rows of q/k/v or
  fc1/up, columns of the output projection, biases): Torch-Pruning's group magnitude (p = 2) with
  the tensors' squares summed.
* ``taylor`` — first-order Taylor (Molchanov et al., CVPR 2019, "Importance Estimation for Neural
  Network Pruning"): per calibration batch the loss change of removing the unit to first order,
  ``s_u = Σ_{o, c∈u} W[o, c] · ∂L/∂W[o, c]`` (= the gradient of a multiplicative gate on the
  unit's output, the quantity Kwon et al. 2022 build their Fisher mask on), squared and averaged over
  batches. The loss is the task loss where the calibration data has labels, else ½·mean(y²) of the
  model output (LPViT's label-free choice); :mod:`.calibrate` accumulates it.
* ``activation`` — activation-aware ``|W|·‖X‖`` (the structured form of Wanda, Sun et al. 2023):
  ``Σ_{c∈u} ‖W[:, c]‖₁ · ‖X[:, c]‖₂``.
* ``distortion`` — the output distortion of removing the unit alone, measured on the calibration
  data at the group's output (exact, from the Gram matrix): ``‖X_u W_uᵀ‖²_F = tr(W_u G_uu W_uᵀ)``.
* ``obs`` — the removal order of greedy structured Optimal Brain Surgeon (Hassibi & Stork 1993;
  the structured form of ZipLM, Kurtic et al., NeurIPS 2023, arXiv 2302.04089 v2): repeatedly remove
  the unit whose removal, *with the kept columns and the bias refit*, raises the group's output
  error least, ``tr(W_u (H⁻¹_uu)⁻¹ W_uᵀ)``, then update ``W`` and ``H⁻¹``. ``H = X̃ᵀX̃ + λ·diag(r)``
  (``r`` = 1 except the bias) makes each step the exact greedy step of the objective ``recovery:
  lstsq`` minimises with the dense inputs (``‖X̃(V − W̃)‖² + λ‖V_w − W‖²`` with the removed columns
  of ``V`` zero; same ``λ = ridge ×`` mean diagonal). Units are removed ``max(1, units // 256)`` at
  a time (ZipLM removes one at a time; chunks bound the cost on wide MLPs); the score is the
  removal rank (kept units = removed last), so every kept count gets a nested set. Measured on
  MiniLM (64 calibration texts, ``lstsq``, layer_adaptive; benchmarks/prune.py): embedding cosine
  0.917 / 0.866 / 0.782 at 30 / 50 / 70 % vs ``activation``'s 0.926 / 0.874 / 0.795 — choosing the
  units that the calibration texts are best refit without fits those few texts, not the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IMPORTANCES = ("magnitude", "taylor", "activation", "distortion", "obs")


def per_unit(values: torch.Tensor, units: int, width: int) -> torch.Tensor:
    """``[units]``: sums of ``values`` (``[units·width]``) over each unit's contiguous columns."""
    return values.reshape(units, width).sum(1)


def magnitude(views: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm over every ``[units, m]`` view of the tensors the units own."""
    return torch.sqrt(sum(v.double().pow(2).sum(1) for v in views))


def taylor_batch(weight: torch.Tensor, grad: torch.Tensor, units: int, width: int) -> torch.Tensor:
    """One batch's first-order loss change of removing each unit: ``Σ_{o, c∈u} W·∂L/∂W``."""
    return per_unit((weight.double() * grad.double()).sum(0), units, width)


def activation(weight: torch.Tensor, x_norm: torch.Tensor, units: int, width: int) -> torch.Tensor:
    """``Σ_{c∈u} ‖W[:, c]‖₁ · ‖X[:, c]‖₂``; ``x_norm`` is ``‖X[:, c]‖₂`` (``[K]``)."""
    return per_unit(weight.double().abs().sum(0) * x_norm.double(), units, width)


def distortion(weight: torch.Tensor, gram: torch.Tensor, units: int, width: int) -> torch.Tensor:
    """``tr(W_u G_uu W_uᵀ)``: the squared error the group's output takes when unit ``u`` alone goes."""
    w = weight.double().reshape(weight.shape[0], units, width).transpose(0, 1)  # [units, d_out, width]
    g = gram.double().reshape(units, width, units, width)
    blocks = g.diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [units, width, width]: G_uu
    return torch.einsum("uoi,uij,uoj->u", w, blocks, w)


def _inverse(h: torch.Tensor) -> torch.Tensor:
    try:
        return torch.cholesky_inverse(torch.linalg.cholesky(h))
    except RuntimeError:  # not positive definite (no ridge, rank-deficient inputs): pseudo-inverse
        return torch.linalg.pinv(h, hermitian=True)


def obs(
    weight: torch.Tensor, bias: torch.Tensor | None, gram: torch.Tensor, units: int, width: int, ridge: float
) -> torch.Tensor:
    """Greedy structured-OBS removal rank per unit (higher = removed later); ``gram`` is ``X̃ᵀX̃``
    (``[K+1, K+1]``, the constant last; it is dropped for a layer without bias)."""
    k = units * width
    g = gram.double() if bias is not None else gram.double()[:k, :k]
    reg = torch.ones(g.shape[0], dtype=torch.float64)
    reg[k:] = 0.0
    h_inv = _inverse(g + torch.diag(reg * max(ridge * float(g.diagonal()[:k].mean()), 1e-12)))
    w = weight.double() if bias is None else torch.cat([weight.double(), bias.double()[:, None]], 1)
    alive, score, rank = torch.ones(units, dtype=torch.bool), torch.zeros(units, dtype=torch.float64), 0
    chunk = max(1, units // 256)
    while int(alive.sum()) > 1:
        idx = alive.nonzero().flatten()
        cols = (idx[:, None] * width + torch.arange(width)).flatten()
        blocks = (
            h_inv[cols][:, cols]
            .reshape(len(idx), width, len(idx), width)
            .diagonal(dim1=0, dim2=2)
            .permute(2, 0, 1)
        )
        wu = w[:, cols].reshape(w.shape[0], len(idx), width).transpose(0, 1)  # [n, d, width]
        cost = torch.einsum("ndi,nij,ndj->n", wu, torch.linalg.pinv(blocks, hermitian=True), wu)
        chosen = idx[torch.argsort(cost, stable=True)[: min(chunk, len(idx) - 1)]]
        q = (chosen[:, None] * width + torch.arange(width)).flatten()
        step = torch.linalg.pinv(h_inv[q][:, q], hermitian=True) @ h_inv[q]  # [|q|, m]
        w = w - w[:, q] @ step
        h_inv = h_inv - h_inv[:, q] @ step
        w[:, q] = 0.0
        score[chosen] = rank + torch.arange(len(chosen), dtype=torch.float64)
        rank += len(chosen)
        alive[chosen] = False
    score[alive] = rank
    return score


def ranking(score: torch.Tensor) -> torch.Tensor:
    """Units by decreasing score (ties: lower index first)."""
    return torch.sort(score.double(), descending=True, stable=True).indices


def kept(order: torch.Tensor, k: int) -> list[int]:
    """The ``k`` most important units, in index order."""
    return sorted(int(u) for u in order[:k])
