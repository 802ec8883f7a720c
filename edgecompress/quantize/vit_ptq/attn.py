"""Searches of the two attention matmuls, ``q @ kᵀ`` and ``softmax @ v``, on ragged calibration data.

AdaLog's protocol (ECCV 2024, official code GoatWu/AdaLog; METHODS.md §1–2): per-head uniform Q,
K, V; one softmax quantizer per tensor; each operand's parameters scored by the MSE of the matmul
*output* against full precision on full-precision inputs, the two operands alternating for
``rounds`` (3) rounds.

Operands come as *groups*: a list of tensors ``[B_g, H, N_g, ·]``, one per distinct sequence length
(:meth:`~edgecompress.calib.Captured.attention_groups` drops padding tokens and
groups samples of equal length); a single tensor is one group. Every error is summed over all
groups and divided by the number of real output entries, so padded positions of text batches
neither count nor cost
(text batches pad every sample to the longest one, often several times its length).

Two choices the paper and code leave open, both exact:

* Fixed-point stop: a round maps the right operand's parameters to (left', right'), and the left
  search does not depend on the previous left parameters, so once a round returns the right
  parameters it started from, every further round repeats it bit for bit; the loop stops there.
* Gram form of the output error where the reduced dimension is the smaller one (see
  :func:`left_operand_score`); it changes the cost, not the value, up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from edgecompress.quantize.search import adalog_q_candidates, fpcs, grid_search, percentile_ranges
from edgecompress.quantize.tan import tanq_alpha_candidates
from edgecompress.quantize.vit_ptq import reference, scoring
from edgecompress.quantize.vit_ptq.fastq import (
    AdaLogCandidates,
    UniformCandidates,
    fq_log,
    fq_tanq,
    fq_uniform,
)
from edgecompress.quantize.vit_ptq.objectives import same_params, self_fpcs
from edgecompress.quantize.vit_ptq.reference import Quant
from edgecompress.quantize.vit_ptq.scoring import exact_of, with_exact

Groups = list[torch.Tensor]


def as_groups(x: torch.Tensor | Groups) -> Groups:
    return [x] if torch.is_tensor(x) else list(x)


def left_operand_score(
    x: torch.Tensor | Groups,
    y_hat: torch.Tensor | Groups,
    ref: torch.Tensor | Groups,
    quant: Quant,
    per_head: bool,
    dtype: torch.dtype = torch.float32,
) -> Callable:
    """Output MSE of ``X̂_c Ŷᵀ`` vs ``ref`` [B, H, N, M] over all groups: ``score(*params [C, G]) → [C, G]``.

    ``quant(x, *params)`` receives params shaped ``[C, 1, G, 1, 1]`` and returns ``[C, B, H, N, D]``.
    ``G = H`` (per-head params, error averaged per head) or ``G = 1`` (per tensor). With
    ``Δ = X̂_c − X`` and ``F = X Ŷᵀ − ref``: ``‖Δ Ŷᵀ + F‖² = tr(Δ ŶᵀŶ Δᵀ) + 2⟨Δ, F Ŷ⟩ + ‖F‖²`` is
    used when ``D < M`` (cost ``N·D²`` instead of ``N·D·M`` per row). ``dtype`` fp32: the reference
    score (:mod:`~edgecompress.quantize.vit_ptq.reference`); bf16: the whitened form with bf16
    products (:mod:`~edgecompress.quantize.vit_ptq.scoring`) carrying the reference as fp32 twin.
    """
    xs, ys, refs = as_groups(x), as_groups(y_hat), as_groups(ref)
    exact = reference.left_operand_score(xs, ys, refs, quant, per_head)
    if dtype == torch.float32:
        return exact
    return with_exact(scoring.left_operand_score(xs, ys, refs, quant, per_head, dtype), exact)


def head_rows(xs: torch.Tensor | Groups) -> torch.Tensor:
    """Every value of each head across groups: ``[H, Σ B·N·D]`` (for percentile ranges)."""
    return torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in as_groups(xs)], dim=1)


def _head_view(p: torch.Tensor) -> torch.Tensor:
    return p.reshape(1, -1, 1, 1)  # [1, H, 1, 1]


def _heads_self(
    xs: torch.Tensor | Groups, bits: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    return self_fpcs(head_rows(xs), bits, dtype=dtype)


def _heads_quant(xs: Groups, s: torch.Tensor, z: torch.Tensor, bits: int) -> Groups:
    return [fq_uniform(x, _head_view(s), _head_view(z), bits) for x in xs]


def _fpcs_operand(
    xs: Groups, y_hats: Groups, refs: Groups, bits: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head uniform FPCS of the left operand ``x`` [B, H, N, D] by output MSE."""
    score = left_operand_score(xs, y_hats, refs, UniformCandidates(bits), per_head=True, dtype=dtype)
    s, z, _ = fpcs(score, percentile_ranges(head_rows(xs)), bits, exact=exact_of(score))
    return s, z


