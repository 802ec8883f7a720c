"""Batched parameter searches of AdaLog (ECCV 2024, official code GoatWu/AdaLog; METHODS.md §2).

Every search here takes the objective as a callable that scores a *batch* of candidates in one
call, candidates stacked in the leading dimension::

    score(scale, zero_point) -> mse      # scale, zero_point: [C, G]  ->  mse: [C, G]

``G`` indexes independent groups (output channels of a weight, input channels of a per-channel
activation, heads, or ``G = 1`` per tensor); the caller reshapes ``[C, G]`` to broadcast against
its tensor and returns one error per candidate and group, so each group picks its own winner while
all groups are searched together. Objectives (weight MSE, input MSE, layer-output MSE) live with
their callers (:mod:`edgecompress.quantize.vit_ptq.objectives`); this module only proposes
candidates and keeps the best. No Python loop runs over candidates, only over refinement rounds.

Choices where the paper and code are silent or where we deviate (all recorded in docstrings):

* Zero-point candidates are ``min(16, 2^b)`` consecutive integers *centred on the data's own
  zero-point* ``-lo / s`` for each scale candidate (shifted to stay inside ``[0, 2^b - 1]``). The
  official code centres them on ``2^(b-1)`` whatever the data, which is the same for symmetric
  data and at ≤ 4 bits (where all 16 codes are tried anyway) but wastes the range of one-sided
  tensors at 6 and 8 bits.
* Deployed quantizers keep the zero-point in ``[0, 2^b - 1]``, so the seed ranges are widened to
  contain 0. Per-channel post-LN parameters, which the reparameterization folds away, may use any
  integer offset (``free_zero_point=True``); the official code keeps them in range, which clips
  channels whose values all lie far from 0.
* The result is the best candidate scored in *any* round. The official code returns the last
  round's best; as the refinement offsets ``(linspace(0,1,8) - 0.5)·Δ`` never include 0, that can
  be worse than the initial grid's best. Keeping the incumbent makes "FPCS ≤ grid" a guarantee.
* Ties break towards the lower candidate index (stable sort), so results are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from edgecompress.quantize.log import ADALOG_Q_RANGE
from edgecompress.quantize.uniform import levels

Score = Callable[..., torch.Tensor]
"""``score(*params) -> mse``: every param ``[C, G]`` (or ``[C]``), mse of the same shape."""

MIN_SCALE = 1e-4
"""AdaLog clamps every searched activation scale at 1e-4."""


@dataclass(frozen=True)
class Ranges:
    """Per-group clipping ranges that seed FPCS: inner (P10, P90) and outer (min, max), each [G]."""

    inner_lo: torch.Tensor
    inner_hi: torch.Tensor
    outer_lo: torch.Tensor
    outer_hi: torch.Tensor


def _quantile_rows(x: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolated quantile of each row of ``x`` [G, N] (torch.quantile's rule), [G].

    Uses ``kthvalue`` so it has no input-size limit and stays O(N).
    """
    n = x.shape[-1]
    if q >= 1.0:
        return x.amax(dim=-1)
    if q <= 0.0:
        return x.amin(dim=-1)
    pos = q * (n - 1)
    lo_i = int(pos)
    frac = pos - lo_i
    lo = torch.kthvalue(x, lo_i + 1, dim=-1).values
    if frac == 0.0 or lo_i + 1 >= n:
        return lo
    hi = torch.kthvalue(x, lo_i + 2, dim=-1).values
    return lo + frac * (hi - lo)


def percentile_ranges(x: torch.Tensor, lo_q: float = 0.9, hi_q: float = 1.0) -> Ranges:
    """FPCS seed ranges of ``x`` [G, N]: inner = (P(1-lo_q), P(lo_q)), outer = (P(1-hi_q), P(hi_q)).

    With the defaults (AdaLog's [0.9, 1.0] quantiles): inner = (P10, P90), outer = (min, max).
    """
    x = x.float() if x.dtype not in (torch.float32, torch.float64) else x
    return Ranges(
        inner_lo=_quantile_rows(x, 1.0 - lo_q),
        inner_hi=_quantile_rows(x, lo_q),
        outer_lo=_quantile_rows(x, 1.0 - hi_q),
        outer_hi=_quantile_rows(x, hi_q),
    )


