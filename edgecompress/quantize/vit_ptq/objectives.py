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

Scoring (``dtype``): fp32 scores every candidate with the reference objectives of
:mod:`~edgecompress.quantize.vit_ptq.reference` (exact Gram/Hessian shortcuts, bit-identical to
earlier versions); bf16 scores them with the bf16 products of
:mod:`~edgecompress.quantize.vit_ptq.scoring` and re-scores each search's final survivors with the
reference, so every returned parameter set is chosen, and its error reported, in fp32. The
self-MSE pre-searches use the exact sorted-moment form (:mod:`~edgecompress.quantize.vit_ptq.selfmse`)
on the bf16 path. The fixed-point stop holds on both paths (each is deterministic).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from edgecompress.quantize.log import fake_quant_adalog
from edgecompress.quantize.search import adalog_joint_search, fpcs, percentile_ranges
from edgecompress.quantize.vit_ptq import reference
from edgecompress.quantize.vit_ptq.fastq import AdaLogCandidates, UniformCandidates, fq_uniform
from edgecompress.quantize.vit_ptq.reference import Quant, tensor_mse_score
from edgecompress.quantize.vit_ptq.scoring import act_score, exact_of, weight_score, with_exact
from edgecompress.quantize.vit_ptq.selfmse import sorted_mse_score


def same_params(a, b) -> bool:
    """Bit equality of two parameter sets (same keys or same order): the fixed-point test."""
    pairs = [(a[k], b[k]) for k in a] if isinstance(a, dict) else list(zip(a, b))
    return all(torch.equal(torch.as_tensor(x), torch.as_tensor(y)) for x, y in pairs)