def _t(xs: Groups) -> Groups:
    return [x.transpose(-2, -1) for x in xs]


# --- the softmax quantizer (A of A @ V) ----------------------------------------------------------

SOFTMAX_KINDS = ("adalog", "tanq", "log2", "logsqrt2", "uniform")


def softmax_quant(kind: str, bits: int) -> Quant:
    """``quant(a, param)`` of a 1-parameter softmax quantizer (scale fixed at 1 for AdaLog/TanQ)."""
    one = torch.tensor(1.0)
    if kind == "adalog":
        return AdaLogCandidates(bits, scale=1.0)
    if kind == "tanq":
        return lambda a, alpha: fq_tanq(a, one, alpha, bits)
    k = 1.0 if kind == "log2" else 2.0
    return lambda a, s: fq_log(a, s, bits, k)


def softmax_candidates(kind: str, a: torch.Tensor) -> torch.Tensor:
    """The 1-D candidate set searched for a softmax quantizer (``a``: the probabilities, any shape).

    AdaLog: q ∈ 10..137 (official). TanQ: α grid of :func:`tanq_alpha_candidates`. log2 / log√2:
    16 scales spaced linearly between the 99.9th percentile and the maximum of the probabilities
    (RepQ-ViT picks its log√2 scale among high percentiles; FQ-ViT fixes it at 1, which is in or
    next to this range since softmax rows peak near 1).
    """
    if kind == "adalog":
        return adalog_q_candidates(a.device)
    if kind == "tanq":
        return tanq_alpha_candidates(64).to(a.device)
    r = percentile_ranges(a.reshape(1, -1), lo_q=0.999)
    return torch.linspace(float(r.inner_hi[0]), float(r.outer_hi[0]), 16, device=a.device)


def probs_quantize(a: torch.Tensor, kind: str, params: dict, bits: int) -> torch.Tensor:
    if kind == "uniform":
        return fq_uniform(a, params["scale"], params["zero_point"], bits)
    return softmax_quant(kind, bits)(a, params["param"])


# --- the two searches -----------------------------------------------------------------------------


@dataclass
class MatmulParams:
    """Searched parameters of one attention matmul pair, its output MSE and the rounds it took."""

    left: dict
    right: dict
    mse: float
    ref_power: float
    rounds: int = 0
    seconds: float = 0.0


def _mse_power(outs: Groups, refs: Groups) -> tuple[float, float]:
    n = sum(r.numel() for r in refs)
    err = sum(float((o - r).pow(2).sum()) for o, r in zip(outs, refs))
    return err / n, sum(float(r.pow(2).sum()) for r in refs) / n


