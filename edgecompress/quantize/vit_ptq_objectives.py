"""Batched layer-output objectives and the per-layer search protocols of the ViT PTQ passes.

Pure tensor functions (no modules): given the cached full-precision inputs of one layer they
return its quantizer parameters. They follow AdaLog's calibration (ECCV 2024, official code
GoatWu/AdaLog; METHODS.md §1–2): every objective is the MSE of the *layer output* against full
precision on full-precision inputs; per Linear a weight-only pre-search (weight MSE) and an
activation pre-search (input MSE), then ``rounds`` (3) rounds of (weight FPCS, activation search)
scored by output MSE; q@kᵀ and A@V alternate their two operands' searches for 3 rounds.

Exact algebraic shortcuts keep the candidate batches affordable on a CPU (they change the cost,
not the value, up to float rounding; tests compare them with the direct products):

* weight candidates of ``Y = X̂ Wᵀ``: with ``D = Ŵ_c − W``, ``E = (X̂ − X) Wᵀ``, ``H = X̂ᵀX̂ / T``,
  ``mse_o = D_o H D_oᵀ + 2 D_o·(Eᵀ X̂ / T)_o + mean(E_o²)`` — cost ``O·K²`` per candidate instead of
  ``T·O·K`` (used when ``K < T``);
* activation candidates (and either operand of a matmul): with ``Δ = X̂_c − X`` and ``F`` the error
  from the other operand, ``‖Δ Ŵᵀ + F‖² = tr(Δ ŴᵀŴ Δᵀ) + 2⟨Δ, F Ŵ⟩ + ‖F‖²`` — used when the
  reduced dimension is the smaller one.

Candidates are evaluated in chunks bounded by ``CHUNK_ELEMENTS`` floats per intermediate, with
the allocation-light quantizers of :mod:`~edgecompress.quantize.vit_ptq_fastq`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from edgecompress.quantize.log import fake_quant_adalog
from edgecompress.quantize.search import (
    adalog_joint_search,
    adalog_q_candidates,
    chunked,
    fpcs,
    grid_search,
    percentile_ranges,
)
from edgecompress.quantize.tan import tanq_alpha_candidates
from edgecompress.quantize.vit_ptq_fastq import fq_adalog, fq_log, fq_tanq, fq_uniform

CHUNK_ELEMENTS = 2**20  # floats per candidate-batch intermediate: about the L2 cache; measured fastest
Quant = Callable[..., torch.Tensor]


def _chunk(per_candidate: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(per_candidate, 1))


def tensor_mse_score(x: torch.Tensor, bits: int) -> Callable:
    """Per-group MSE of ``x`` [G, N] itself (weight or input pre-search): ``[C, G] → [C, G]``."""

    def score(scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        d = fq_uniform(x, scale[..., None], zp[..., None], bits).sub_(x)  # [C, G, N]
        return d.mul_(d).mean(-1)

    return chunked(score, _chunk(x.numel()))


def self_fpcs(x: torch.Tensor, bits: int, free_zero_point: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """FPCS of each row of ``x`` [G, N] on its own MSE: ``(scale [G], zero_point [G])``."""
    s, z, _ = fpcs(tensor_mse_score(x, bits), percentile_ranges(x), bits, free_zero_point=free_zero_point)
    return s, z


# --- Linear: Y = X Wᵀ (+ b, which cancels in every error) ------------------------------------------


def weight_output_score(x_hat: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bits: int) -> Callable:
    """Output MSE per output channel for weight candidates, inputs fixed at ``x_hat`` [T, K]."""
    t, k = x.shape
    if t <= k:
        y = x @ w.T  # [T, O]

        def direct(scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
            wq = fq_uniform(w, scale[..., None], zp[..., None], bits)  # [C, O, K]
            err = (x_hat @ wq.transpose(1, 2)).sub_(y)  # [C, T, O]
            return err.mul_(err).mean(1)  # [C, O]

        return chunked(direct, _chunk(t * w.shape[0] + w.numel()))
    h = x_hat.T @ x_hat / t  # [K, K]
    e = (x_hat - x) @ w.T  # [T, O]
    g = e.T @ x_hat / t  # [O, K]
    e2 = e.pow(2).mean(0)  # [O]

    def hessian(scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        d = fq_uniform(w, scale[..., None], zp[..., None], bits).sub_(w)  # [C, O, K]
        return (d @ h).add_(g, alpha=2.0).mul_(d).sum(-1).add_(e2)  # [C, O]

    return chunked(hessian, _chunk(2 * w.numel()))


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

    return chunked(score, _chunk(t * max(k, o) * 2))


@dataclass
class LinearParams:
    """Searched parameters of one Linear: weight (scale, zp) [O], input params, output MSE."""

    w_scale: torch.Tensor
    w_zp: torch.Tensor
    act: dict  # uniform: {"scale", "zero_point"}; adalog: {"scale", "q", "shift"}
    mse: float
    ref_power: float  # mean(Y²) of the float output, for SQNR


def _uniform_act(a_bits: int) -> Quant:
    return lambda x, s, z: fq_uniform(x, s, z, a_bits)


def _adalog_act(a_bits: int, shift: float) -> Quant:
    return lambda x, s, q: fq_adalog(x + shift, s, q, a_bits).sub_(shift)


def act_quantize(x: torch.Tensor, act: dict, a_bits: int) -> torch.Tensor:
    """Dequantized input under ``act`` params (in the unshifted domain)."""
    if "q" in act:
        return fake_quant_adalog(x + act["shift"], act["scale"], act["q"], a_bits) - act["shift"]
    return fq_uniform(x, act["scale"], act["zero_point"], a_bits)


def _search_act(x, w_hat, w, a_bits, act: dict, ranges) -> dict:
    if "q" in act:
        quant = _adalog_act(a_bits, act["shift"])
        score = act_output_score(x, w_hat, w, quant)
        s, q, _ = adalog_joint_search(score, ranges[0], ranges[1], act["scale"])
        return {"scale": s, "q": q, "shift": act["shift"]}
    score = act_output_score(x, w_hat, w, _uniform_act(a_bits))
    s, z, _ = fpcs(lambda s_, z_: score(s_, z_)[:, None], ranges, a_bits)
    return {"scale": s[0], "zero_point": z[0]}


def search_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    w_bits: int,
    a_bits: int,
    rounds: int = 3,
    post_gelu_shift: float | None = None,
) -> LinearParams:
    """AdaLog's per-Linear protocol on float inputs ``x`` [T, K] and weight ``w`` [O, K].

    ``post_gelu_shift=None``: uniform per-tensor input. Otherwise an AdaLog input quantizer on
    ``x + shift`` with the joint (q, scale) search; its start scale is the second-to-last of 128
    points between the 90th and 100th percentile of the positive shifted inputs (official code).
    """
    ws, wz = self_fpcs(w, w_bits)
    if post_gelu_shift is None:
        ranges = percentile_ranges(x.reshape(1, -1))
        s, z = self_fpcs(x.reshape(1, -1), a_bits)
        act = {"scale": s[0], "zero_point": z[0]}
    else:
        pos = percentile_ranges(x[x > 0].reshape(1, -1))
        lo, hi = pos.inner_hi[0] + post_gelu_shift, pos.outer_hi[0] + post_gelu_shift
        ranges = (lo, hi)
        act = {"scale": lo + (hi - lo) * 126 / 127, "q": torch.tensor(37.0), "shift": post_gelu_shift}
    w_ranges = percentile_ranges(w)
    for _ in range(rounds):
        x_hat = act_quantize(x, act, a_bits)
        ws, wz, _ = fpcs(weight_output_score(x_hat, x, w, w_bits), w_ranges, w_bits)
        w_hat = fq_uniform(w, ws[:, None], wz[:, None], w_bits)
        act = _search_act(x, w_hat, w, a_bits, act, ranges)
    y = x @ w.T
    y_hat = act_quantize(x, act, a_bits) @ fq_uniform(w, ws[:, None], wz[:, None], w_bits).T
    return LinearParams(ws, wz, act, float((y_hat - y).pow(2).mean()), float(y.pow(2).mean()))


def channel_act_search(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-input-channel (scale, zp) [K] of a post-LN input ``x`` [T, K] by input MSE (free zp)."""
    return self_fpcs(x.T.contiguous(), bits, free_zero_point=True)


