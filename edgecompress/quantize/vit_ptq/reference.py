"""The fp32 reference scores of the ViT PTQ searches (``scoring: fp32``; the code path of every
version before the bf16 scoring, kept operation for operation so its results are bit-identical).

Every candidate is scored in fp32 with the exact quantizers of
:mod:`~edgecompress.quantize.vit_ptq.fastq`, in candidate chunks of about ``CHUNK_ELEMENTS``
floats per intermediate. Exact algebraic shortcuts (they change the cost, not the value, up to
float rounding; tests compare them with the direct products):

* weight candidates of ``Y = X̂ Wᵀ``: with ``D = Ŵ_c − W``, ``E = (X̂ − X) Wᵀ``, ``H = X̂ᵀX̂ / T``,
  ``mse_o = D_o H D_oᵀ + 2 D_o·(Eᵀ X̂ / T)_o + mean(E_o²)`` — cost ``O·K²`` per candidate instead of
  ``T·O·K`` (used when ``K < T``);
* input candidates: with ``Δ = X̂_c − X`` and ``F`` the error from the other operand,
  ``‖Δ Ŵᵀ + F‖² = tr(Δ ŴᵀŴ Δᵀ) + 2⟨Δ, F Ŵ⟩ + ‖F‖²`` — used when the reduced dimension is the
  smaller one.

These are also the fp32 twins that re-score the survivors of a bf16-scored search
(:mod:`~edgecompress.quantize.vit_ptq.scoring`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from edgecompress.quantize.search import chunked
from edgecompress.quantize.vit_ptq.fastq import fq_uniform

CHUNK_ELEMENTS = 2**20  # floats per candidate-batch intermediate: about the L2 cache; measured fastest
Quant = Callable[..., torch.Tensor]


def chunk_size(per_candidate: int) -> int:
    """Candidates per call so that one intermediate holds about ``CHUNK_ELEMENTS`` floats."""
    return max(1, CHUNK_ELEMENTS // max(per_candidate, 1))


def tensor_mse_score(x: torch.Tensor, bits: int) -> Callable:
    """Per-group MSE of ``x`` [G, N] itself (weight or input pre-search): ``[C, G] → [C, G]``."""

    def score(scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        d = fq_uniform(x, scale[..., None], zp[..., None], bits).sub_(x)  # [C, G, N]
        return d.mul_(d).mean(-1)

    return chunked(score, chunk_size(x.numel()))


def weight_output_score(x_hat: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bits: int) -> Callable:
    """Output MSE per output channel for weight candidates, inputs fixed at ``x_hat`` [T, K]."""
    t, k = x.shape
    if t <= k:
        y = x @ w.T  # [T, O]

        def direct(scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
            wq = fq_uniform(w, scale[..., None], zp[..., None], bits)  # [C, O, K]
            err = (x_hat @ wq.transpose(1, 2)).sub_(y)  # [C, T, O]
            return err.mul_(err).mean(1)  # [C, O]

        return chunked(direct, chunk_size(t * w.shape[0] + w.numel()))
    h = x_hat.T @ x_hat / t  # [K, K]
    e = (x_hat - x) @ w.T  # [T, O]
    g = e.T @ x_hat / t  # [O, K]
    e2 = e.pow(2).mean(0)  # [O]

    def hessian(scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        d = fq_uniform(w, scale[..., None], zp[..., None], bits).sub_(w)  # [C, O, K]
        return (d @ h).add_(g, alpha=2.0).mul_(d).sum(-1).add_(e2)  # [C, O]

    return chunked(hessian, chunk_size(2 * w.numel()))


def act_output_score(x: torch.Tensor, w_hat: torch.Tensor, w: torch.Tensor, quant: Quant) -> Callable:
    """Output MSE (per tensor) for input candidates: ``score(*params [C]) → [C]``.

    ``quant(x, *params)`` gets each param shaped ``[C, 1, 1]`` and returns ``x̂`` [C, T, K].
    """
    t, k = x.shape
    o = w.shape[0]
    f = x @ (w_hat - w).T  # [T, O]: the weight quantizer's share of the error
    gram = k < o
    m, fw = (w_hat.T @ w_hat, f @ w_hat) if gram else (None, None)  # [K, K], [T, K]
    f2 = f.pow(2).sum()

    def score(*params: torch.Tensor) -> torch.Tensor:
        delta = quant(x, *(p.reshape(-1, 1, 1) for p in params)).sub_(x)  # [C, T, K]
        if gram:
            tot = (delta @ m).add_(fw, alpha=2.0).mul_(delta).sum((1, 2)).add_(f2)
        else:
            err = (delta @ w_hat.T).add_(f)  # [C, T, O]
            tot = err.mul_(err).sum((1, 2))
        return tot / (t * o)  # [C]

    return chunked(score, chunk_size(t * max(k, o) * 2))


def _per_head(p: torch.Tensor) -> torch.Tensor:
    """[C, G] → [C, 1, G, 1, 1] against a candidate batch ``[C, B, H, N, D]`` (G = H or 1)."""
    return p[:, None, :, None, None]


def _group_score(x, y_hat, ref, quant: Quant, per_head: bool) -> Callable:
    """Summed squared output error of one group, ``[C, H]`` or ``[C, 1]``."""
    b, h, n, d = x.shape
    m = y_hat.shape[-2]
    f = x @ y_hat.transpose(-2, -1) - ref  # [B, H, N, M]: the other operand's share
    gram = d < m
    g, fy = (y_hat.transpose(-2, -1) @ y_hat, f @ y_hat) if gram else (None, None)  # [B,H,D,D], [B,H,N,D]
    dims = (1, 3, 4) if per_head else (1, 2, 3, 4)  # reduced dims of a [C, B, H, N, ·] batch
    f2 = f.pow(2).sum(tuple(i - 1 for i in dims))  # [H] or []

    def score(*params: torch.Tensor) -> torch.Tensor:
        delta = quant(x, *(_per_head(p) for p in params)).sub_(x)  # [C, B, H, N, D]
        if gram:
            tot = (delta @ g).add_(fy, alpha=2.0).mul_(delta).sum(dims).add_(f2)
        else:
            err = (delta @ y_hat.transpose(-2, -1)).add_(f)
            tot = err.mul_(err).sum(dims)
        return tot if per_head else tot[:, None]

    return chunked(score, chunk_size(b * h * n * max(m, d) * 2))


def left_operand_score(xs: list, ys: list, refs: list, quant: Quant, per_head: bool) -> Callable:
    """Output MSE of ``X̂_c Ŷᵀ`` vs ``ref`` over the groups ``xs``/``ys``/``refs`` (see
    :func:`edgecompress.quantize.vit_ptq.attn.left_operand_score`): ``[C, G] → [C, G]``."""
    parts = [_group_score(xg, yg, rg, quant, per_head) for xg, yg, rg in zip(xs, ys, refs)]
    count = sum(r.numel() // (r.shape[1] if per_head else 1) for r in refs)

    def score(*params: torch.Tensor) -> torch.Tensor:
        tot = parts[0](*params)
        for part in parts[1:]:
            tot = tot + part(*params)
        return tot / count

    return score