def search_qk(
    q: torch.Tensor | Groups,
    k: torch.Tensor | Groups,
    bits: int,
    rounds: int = 3,
    dtype: torch.dtype = torch.float32,
) -> MatmulParams:
    """Per-head uniform Q and K of ``q kᵀ`` ([B, H, N, D] each, or groups of them): self pre-search,
    then up to ``rounds`` × (Q by output MSE, K by output MSE), stopping at a fixed point.
    ``dtype``: precision of the candidate products (bf16: survivors re-scored in fp32)."""
    qs_, ks_ = as_groups(q), as_groups(k)
    refs = [a @ b.transpose(-2, -1) for a, b in zip(qs_, ks_)]  # [B, H, N, M]
    (qs, qz), (ks, kz) = _heads_self(qs_, bits, dtype), _heads_self(ks_, bits, dtype)
    done = 0
    while done < rounds:
        done += 1
        qs, qz = _fpcs_operand(qs_, _heads_quant(ks_, ks, kz, bits), refs, bits, dtype)
        new_ks, new_kz = _fpcs_operand(ks_, _heads_quant(qs_, qs, qz, bits), _t(refs), bits, dtype)
        fixed = same_params((new_ks, new_kz), (ks, kz))
        ks, kz = new_ks, new_kz
        if fixed:
            break
    outs = [
        a @ b.transpose(-2, -1)
        for a, b in zip(_heads_quant(qs_, qs, qz, bits), _heads_quant(ks_, ks, kz, bits))
    ]
    mse, power = _mse_power(outs, refs)
    return MatmulParams({"scale": qs, "zero_point": qz}, {"scale": ks, "zero_point": kz}, mse, power, done)


def _search_probs(
    kind: str, a: Groups, flat: torch.Tensor, v_hat: Groups, refs: Groups, bits: int, dtype: torch.dtype
) -> dict:
    """A's parameter by output MSE; ``flat`` [1, N]: every probability (for ranges and candidates)."""
    ys = _t(v_hat)  # [B, H, D, M]: out = Â (V̂ᵀ)ᵀ
    if kind == "uniform":
        score = left_operand_score(a, ys, refs, UniformCandidates(bits), per_head=False, dtype=dtype)
        s, z, _ = fpcs(score, percentile_ranges(flat), bits, exact=exact_of(score))
        return {"scale": s[0], "zero_point": z[0]}
    score = left_operand_score(a, ys, refs, softmax_quant(kind, bits), per_head=False, dtype=dtype)
    exact = exact_of(score)
    best, _ = grid_search(
        lambda p: score(p[:, None])[:, 0],
        softmax_candidates(kind, flat),
        exact=None if exact is None else lambda p: exact(p[:, None])[:, 0],
    )
    return {"param": best}


def search_probs_v(
    a: torch.Tensor | Groups,
    v: torch.Tensor | Groups,
    a_bits: int,
    v_bits: int,
    kind: str,
    rounds: int = 3,
    dtype: torch.dtype = torch.float32,
) -> MatmulParams:
    """Softmax output ``a`` [B, H, N, M] (per tensor, quantizer ``kind``) and per-head uniform ``v``
    [B, H, M, D] of ``a @ v`` (or groups of them): V self pre-search, then up to ``rounds`` ×
    (A's parameter by the MSE of Â V̂ — AdaLog: q with scale 1; V by FPCS on the same output), as
    the official code alternates, stopping at a fixed point."""
    if kind not in SOFTMAX_KINDS:
        raise ValueError(f"unknown softmax quantizer {kind!r}; expected one of {SOFTMAX_KINDS}")
    as_, vs_ = as_groups(a), as_groups(v)
    refs = [p @ x for p, x in zip(as_, vs_)]  # [B, H, N, D]
    vs, vz = _heads_self(vs_, v_bits, dtype)
    flat = torch.cat([x.reshape(-1) for x in as_])[None]
    a_params: dict = {}
    done = 0
    while done < rounds:
        done += 1
        a_params = _search_probs(kind, as_, flat, _heads_quant(vs_, vs, vz, v_bits), refs, a_bits, dtype)
        a_hat = [probs_quantize(x, kind, a_params, a_bits) for x in as_]
        new_vs, new_vz = _fpcs_operand(_t(vs_), a_hat, _t(refs), v_bits, dtype)
        fixed = same_params((new_vs, new_vz), (vs, vz))
        vs, vz = new_vs, new_vz
        if fixed:
            break
    outs = [
        probs_quantize(x, kind, a_params, a_bits) @ y for x, y in zip(as_, _heads_quant(vs_, vs, vz, v_bits))
    ]
    mse, power = _mse_power(outs, refs)
    return MatmulParams(a_params, {"scale": vs, "zero_point": vz}, mse, power, done)