# --- matmuls: out = X Yᵀ on [B, H, N, D] × [B, H, M, D] --------------------------------------------


def _per_head(p: torch.Tensor) -> torch.Tensor:
    """[C, G] → [C, 1, G, 1, 1] against a candidate batch ``[C, B, H, N, D]`` (G = H or 1)."""
    return p[:, None, :, None, None]


def left_operand_score(
    x: torch.Tensor, y_hat: torch.Tensor, ref: torch.Tensor, quant: Quant, per_head: bool
) -> Callable:
    """Output MSE of ``X̂_c Ŷᵀ`` vs ``ref`` [B, H, N, M]: ``score(*params [C, G]) → [C, G]``.

    ``quant(x, *params)`` receives params shaped ``[C, 1, G, 1, 1]`` and returns ``[C, B, H, N, D]``. ``G = H``
    (per-head params, error averaged per head) or ``G = 1`` (per tensor).
    """
    b, h, n, d = x.shape
    m = y_hat.shape[-2]
    f = x @ y_hat.transpose(-2, -1) - ref  # [B, H, N, M]: the other operand's share
    gram = d < m
    g, fy = (y_hat.transpose(-2, -1) @ y_hat, f @ y_hat) if gram else (None, None)  # [B,H,D,D], [B,H,N,D]
    dims = (1, 3, 4) if per_head else (1, 2, 3, 4)  # reduced dims of a [C, B, H, N, ·] batch
    f2 = f.pow(2).sum(tuple(i - 1 for i in dims))  # [H] or []
    count = b * n * m * (1 if per_head else h)

    def score(*params: torch.Tensor) -> torch.Tensor:
        delta = quant(x, *(_per_head(p) for p in params)).sub_(x)  # [C, B, H, N, D]
        if gram:
            tot = (delta @ g).add_(fy, alpha=2.0).mul_(delta).sum(dims).add_(f2)
        else:
            err = (delta @ y_hat.transpose(-2, -1)).add_(f)
            tot = err.mul_(err).sum(dims)
        tot = tot / count
        return tot if per_head else tot[:, None]  # [C, G]

    return chunked(score, _chunk(b * h * n * max(m, d) * 2))


