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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IMPORTANCES = ("magnitude", "taylor", "activation", "distortion")


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


def ranking(score: torch.Tensor) -> torch.Tensor:
    """Units by decreasing score (ties: lower index first)."""
    return torch.sort(score.double(), descending=True, stable=True).indices


def kept(order: torch.Tensor, k: int) -> list[int]:
    """The ``k`` most important units, in index order."""
    return sorted(int(u) for u in order[:k])