def self_fpcs(
    x: torch.Tensor, bits: int, free_zero_point: bool = False, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """FPCS of each row of ``x`` [G, N] on its own MSE: ``(scale [G], zero_point [G])``.

    ``dtype`` bf16 (the fast path) scores with the exact sorted-moment form
    (:func:`~edgecompress.quantize.vit_ptq.selfmse.sorted_mse_score`), fp32 element by element."""
    score = tensor_mse_score(x, bits) if dtype == torch.float32 else sorted_mse_score(x, bits)
    s, z, _ = fpcs(score, percentile_ranges(x), bits, free_zero_point=free_zero_point)
    return s, z


# --- Linear: Y = X Wᵀ (+ b, which cancels in every error) ------------------------------------------


def weight_output_score(
    x_hat: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32
) -> Callable:
    """Output MSE per output channel for weight candidates, inputs fixed at ``x_hat`` [T, K].

    ``dtype`` fp32: the reference score; bf16: :func:`~edgecompress.quantize.vit_ptq.scoring.weight_score`
    carrying the reference as its fp32 twin."""
    exact = reference.weight_output_score(x_hat, x, w, bits)
    return exact if dtype == torch.float32 else with_exact(weight_score(x_hat, x, w, bits, dtype), exact)


def act_output_score(
    x: torch.Tensor, w_hat: torch.Tensor, w: torch.Tensor, quant: Quant, dtype: torch.dtype = torch.float32
) -> Callable:
    """Output MSE (per tensor) for input candidates: ``score(*params [C]) → [C]``.

    ``quant(x, *params)`` gets each param shaped ``[C, 1, 1]`` and returns ``x̂`` [C, T, K].
    ``dtype`` as in :func:`weight_output_score` (bf16: :func:`~edgecompress.quantize.vit_ptq.scoring.act_score`).
    """
    exact = reference.act_output_score(x, w_hat, w, quant)
    return exact if dtype == torch.float32 else with_exact(act_score(x, w_hat, w, quant, dtype), exact)


@dataclass
class LinearParams:
    """Searched parameters of one Linear: weight (scale, zp) [O], input params, output MSE."""

    w_scale: torch.Tensor
    w_zp: torch.Tensor
    act: dict  # uniform: {"scale", "zero_point"}; adalog: {"scale", "q", "shift"}
    mse: float
    ref_power: float  # mean(Y²) of the float output, for SQNR
    rounds: int = 0  # alternation rounds run (fewer than asked when a fixed point was reached)
    seconds: dict = field(default_factory=dict)  # wall seconds per search: "weight", "input"


class Stopwatch:
    """Wall seconds per named step, summed: ``with sw("weight"): ...``; ``sw.seconds`` rounded."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    @contextmanager
    def __call__(self, key: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[key] = self.totals.get(key, 0.0) + time.perf_counter() - t0

    @property
    def seconds(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.totals.items()}


def _uniform_act(a_bits: int) -> Quant:
    return UniformCandidates(a_bits)


def _adalog_act(a_bits: int, shift: float) -> Quant:
    return AdaLogCandidates(a_bits, shift)


def act_quantize(x: torch.Tensor, act: dict, a_bits: int) -> torch.Tensor:
    """Dequantized input under ``act`` params (in the unshifted domain)."""
    if "q" in act:
        return fake_quant_adalog(x + act["shift"], act["scale"], act["q"], a_bits) - act["shift"]
    return fq_uniform(x, act["scale"], act["zero_point"], a_bits)


def _search_act(x, w_hat, w, a_bits, act: dict, ranges, dtype: torch.dtype = torch.float32) -> dict:
    if "q" in act:
        score = act_output_score(x, w_hat, w, _adalog_act(a_bits, act["shift"]), dtype)
        s, q, _ = adalog_joint_search(score, ranges[0], ranges[1], act["scale"], exact=exact_of(score))
        return {"scale": s, "q": q, "shift": act["shift"]}
    score = act_output_score(x, w_hat, w, _uniform_act(a_bits), dtype)
    exact = exact_of(score)
    s, z, _ = fpcs(
        lambda s_, z_: score(s_, z_)[:, None],
        ranges,
        a_bits,
        exact=None if exact is None else lambda s_, z_: exact(s_, z_)[:, None],
    )
    return {"scale": s[0], "zero_point": z[0]}


def _start_act(x: torch.Tensor, a_bits: int, shift: float | None, dtype: torch.dtype) -> tuple[dict, object]:
    """The input quantizer the first round starts from and the ranges its searches draw from."""
    if shift is None:
        s, z = self_fpcs(x.reshape(1, -1), a_bits, dtype=dtype)
        return {"scale": s[0], "zero_point": z[0]}, percentile_ranges(x.reshape(1, -1))
    pos = percentile_ranges(x[x > 0].reshape(1, -1))
    lo, hi = pos.inner_hi[0] + shift, pos.outer_hi[0] + shift
    return {"scale": lo + (hi - lo) * 126 / 127, "q": torch.tensor(37.0), "shift": shift}, (lo, hi)


def search_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    w_bits: int,
    a_bits: int,
    rounds: int = 3,
    post_gelu_shift: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> LinearParams:
    """AdaLog's per-Linear protocol on float inputs ``x`` [T, K] and weight ``w`` [O, K].

    ``post_gelu_shift=None``: uniform per-tensor input. Otherwise an AdaLog input quantizer on
    ``x + shift`` with the joint (q, scale) search; its start scale is the second-to-last of 128
    points between the 90th and 100th percentile of the positive shifted inputs (official code).
    ``dtype``: precision of the candidate products (bf16: final survivors re-scored in fp32).
    """
    if rounds < 1:
        raise ValueError("rounds must be ≥ 1")
    sw = Stopwatch()
    with sw("input"):
        act, ranges = _start_act(x, a_bits, post_gelu_shift, dtype)
    w_ranges = percentile_ranges(w)
    done = 0
    while done < rounds:
        done += 1
        with sw("weight"):
            score = weight_output_score(act_quantize(x, act, a_bits), x, w, w_bits, dtype)
            ws, wz, _ = fpcs(score, w_ranges, w_bits, exact=exact_of(score))
            w_hat = fq_uniform(w, ws[:, None], wz[:, None], w_bits)
        with sw("input"):
            new_act = _search_act(x, w_hat, w, a_bits, act, ranges, dtype)
        fixed = same_params(new_act, act)
        act = new_act
        if fixed:  # the next round would start from the same input quantizer: it repeats this one
            break
    y = x @ w.T
    y_hat = act_quantize(x, act, a_bits) @ w_hat.T
    mse, power = float((y_hat - y).pow(2).mean()), float(y.pow(2).mean())
    return LinearParams(ws, wz, act, mse, power, done, sw.seconds)


def channel_act_search(
    x: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-input-channel (scale, zp) [K] of a post-LN input ``x`` [T, K] by input MSE (free zp)."""
    return self_fpcs(x.T.contiguous(), bits, free_zero_point=True, dtype=dtype)