def _fpcs_operand(x, y_hat, ref, bits) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head uniform FPCS of the left operand ``x`` [B, H, N, D] by output MSE."""
    score = left_operand_score(x, y_hat, ref, lambda t, s, z: fq_uniform(t, s, z, bits), per_head=True)
    ranges = percentile_ranges(x.transpose(0, 1).reshape(x.shape[1], -1))
    s, z, _ = fpcs(score, ranges, bits)
    return s, z


def _head_view(p: torch.Tensor) -> torch.Tensor:
    return p.reshape(1, -1, 1, 1)  # [1, H, 1, 1]


def _heads_self(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    return self_fpcs(x.transpose(0, 1).reshape(x.shape[1], -1), bits)


@dataclass
class MatmulParams:
    """Searched parameters of one attention matmul pair and its output MSE."""

    left: dict
    right: dict
    mse: float
    ref_power: float


def search_qk(q: torch.Tensor, k: torch.Tensor, bits: int, rounds: int = 3) -> MatmulParams:
    """Per-head uniform Q and K of ``q kᵀ`` ([B, H, N, D] each): self pre-search, then ``rounds`` ×
    (Q by output MSE, K by output MSE)."""
    ref = q @ k.transpose(-2, -1)  # [B, H, N, M]
    (qs, qz), (ks, kz) = _heads_self(q, bits), _heads_self(k, bits)
    for _ in range(rounds):
        k_hat = fq_uniform(k, _head_view(ks), _head_view(kz), bits)
        qs, qz = _fpcs_operand(q, k_hat, ref, bits)
        q_hat = fq_uniform(q, _head_view(qs), _head_view(qz), bits)
        ks, kz = _fpcs_operand(k, q_hat, ref.transpose(-2, -1), bits)
    out = fq_uniform(q, _head_view(qs), _head_view(qz), bits) @ fq_uniform(
        k, _head_view(ks), _head_view(kz), bits
    ).transpose(-2, -1)
    return MatmulParams(
        {"scale": qs, "zero_point": qz},
        {"scale": ks, "zero_point": kz},
        float((out - ref).pow(2).mean()),
        float(ref.pow(2).mean()),
    )


# --- post-softmax probabilities A and V of A @ V -----------------------------------------------------

SOFTMAX_KINDS = ("adalog", "tanq", "log2", "logsqrt2", "uniform")


def _softmax_quant(kind: str, bits: int) -> Quant:
    """``quant(a, param)`` of a 1-parameter softmax quantizer (scale fixed at 1 for AdaLog/TanQ)."""
    one = torch.tensor(1.0)
    if kind == "adalog":
        return lambda a, q: fq_adalog(a, one, q, bits)
    if kind == "tanq":
        return lambda a, alpha: fq_tanq(a, one, alpha, bits)
    k = 1.0 if kind == "log2" else 2.0
    return lambda a, s: fq_log(a, s, bits, k)


def softmax_candidates(kind: str, a: torch.Tensor) -> torch.Tensor:
    """The 1-D candidate set searched for a softmax quantizer.

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


