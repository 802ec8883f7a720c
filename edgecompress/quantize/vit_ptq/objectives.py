"""Batched layer-output objectives and the per-layer search protocols of the ViT PTQ passes.

Pure tensor functions (no modules): given the cached full-precision inputs of one layer they
return its quantizer parameters. They follow AdaLog's calibration (ECCV 2024, official code
GoatWu/AdaLog; METHODS.md §1–2): every objective is the MSE of the *layer output* against full
precision on full-precision inputs; per Linear an activation pre-search (input MSE), then
``rounds`` (3) rounds of (weight FPCS, activation search) scored by output MSE. (The official code
also runs a weight-only pre-search; its result is overwritten by the first round's weight search
before anything uses it, so it is not run here.) The attention matmuls are searched in
:mod:`~edgecompress.quantize.vit_ptq.attn`.

Fixed-point stop (exact): a round maps the input quantizer to (weights', input'), and the weight
search does not depend on the previous weights, so a round that returns the input quantizer it
started from would be repeated bit for bit by every further round; the loop stops there
(``LinearParams.rounds`` says how many ran).

Exact algebraic shortcuts keep the candidate batches affordable on a CPU (they change the cost,
not the value, up to float rounding; tests compare them with the direct products):

* weight candidates of ``Y = X̂ Wᵀ``: with ``D = Ŵ_c − W``, ``E = (X̂ − X) Wᵀ``, ``H = X̂ᵀX̂ / T``,
  ``mse_o = D_o H D_oᵀ + 2 D_o·(Eᵀ X̂ / T)_o + mean(E_o²)`` — cost ``O·K²`` per candidate instead of
  ``T·O·K`` (used when ``K < T``);
* activation candidates: with ``Δ = X̂_c − X`` and ``F`` the error
  from the other operand, ``‖Δ Ŵᵀ + F‖² = tr(Δ ŴᵀŴ Δᵀ) + 2⟨Δ, F Ŵ⟩ + ‖F‖²`` — used when the
  reduced dimension is the smaller one.

Candidates are evaluated in chunks bounded by ``CHUNK_ELEMENTS`` floats per intermediate, with
the allocation-light quantizers of :mod:`~edgecompress.quantize.vit_ptq.fastq`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from edgecompress.quantize.log import fake_quant_adalog
from edgecompress.quantize.search import adalog_joint_search, chunked, fpcs, percentile_ranges
from edgecompress.quantize.vit_ptq.fastq import fq_adalog, fq_uniform

CHUNK_ELEMENTS = 2**20  # floats per candidate-batch intermediate: about the L2 cache; measured fastest
Quant = Callable[..., torch.Tensor]


def same_params(a, b) -> bool:
    """Bit equality of two parameter sets (same keys or same order): the fixed-point test."""
    pairs = [(a[k], b[k]) for k in a] if isinstance(a, dict) else list(zip(a, b))
    return all(torch.equal(torch.as_tensor(x), torch.as_tensor(y)) for x, y in pairs)


def chunk_size(per_candidate: int) -> int:
    """Candidates per call so that one intermediate holds about ``CHUNK_ELEMENTS`` floats."""
    return max(1, CHUNK_ELEMENTS // max(per_candidate, 1))


def tensor_mse_score(x: torch.Tensor, bits: int) -> Callable:
    """Per-group MSE of ``x`` [G, N] itself (weight or input pre-search): ``[C, G] → [C, G]``."""

    def score(scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        d = fq_uniform(x, scale[..., None], zp[..., None], bits).sub_(x)  # [C, G, N]
        return d.mul_(d).mean(-1)

    return chunked(score, chunk_size(x.numel()))


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


@dataclass
class LinearParams:
    """Searched parameters of one Linear: weight (scale, zp) [O], input params, output MSE."""

    w_scale: torch.Tensor
    w_zp: torch.Tensor
    act: dict  # uniform: {"scale", "zero_point"}; adalog: {"scale", "q", "shift"}
    mse: float
    ref_power: float  # mean(Y²) of the float output, for SQNR
    rounds: int = 0  # alternation rounds run (fewer than asked when a fixed point was reached)


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
    if rounds < 1:
        raise ValueError("rounds must be ≥ 1")
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
    done = 0
    while done < rounds:
        done += 1
        x_hat = act_quantize(x, act, a_bits)
        ws, wz, _ = fpcs(weight_output_score(x_hat, x, w, w_bits), w_ranges, w_bits)
        w_hat = fq_uniform(w, ws[:, None], wz[:, None], w_bits)
        new_act = _search_act(x, w_hat, w, a_bits, act, ranges)
        fixed = same_params(new_act, act)
        act = new_act
        if fixed:  # the next round would start from the same input quantizer: it repeats this one
            break
    y = x @ w.T
    y_hat = act_quantize(x, act, a_bits) @ fq_uniform(w, ws[:, None], wz[:, None], w_bits).T
    return LinearParams(ws, wz, act, float((y_hat - y).pow(2).mean()), float(y.pow(2).mean()), done)


def channel_act_search(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-input-channel (scale, zp) [K] of a post-LN input ``x`` [T, K] by input MSE (free zp)."""
    return self_fpcs(x.T.contiguous(), bits, free_zero_point=True)
