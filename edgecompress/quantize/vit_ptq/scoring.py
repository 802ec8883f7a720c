"""Candidate scoring of the ViT PTQ searches: the output error of a batch of candidate quantizers.

Every output-MSE objective of :mod:`~edgecompress.quantize.vit_ptq.objectives` and
:mod:`~edgecompress.quantize.vit_ptq.attn` has one shape: for candidate inputs ``X̂_c`` of a product
``X̂ Aᵀ`` whose other operand and float reference are fixed, with ``Δ_c = X̂_c − X``,

    ‖X̂_c Âᵀ − ref‖² = ‖Δ_c P + B‖² + const

where ``P`` [K, R] and ``B`` [T, R] do not depend on the candidate. Two exact forms (they change
the cost, not the value, up to float rounding; tests compare them with the direct products):

* direct, ``R = O``: ``P = Âᵀ``, ``B = F = X Âᵀ − ref`` (the other operand's share), ``const = 0``;
* whitened Gram, ``R = K`` (used when ``K < O``): with ``M = ÂᵀÂ = L Lᵀ`` and ``Q = F Â L⁻ᵀ``,
  ``‖Δ Âᵀ + F‖² = tr(Δ M Δᵀ) + 2⟨Δ, FÂ⟩ + ‖F‖² = ‖Δ L + Q‖² − ‖Q‖² + ‖F‖²``. ``L = U Λ^½`` from
  the eigendecomposition of ``M`` in float64 (directions with ``λ ≤ 1e-12·λ_max`` are dropped: their
  share of the cross term is ``≤ √λ``-small); ``‖F‖² − ‖Q‖² ≥ 0`` is the part of ``F`` outside ``Â``'s
  row space, so nothing cancels. One product plus one sum of squares per candidate, where the
  expanded Gram form needed three passes more over ``[T, K]``.

``dtype`` is the precision of the candidate products: ``torch.bfloat16``, which this CPU runs on
AMX (measured 3-12× the fp32 rate at these shapes; batched per-head products 3-4× at DeiT-S's
197×64, slower than fp32 at MiniLM's ~40×32, so those attention searches keep the fp32 reference,
:func:`edgecompress.quantize.vit_ptq.ranks.attention_macs`); searches below :data:`BF16_MIN_FLOPS`
multiply-adds per candidate run the fp32 reference too. In bf16 ``Δ_c`` is
computed in fp32 and rounded once (a relative 2⁻⁹ on the *error*, not on ``X``), ``P`` and ``B``
are rounded once (the same perturbation for every candidate), the products accumulate in fp32
inside the kernel and the squares are summed in fp32 — measured relative deviation of a score from
its fp32 value ~1e-4. The searches then re-score their final survivors in fp32
(:data:`RESCORE` per group; :func:`edgecompress.quantize.search.fpcs`), so the chosen parameters
are the fp32 optimum among the survivors.

The data are processed in row tiles of about :data:`TILE_ELEMENTS` floats per candidate
intermediate (cache-sized), several candidates per call when a whole tensor is smaller than that.
On a CPU each tile of a candidate is one compiled pass (quantize, bf16 product, sum of squares;
:mod:`~edgecompress.quantize.vit_ptq.fused`) where the tensors are large enough.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from edgecompress.quantize.search import chunked
from edgecompress.quantize.uniform import levels
from edgecompress.quantize.vit_ptq import fused, sweep
from edgecompress.quantize.vit_ptq.fastq import UniformCandidates, fq_uniform
from edgecompress.quantize.vit_ptq.fused import fusing

TILE_ELEMENTS = 2**19
"""Floats per candidate intermediate of one scoring call (about half this CPU's per-core L2)."""
RESCORE = 8
"""Survivors per group re-scored in fp32 at the end of a bf16-scored search."""
BF16_MIN_FLOPS = 2**22
"""Smallest candidate product (multiply-adds per candidate) scored in bf16 on a CPU; smaller
searches (the tiny test models) run the fp32 reference. Measured on this CPU, one Linear search
round, 1 thread (the bf16 side includes its fp32 re-scoring): 5.0M multiply-adds (T, K, O =
544, 96, 288) 0.45 s vs 0.55 s in fp32; 15M 0.56 vs 1.62 s; 211M (MiniLM's q/k/v) 3.8 vs 10.1 s."""
EIG_RTOL = 1e-12
Quant = Callable[..., torch.Tensor]


def whiten(m: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, Q)`` with ``L Lᵀ = m`` ([..., K, K], PSD) and ``Q = p L⁻ᵀ`` ([..., T, K]), float64.

    ``tr(Δ m Δᵀ) + 2⟨Δ, p⟩ = ‖Δ L + Q‖² − ‖Q‖²`` for any ``Δ`` (see the module docstring).
    """
    evals, evecs = torch.linalg.eigh(m.double())
    keep = evals > evals.amax(-1, keepdim=True).clamp_min(0) * EIG_RTOL
    root = evals.clamp_min(0).sqrt()
    inv = torch.where(keep, 1.0 / torch.where(keep, root, 1.0), 0.0)
    l_fac = evecs * torch.where(keep, root, 0.0).unsqueeze(-2)
    return l_fac, (p.double() @ evecs) * inv.unsqueeze(-2)


def product_form(
    x: torch.Tensor, other: torch.Tensor, ref: torch.Tensor, sum_dims: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(P, B, const)`` of the module docstring for ``X Âᵀ`` with ``x`` [..., T, K], ``other`` =
    ``Â`` [..., O, K] and ``ref`` [..., T, O]; ``const`` summed over ``sum_dims`` of ``[..., T, O]``."""
    f = x @ other.transpose(-2, -1) - ref  # [..., T, O]
    k, o = x.shape[-1], other.shape[-2]
    if k >= o:
        return other.transpose(-2, -1), f, torch.zeros((), dtype=torch.float64, device=x.device)
    l_fac, q = whiten(other.transpose(-2, -1) @ other, f @ other)
    const = f.double().pow(2).sum(sum_dims) - q.pow(2).sum(sum_dims)
    return l_fac.to(x.dtype), q.to(x.dtype), const


def squared_error(d: torch.Tensor, p: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ_r (d P + B)²`` over the last dim, in fp32: ``d`` [c, ..., T, K] (scoring dtype)."""
    e = torch.matmul(d, p).add_(b)
    e = e.float() if e.dtype != torch.float32 else e
    return e.pow_(2).sum(-1)


def candidate_delta(quant: Quant, x: torch.Tensor, prep: tuple, params, dtype: torch.dtype) -> torch.Tensor:
    """``x̂ − x`` for a batch of candidates, in ``dtype``: the candidate family's fast ``delta``
    (:mod:`~edgecompress.quantize.vit_ptq.fastq`) for a bf16 score, ``quant(x) − x`` in fp32."""
    if dtype != torch.float32 and hasattr(quant, "delta"):
        return quant.delta(x, prep, *params, dtype=dtype)
    d = quant(x, *params).sub_(x)
    return d if d.dtype == dtype else d.to(dtype)


def candidate_error(
    quant: Quant, x: torch.Tensor, prep: tuple, params: tuple, p: torch.Tensor, b: torch.Tensor, dtype
) -> torch.Tensor:
    """``Σ_r (Δ_c P + B)²`` over the last dim (fp32) for the candidates ``params`` (each ``[c, ...]``):
    ``[c, ..., T]``. On a CPU in bf16, one compiled pass per candidate where the family has one
    (:mod:`~edgecompress.quantize.vit_ptq.fused`); else :func:`candidate_delta` and :func:`squared_error`."""
    if dtype == torch.bfloat16 and fusing(x) and hasattr(quant, "fused_error"):
        parts = [quant.fused_error(x, prep, *(v[i] for v in params), p, b) for i in range(len(params[0]))]
        return parts[0][None] if len(parts) == 1 else torch.stack(parts)
    return squared_error(candidate_delta(quant, x, prep, params, dtype), p, b)


def prepare(quant: Quant, x: torch.Tensor) -> tuple:
    """The family's per-element precomputation of ``x`` (sliced along with ``x``), or ``()``."""
    return quant.prepare(x) if hasattr(quant, "prepare") else ()


def rows_of(prep: tuple, r: slice) -> tuple:
    return tuple(t[r] for t in prep)


def tiles(n: int, per_row: int) -> Iterator[slice]:
    """Slices of ``range(n)`` holding about :data:`TILE_ELEMENTS` floats each (``per_row`` per row)."""
    step = max(1, TILE_ELEMENTS // max(per_row, 1))
    for i in range(0, n, step):
        yield slice(i, min(n, i + step))


def candidates_per_call(per_candidate: int) -> int:
    """Candidates scored per call so that one intermediate holds about :data:`TILE_ELEMENTS` floats."""
    return max(1, TILE_ELEMENTS // max(per_candidate, 1))


def unit_dtype(scoring: str, macs: float, device: torch.device) -> torch.dtype:
    """The candidate-product precision of one unit's searches: ``scoring: fp32`` → fp32; ``bf16`` →
    bf16 where a candidate's product has at least :data:`BF16_MIN_FLOPS` multiply-adds (always on
    a GPU), else fp32."""
    if scoring == "fp32" or (device.type == "cpu" and macs < BF16_MIN_FLOPS):
        return torch.float32
    return torch.bfloat16


def with_exact(fast: Callable, exact: Callable) -> Callable:
    """``fast`` carrying its fp32 twin ``exact`` as an attribute (read by :func:`exact_of`)."""
    fast.exact = exact
    return fast


def exact_of(score: Callable) -> Callable | None:
    """The fp32 twin of a bf16 score (None for an fp32 score or a plain callable)."""
    return getattr(score, "exact", None)


# --- the bf16 scores (Linear: objectives.py; attention: attn.py) ---------------------------------


def weight_score(
    x_hat: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bits: int, dtype: torch.dtype
) -> Callable:
    """Per-output-channel output MSE of weight candidates (see ``objectives.weight_output_score``).

    ``T ≤ K``: ``‖X̂ D_cᵀ + E‖²`` with ``D_c = Ŵ_c − W``, ``E = (X̂ − X) Wᵀ``; else the Hessian form
    ``D H Dᵀ + 2 D·G + mean(E²)`` with only ``D H`` in ``dtype`` (cost ``O·K²``; the rest is ``O·K``).
    """
    t, k = x.shape
    e = (x_hat - x) @ w.T  # [T, O]
    if t <= k:
        xt, et, quant = x_hat.T.to(dtype), e.T.to(dtype), UniformCandidates(bits)

        def direct(scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
            return (
                candidate_error(quant, w, (), (scale[..., None], zp[..., None]), xt, et, dtype) / t
            )  # [C, O]

        return chunked(direct, candidates_per_call(t * w.shape[0] + w.numel()))
    h, g, e2 = (x_hat.T @ x_hat / t).to(dtype), e.T @ x_hat / t, e.pow(2).mean(0)  # [K, K], [O, K], [O]

    top = levels(bits) - 1

    def hessian(scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        if dtype == torch.bfloat16 and fusing(w):  # one compiled pass per candidate
            s_, z_ = scale[..., None], zp[..., None]
            return torch.stack([fused.hessian_error(w, s, -z, top - z, h, g, e2) for s, z in zip(s_, z_)])
        d = fq_uniform(w, scale[..., None], zp[..., None], bits).sub_(w)  # [C, O, K]
        return torch.matmul(d.to(dtype), h).float().add_(g, alpha=2.0).mul_(d).sum(-1).add_(e2)

    return chunked(hessian, candidates_per_call(2 * w.numel()))


def act_score(
    x: torch.Tensor, w_hat: torch.Tensor, w: torch.Tensor, quant: Quant, dtype: torch.dtype
) -> Callable:
    """Per-tensor output MSE of input candidates (see ``objectives.act_output_score``), in row tiles."""
    t, k = x.shape
    p, b, const = product_form(x, w_hat, x @ w.T, (0, 1))
    p, b = p.to(dtype), b.to(dtype)
    rows, prep, n = list(tiles(t, k + p.shape[1])), prepare(quant, x), t * w.shape[0]

    def score(*params: torch.Tensor) -> torch.Tensor:
        ps = tuple(v.reshape(-1, 1, 1) for v in params)
        tot = sum(candidate_error(quant, x[r], rows_of(prep, r), ps, p, b[r], dtype).sum(1) for r in rows)
        return ((tot.double() + const) / n).float()  # [C]

    dense = chunked(score, candidates_per_call(rows[0].stop * max(k, p.shape[1])))
    return (
        sweep.SweepScore(quant, x, prep, p, b, const, n, dense)
        if sweep.applies(quant, x, p, dtype)
        else dense
    )


def _per_head(p: torch.Tensor) -> torch.Tensor:
    return p[:, None, :, None, None]  # [C, G] → [C, 1, G, 1, 1] against [C, B, H, N, D]


def _group_score(x, y_hat, ref, quant: Quant, per_head: bool, dtype: torch.dtype, stack: bool) -> Callable:
    """Summed squared output error of one attention group, ``[C, H]`` or ``[C, 1]`` (float64).
    ``stack``: the candidates of a call share each product (:func:`stacks`)."""
    b, h, n, d = x.shape
    dims = (0, 2, 3) if per_head else (0, 1, 2, 3)  # reduced dims of a [B, H, N, ·] error
    p, q, const = product_form(x, y_hat, ref, dims)  # [B, H, D, R], [B, H, N, R], [H] or []
    p, q = p.to(dtype), q.to(dtype)
    per_sample, prep = h * n * (d + p.shape[-1]), prepare(quant, x)

    def score(*params: torch.Tensor) -> torch.Tensor:
        c, tot = params[0].shape[0], 0.0
        if stack:  # [C, G] → [1, G, C, 1, 1] against [b, H, C, N, D]; errors [b, H, C, N] → [C, b, H, N]
            ps = tuple(v.T.reshape(1, -1, c, 1, 1) for v in params)
            errs = (
                quant.stacked_error(x[s], rows_of(prep, s), *ps, p[s], q[s]).permute(2, 0, 1, 3)
                for s in tiles(b, per_sample * c)
            )
        else:
            ps = tuple(_per_head(v) for v in params)
            errs = (
                candidate_error(quant, x[s], rows_of(prep, s), ps, p[s], q[s], dtype)
                for s in tiles(b, per_sample)
            )
        for err in errs:
            tot = tot + (err.sum((1, 3)) if per_head else err.sum((1, 2, 3))[:, None])  # [C, b, H, N] →
        return tot.double() + const

    return score


STACK = 8
"""Candidates per product of the attention searches where :func:`stacks` holds (measured on this
CPU, 1 thread: 8 candidates' ``Δ`` stacked along the rows, 1.8× the product rate of 8 separate
batched products at DeiT-S's ``[64, 197]·[197, 197]``, 1.4× at ``[197, 64]·[64, 64]``)."""


def stacks(quant: Quant, xs: list, dtype: torch.dtype) -> bool:
    """Whether the attention scores stack :data:`STACK` candidates per product: bf16 on a CPU where
    the fused kernels run and the family has a stacked form (uniform; AdaLog's table is one per
    candidate)."""
    return dtype == torch.bfloat16 and all(fusing(x) for x in xs) and hasattr(quant, "stacked_error")


def left_operand_score(
    xs: list, ys: list, refs: list, quant: Quant, per_head: bool, dtype: torch.dtype
) -> Callable:
    """Output MSE of ``X̂_c Ŷᵀ`` vs ``ref`` over attention groups (see ``attn.left_operand_score``)."""
    stack = stacks(quant, xs, dtype)
    parts = [_group_score(xg, yg, rg, quant, per_head, dtype, stack) for xg, yg, rg in zip(xs, ys, refs)]
    count = sum(r.numel() // (r.shape[1] if per_head else 1) for r in refs)

    def score(*params: torch.Tensor) -> torch.Tensor:
        return (sum(part(*params) for part in parts) / count).float()

    return chunked(score, STACK if stack else candidates_per_call(max(x.numel() for x in xs)))
