"""Fused elementwise kernels of the bf16 scoring path on a CPU (``torch.compile``, one pass each).

A bf16-scored candidate costs one AMX matrix product (~0.6-1 ns per input element at these
shapes) plus the candidate quantization ``Δ = x̂ − x`` and the sum of squares of the product's
output. Eager torch runs those as five to fifteen passes over cache-sized tiles; each kernel here
is one compiled function per candidate and tile — quantize (one loop), the product (the same
oneDNN call), sum of squares (one loop) — measured 2.4× (uniform) and 2.7× (AdaLog) faster per
candidate than the eager path, 1.8× for the weights' Hessian form. The kernels compute the same
operations as the eager code (:mod:`~edgecompress.quantize.vit_ptq.fastq`); an AdaLog table
lookup becomes a chain of selects (``tab[j]`` for the code ``j``) that loads the same entries
(measured faster than a gather or the arithmetic form of the table); tests compare them with the
eager forms.

Used only on a CPU, for tensors of at least :data:`FUSE_MIN` elements (below that the call costs
more than the passes it saves), and only when compiling works: the first failure (no C++
compiler, an unsupported platform) switches fusion off for the process with a warning, and the
eager code runs. On a GPU the eager passes are memory-bound at GPU bandwidth, so nothing is
compiled there. ``EDGECOMPRESS_FUSE=0`` turns fusion off (the results do not change).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable

import torch

FUSE_MIN = 2**16
_state = {"on": os.environ.get("EDGECOMPRESS_FUSE", "1") != "0"}


def fusing(x: torch.Tensor) -> bool:
    return _state["on"] and x.device.type == "cpu" and x.numel() >= FUSE_MIN


def _compiled(fn: Callable) -> Callable:
    """``fn`` compiled on first use (dynamic shapes); on any compile failure, fusion goes off."""
    box: dict = {}

    def run(*args):
        if "fn" not in box:
            box["fn"] = torch.compile(fn, dynamic=True)
        try:
            return box["fn"](*args)
        except Exception as e:  # noqa: BLE001 — any backend failure falls back to the eager code
            _state["on"] = False
            warnings.warn(
                f"edgecompress: fused scoring kernels unavailable ({type(e).__name__}); eager", stacklevel=2
            )
            return fn(*args)

    return run


def _error(d, p, b):
    return (torch.matmul(d, p).float() + b.float()).pow(2).sum(-1)


def _uniform(x, s, lo, hi, p, b):
    return _error((torch.clamp(torch.round(x / s), lo, hi) * s - x).to(torch.bfloat16), p, b)


def _lookup(code, tab, n: int):
    """``tab[code]`` for integral float codes ``0 … n`` (``n`` → 0), as selects: a binary tree on
    the code's bits where ``n`` is a power of two (``log2 n`` masks instead of ``n``; measured 22 %
    faster than the chain), else the chain ``tab[j]·[code = j]``. Both load the same entries."""
    if n & (n - 1):
        val = torch.zeros_like(code)
        for j in range(n):
            val = torch.where(code == j, tab[j], val)
        return val
    ci = code.to(torch.int32)
    level = [tab[j] for j in range(n)]
    bit = 1
    while len(level) > 1:
        on = (ci & bit) != 0
        level = [torch.where(on, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
        bit *= 2
    return torch.where(ci >= n, 0.0, level[0])


@functools.cache
def _adalog(n: int) -> Callable:
    """AdaLog codes, then ``tab[code]`` over the ``n`` value codes (:func:`_lookup`; the zero code
    ``n`` maps to 0), then the error of the bf16 ``Δ``."""

    def kernel(lam, xs, l2s, inv, tab, p, b):
        code = torch.clamp(torch.round(torch.clamp((lam + l2s) * inv, min=0.0)), max=float(n))
        return _error((_lookup(code, tab, n) - xs).to(torch.bfloat16), p, b)

    return _compiled(kernel)


def _hessian(w, s, lo, hi, h, g, e2):
    d = torch.clamp(torch.round(w / s), lo, hi) * s - w
    return (torch.matmul(d.to(torch.bfloat16), h).float() + 2.0 * g).mul(d).sum(-1) + e2


uniform_error = _compiled(_uniform)
"""``Σ_r (Δ P + B)²`` (last dim, fp32) of one uniform candidate, ``Δ = clamp(round(x/s), lo, hi)·s − x``
rounded to bf16; ``x`` [..., T, K], params broadcasting, ``P`` [..., K, R] and ``B`` [..., T, R] bf16."""


def _uniform_stacked(x, s, lo, hi, p, b):
    d = (torch.clamp(torch.round(x.unsqueeze(-3) / s), lo, hi) * s - x.unsqueeze(-3)).to(torch.bfloat16)
    c, t, k = d.shape[-3], d.shape[-2], d.shape[-1]
    e = torch.matmul(d.reshape(*d.shape[:-3], c * t, k), p)  # one product for the C candidates
    return (e.reshape(*d.shape[:-1], -1).float() + b.unsqueeze(-3).float()).pow(2).sum(-1)


uniform_stacked_error = _compiled(_uniform_stacked)
"""As :data:`uniform_error` for ``C`` candidates at once: params ``[..., C, 1, 1]`` against
``x[..., None, :, :]``, their ``Δ`` stacked along the rows of one product per batch entry
(``[C·T, K]·[K, R]`` instead of ``C`` products ``[T, K]·[K, R]``): ``[..., C, T]``. The same
elementwise operations; measured 1.8× faster products at the attention searches' DeiT-S shapes
(``[64, 197]·[197, 197]`` per sample and head, 8 candidates, 1 thread), 1.4× at ``[197, 64]·[64, 64]``."""


hessian_error = _compiled(_hessian)
"""Per-output-channel weight error ``D H Dᵀ + 2 D·G + e2`` of one uniform weight candidate
(``D = Ŵ − W``, ``w`` [O, K], params [O, 1]), ``D H`` in bf16 (``h`` bf16 [K, K])."""


def adalog_error(lam, xs, l2s, inv, tab: torch.Tensor, n: int, p, b) -> torch.Tensor:
    """As :data:`uniform_error` for one AdaLog candidate: ``Δ = s·T_q[code] − (x + shift)`` with
    ``tab = s·T_q`` ([n + 1], zero code last), ``l2s = log2 s``, ``inv = r/q``."""
    return _adalog(n)(lam, xs, l2s, inv, tab, p, b)


def _residual(u, g, a):
    return (u * a - g).pow(2).sum()


scaled_residual = _compiled(_residual)
"""``Σ (a·U − G)²`` (fp32) of :mod:`~edgecompress.quantize.vit_ptq.sweep`'s incremental candidates."""