def _search_probs(kind, a, v_hat, ref, bits) -> dict:
    y = v_hat.transpose(-2, -1)  # [B, H, D, M]: out = Â (V̂ᵀ)ᵀ
    if kind == "uniform":
        score = left_operand_score(a, y, ref, lambda t, s, z: fq_uniform(t, s, z, bits), per_head=False)
        s, z, _ = fpcs(score, percentile_ranges(a.reshape(1, -1)), bits)
        return {"scale": s[0], "zero_point": z[0]}
    score = left_operand_score(a, y, ref, _softmax_quant(kind, bits), per_head=False)
    best, _ = grid_search(lambda p: score(p[:, None])[:, 0], softmax_candidates(kind, a))
    return {"param": best}


def probs_quantize(a: torch.Tensor, kind: str, params: dict, bits: int) -> torch.Tensor:
    if kind == "uniform":
        return fq_uniform(a, params["scale"], params["zero_point"], bits)
    return _softmax_quant(kind, bits)(a, params["param"])


def search_probs_v(
    a: torch.Tensor, v: torch.Tensor, a_bits: int, v_bits: int, kind: str, rounds: int = 3
) -> MatmulParams:
    """Softmax output ``a`` [B, H, N, M] (per tensor, quantizer ``kind``) and per-head uniform ``v``
    [B, H, M, D] of ``a @ v``: V self pre-search, then ``rounds`` × (A's parameter by the MSE of
    Â V̂ — AdaLog: q with scale 1; V by FPCS on the same output), as the official code alternates."""
    if kind not in SOFTMAX_KINDS:
        raise ValueError(f"unknown softmax quantizer {kind!r}; expected one of {SOFTMAX_KINDS}")
    ref = a @ v  # [B, H, N, D]
    vs, vz = _heads_self(v, v_bits)
    a_params: dict = {}
    for _ in range(rounds):
        v_hat = fq_uniform(v, _head_view(vs), _head_view(vz), v_bits)
        a_params = _search_probs(kind, a, v_hat, ref, a_bits)
        a_hat = probs_quantize(a, kind, a_params, a_bits)
        vs, vz = _fpcs_operand(v.transpose(-2, -1), a_hat, ref.transpose(-2, -1), v_bits)
    out = probs_quantize(a, kind, a_params, a_bits) @ fq_uniform(v, _head_view(vs), _head_view(vz), v_bits)
    mse = float((out - ref).pow(2).mean())
    return MatmulParams(a_params, {"scale": vs, "zero_point": vz}, mse, float(ref.pow(2).mean()))