def smallest_k(mse: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [k, ...] of the k smallest entries along dim 0, ties → lower index, NaN last.

    ``topk`` on a float64 key ``mse + i·(|mse|·2^-40 + 2^-1060)``: the offset is far below one
    float32 ulp of ``mse`` (so distinct values keep their order) and breaks exact ties by the
    index ``i``; several times faster than a stable sort on CPU.
    """
    key = torch.nan_to_num(mse.double(), nan=float("inf"))
    idx = torch.arange(mse.shape[0], dtype=torch.float64, device=mse.device).reshape(
        -1, *([1] * (mse.dim() - 1))
    )
    key = key + idx * (key.abs() * 2.0**-40 + 2.0**-1060)
    return torch.topk(key, k, dim=0, largest=False, sorted=True).indices


def _with_zero(r: Ranges) -> Ranges:
    """Ranges widened to contain 0, as any window with a zero-point in ``[0, 2^b - 1]`` does."""
    return Ranges(
        inner_lo=r.inner_lo.clamp(max=0), inner_hi=r.inner_hi.clamp(min=0),
        outer_lo=r.outer_lo.clamp(max=0), outer_hi=r.outer_hi.clamp(min=0),
    )  # fmt: skip


def fpcs_candidates(
    ranges: Ranges,
    bits: int,
    n_candidates: int = 128,
    max_zero_points: int = 16,
    min_scale: float = MIN_SCALE,
    free_zero_point: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FPCS's initial grid: ``scale [C, G]``, ``zero_point [C, G]`` and the scale step ``Δ [G]``.

    ``n_zp = min(16, 2^b)`` zero-points × ``C / n_zp`` scales spaced linearly from
    ``(P90 - P10) / (2^b - 1)`` to ``(max - min) / (2^b - 1)``; candidates are zero-point-major.

    ``free_zero_point=False`` (deployed quantizers): zero-points stay in ``[0, 2^b - 1]``, so the
    window always contains 0, and the ranges are first widened to contain 0. ``True`` (per-channel
    post-LN parameters that the reparameterization folds away): any integer offset, so a channel
    far from 0 (e.g. all values in [2, 5]) gets a window fitted to it.
    """
    ranges = ranges if free_zero_point else _with_zero(ranges)
    top = levels(bits) - 1
    n_zp = min(max_zero_points, levels(bits))
    n_s = n_candidates // n_zp
    t = torch.linspace(0.0, 1.0, n_s, dtype=ranges.inner_lo.dtype, device=ranges.inner_lo.device)[
        :, None
    ]  # [S, 1]
    in_w = ranges.inner_hi - ranges.inner_lo  # [G]
    out_w = ranges.outer_hi - ranges.outer_lo  # [G]
    scale = torch.clamp((in_w + t * (out_w - in_w)) / top, min=min_scale)  # [S, G]
    lo = ranges.inner_lo + t * (ranges.outer_lo - ranges.inner_lo)  # [S, G]
    start = torch.round(-lo / scale) - n_zp // 2  # [S, G]
    start = start if free_zero_point else torch.clamp(start, 0, levels(bits) - n_zp)
    offs = torch.arange(n_zp, dtype=scale.dtype, device=scale.device)[:, None, None]  # [Z, 1, 1]
    zp = (start[None] + offs).reshape(n_zp * n_s, -1)  # [Z*S, G]
    scale = scale[None].expand(n_zp, -1, -1).reshape(n_zp * n_s, -1)  # [Z*S, G]
    delta = (out_w - in_w) / (top * max(n_s - 1, 1))  # [G]
    return scale, zp, delta


class _Best:
    """The ``keep`` lowest-error candidates per group over every candidate scored (ties → the one
    scored first); with ``keep = 1`` the running best."""

    def __init__(self, keep: int = 1) -> None:
        self.keep = keep
        self.mse: torch.Tensor | None = None
        self.params: list[torch.Tensor] = []

    def update(self, mse: torch.Tensor, *params: torch.Tensor) -> None:
        if self.mse is not None:
            mse = torch.cat([self.mse, mse])
            params = tuple(torch.cat([old, new]) for old, new in zip(self.params, params))
        i = smallest_k(mse, min(self.keep, mse.shape[0]))  # [k, ...]
        self.mse = torch.gather(mse, 0, i)
        self.params = [torch.gather(x, 0, i) for x in params]

    def best(self, exact: Callable[..., torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
        """``(*params, mse)`` of the best kept candidate per group; with ``exact``, the kept ones
        are re-scored by it first (the fp32 twin of a bf16 score) and its error decides."""
        assert self.mse is not None
        mse = self.mse if exact is None else exact(*self.params)
        i = smallest_k(mse, 1)
        return (*(torch.gather(x, 0, i)[0] for x in self.params), torch.gather(mse, 0, i)[0])


def _pool(exact: Callable | None, rescore: int) -> _Best:
    return _Best(1 if exact is None else rescore)


def fpcs(
    score: Score,
    ranges: Ranges,
    bits: int,
    n_candidates: int = 128,
    keep: int = 16,
    rounds: int = 5,
    min_scale: float = MIN_SCALE,
    free_zero_point: bool = False,
    exact: Score | None = None,
    rescore: int = 8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fast Progressive Combining Search (AdaLog §FPCS; official ``weight_fpcs``/``activation_fpcs``).

    Score the 128-candidate grid of :func:`fpcs_candidates`, keep the best ``keep`` (16) per group;
    then ``rounds`` (5) times: around each survivor put ``n_candidates // keep`` (8) scales at
    offsets ``(linspace(0, 1, 8) - 0.5)·Δ`` with its zero-point fixed, shrink ``Δ ← Δ / 7.5``,
    score, keep the best 16. Scales are clamped at ``min_scale``. Returns the best
    ``(scale [G], zero_point [G], mse [G])`` seen in any round (see the module docstring).
    ``free_zero_point``: see :func:`fpcs_candidates`. ``exact``: when ``score`` is an approximation
    (bf16 products), the ``rescore`` best candidates per group over all rounds are re-scored by
    ``exact`` and the best of those is returned (with its ``exact`` error).
    """
    scale, zp, delta = fpcs_candidates(
        ranges, bits, n_candidates, min_scale=min_scale, free_zero_point=free_zero_point
    )
    best = _pool(exact, rescore)
    mse = score(scale, zp)  # [C, G]
    best.update(mse, scale, zp)
    n_new = n_candidates // keep
    offsets = torch.linspace(0.0, 1.0, n_new, dtype=scale.dtype, device=scale.device) - 0.5  # [n_new]
    for _ in range(rounds):
        idx = smallest_k(mse, keep)  # [k, G]
        s_keep, z_keep = torch.gather(scale, 0, idx), torch.gather(zp, 0, idx)  # [k, G]
        scale = (s_keep[:, None, :] + offsets[None, :, None] * delta).reshape(keep * n_new, -1)
        scale = torch.clamp(scale, min=min_scale)  # [k*n_new, G]
        zp = z_keep.repeat_interleave(n_new, dim=0)  # [k*n_new, G]
        delta = delta / (n_new - 0.5)
        mse = score(scale, zp)
        best.update(mse, scale, zp)
    return best.best(exact)


def grid_search(
    score: Callable[[torch.Tensor], torch.Tensor],
    candidates: torch.Tensor,
    exact: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rescore: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best of a 1-D candidate set (AdaLog's q search, TanQ's α search): ``(value, mse)``.

    ``score(candidates [C]) -> [C]``; ties → lower index; ``exact``/``rescore`` as in :func:`fpcs`.
    """
    best = _pool(exact, rescore)
    best.update(score(candidates), candidates)
    return best.best(exact)


def adalog_q_candidates(device: torch.device | None = None) -> torch.Tensor:
    """AdaLog's integers q = 10 … 137 (128 candidates), float32."""
    lo, hi = ADALOG_Q_RANGE
    return torch.arange(lo, hi + 1, dtype=torch.float32, device=device)


def adalog_joint_search(
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    pos_lo: torch.Tensor,
    pos_hi: torch.Tensor,
    scale0: torch.Tensor,
    keep_q: int = 8,
    n_scales: int = 16,
    keep: int = 32,
    rounds: int = 5,
    exact: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    rescore: int = 8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AdaLog's joint (q, scale) search for the post-GELU quantizer (official ``activation_fpcs``).

    ``score(scale [C], q [C]) -> mse [C]`` (per tensor). Steps: score all q ∈ 10..137 at
    ``scale0`` and keep the best ``keep_q`` (8); pair them with ``n_scales`` (16) scales spaced
    linearly in ``[pos_lo, pos_hi]`` (the caller passes the 90th and 100th percentile of the
    positive, shifted values); score the 128 pairs and keep ``keep`` (32); then ``rounds`` (5)
    times put ``128 // 32 = 4`` scales around each survivor at ``(linspace(0,1,4) - 0.5)·Δ``
    (``Δ`` = the initial scale spacing, then ``Δ ← Δ / 3.5``), q fixed, and keep 32. Returns the
    best ``(scale, q, mse)`` (0-d tensors) seen in any step; ``exact``/``rescore`` as in :func:`fpcs`.
    """
    q_all = adalog_q_candidates(pos_lo.device)  # [Q]
    best = _pool(exact, rescore)
    mse = score(scale0.reshape(1).expand(q_all.numel()).clone(), q_all)  # [Q]
    best.update(mse, scale0.reshape(1).expand(q_all.numel()), q_all)
    q_top = q_all[smallest_k(mse, keep_q)]  # [keep_q]
    t = torch.linspace(0.0, 1.0, n_scales, dtype=pos_lo.dtype, device=pos_lo.device)
    grid = torch.clamp(pos_lo + t * (pos_hi - pos_lo), min=MIN_SCALE)  # [n_scales]
    delta = (pos_hi - pos_lo) / max(n_scales - 1, 1)
    scale, q = grid.repeat(keep_q), q_top.repeat_interleave(n_scales)  # [keep_q * n_scales]
    n_new = scale.numel() // keep
    offsets = torch.linspace(0.0, 1.0, n_new, dtype=pos_lo.dtype, device=pos_lo.device) - 0.5
    for step in range(rounds + 1):
        if step > 0:
            idx = smallest_k(mse, keep)
            scale = torch.clamp((scale[idx][:, None] + offsets * delta).reshape(-1), min=MIN_SCALE)
            q = q[idx].repeat_interleave(n_new)
            delta = delta / (n_new - 0.5)
        mse = score(scale, q)
        best.update(mse, scale, q)
    return best.best(exact)


def chunked(score: Score, chunk: int) -> Score:
    """Wrap ``score`` so candidates are evaluated ``chunk`` at a time (bounded memory), then joined."""

    def run(*params: torch.Tensor) -> torch.Tensor:
        n = params[0].shape[0]
        parts = [score(*(p[i : i + chunk] for p in params)) for i in range(0, n, chunk)]
        return torch.cat(parts, dim=0)

    return run
