"""The self-MSE of uniform candidates from sorted values and prefix moments (exact, no pass over the data).

The pre-searches (per-channel post-LN inputs, per-tensor Linear inputs, per-head Q/K/V) score
each uniform candidate ``(s, z)`` by the MSE of the tensor against its own quantization. The
quantizer is monotone, so the values mapped to code ``j`` are one contiguous run of the *sorted*
values, between the boundaries ``(j − z ± ½)·s`` (the first and last runs extend to ∓∞: the
clipped values). With prefix sums of ``1, x, x²`` (float64) each run contributes
``n_j v_j² − 2 v_j Σx + Σx²`` with ``v_j = (j − z)·s``, so one candidate costs ``2^b`` binary
searches instead of ``N`` quantizations: the same objective, evaluated in float64 instead of fp32
(a value exactly on a boundary, equidistant from both levels, adds the same error to either).

Used by the bf16 fast path (``scoring: bf16``); the fp32 reference path scores element by element.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from edgecompress.quantize.search import chunked
from edgecompress.quantize.uniform import levels

MAX_QUERIES = 2**22  # boundary searches per call (bounds the [G, C·L] index tensors)


def sorted_mse_score(x: torch.Tensor, bits: int) -> Callable:
    """Per-group MSE of ``x`` [G, N] under uniform candidates: ``score(scale, zp [C, G]) → [C, G]``."""
    srt = x.double().sort(dim=-1).values  # [G, N]
    zero = torch.zeros_like(srt[:, :1])
    p1 = torch.cat([zero, srt.cumsum(-1)], -1)  # [G, N + 1]
    p2 = torch.cat([zero, srt.pow(2).cumsum(-1)], -1)
    g, n = srt.shape
    top = levels(bits) - 1
    j = torch.arange(top + 1, dtype=torch.float64, device=x.device)  # [L]

    def score(scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        c = scale.shape[0]
        s, z = scale.double().T[:, :, None], zp.double().T[:, :, None]  # [G, C, 1]
        edges = ((j[1:] - 0.5 - z) * s).reshape(g, -1)  # [G, C·(L−1)]: lower edge of codes 1..L−1
        cut = torch.searchsorted(srt, edges).reshape(g, c, top)  # values below each edge
        ends = torch.cat([cut.new_zeros(g, c, 1), cut, cut.new_full((g, c, 1), n)], -1)  # [G, C, L+1]
        lo, hi = ends[..., :-1], ends[..., 1:]  # [G, C, L]: the run of each code
        cnt = (hi - lo).double()
        s1 = p1.gather(1, hi.reshape(g, -1)) - p1.gather(1, lo.reshape(g, -1))
        s2 = p2.gather(1, hi.reshape(g, -1)) - p2.gather(1, lo.reshape(g, -1))
        v = (j - z) * s  # [G, C, L]
        err = cnt * v * v - 2 * v * s1.reshape(g, c, -1) + s2.reshape(g, c, -1)
        return (err.sum(-1).clamp_min(0) / n).T.float()  # [C, G]

    return chunked(score, max(1, MAX_QUERIES // max(g * (top + 1), 1)))
