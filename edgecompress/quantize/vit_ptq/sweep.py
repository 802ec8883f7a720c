"""Incremental scoring of per-tensor input candidates: only the elements whose code changes are re-multiplied.

The Linear input searches (:func:`~edgecompress.quantize.vit_ptq.scoring.act_score`) score each
candidate by ``‖Δ_c P + B‖²`` with ``Δ_c = X̂_c − X`` (the module docstring of
:mod:`~edgecompress.quantize.vit_ptq.scoring`), one ``[T, K]·[K, R]`` product per candidate. For
the per-tensor families here the dequantized input is ``X̂_c = a_c·V_c(key) − base + X``: a factor
``a_c`` (the scale) times a step function ``V_c`` of one per-element key (uniform: ``x``, ``V =
clamp(round(x/s), −z, 2^b−1−z)``; AdaLog: ``λ = −log2(x + shift)``, ``V = T_q[code]``), whose
levels are fixed by the candidate's *group* (zero-point; q). So, with ``U_c = V_c P`` and
``G = base·P − B`` (candidate-independent, fp32),

    Δ_c P + B = a_c·U_c − G,      U_c' = U_c + (V_c' − V_c) P.

Two candidates of one group whose scales are close differ in ``V`` only where a key lies between
their thresholds: a contiguous run of the *sorted* keys per threshold. The late FPCS / joint-search
steps put their candidates ever closer around the survivors (measured on DeiT-S's first fc2 input:
1.7 %, 0.5 %, 0.09 %, 0.02 % of the elements change code between neighbouring candidates of steps
3-6), so each such candidate costs a sparse product (the changed elements × ``R``) and one pass
over ``[T, R]`` instead of a quantization pass over ``[T, K]`` and a dense product.

Exactness: the changed elements are located by binary search of the thresholds (float64) in the
sorted keys, widened by :data:`MARGIN` positions on each side, and their old and new ``V`` are
then computed with the family's own elementwise operations (``sweep_values``, those of its fast
``delta``), so ``V`` is the one the dense path quantizes to except where a key is within float
rounding of a threshold *and* more than ``MARGIN`` equal-up-to-rounding keys sit there. The
*anchor* of a run of candidates is scored densely (bf16 ``Δ``, bf16 product, as the other
candidates of the bf16 path) and gives ``U = (E + G)/a``; later candidates add their updates (an
fp32 CSR product for few changes, else one bf16 product of the scattered ``ΔV``: the rounding of a
dense candidate). So a score differs from the dense bf16 score of the same candidate by bf16
rounding of the same order (tests: ≤ 3e-4 relative); the searches re-score their final survivors
with the fp32 reference as before (MiniLM AdaLog W4A4: cosine and NN agreement identical to the
dense bf16 path's).

Which candidates are incremental: in a batch sorted by (group, scale), a candidate is scored from
its predecessor (the last one scored, also from the previous batch) when both are in one group and
at most :data:`SPARSE_MAX` of the elements change; a candidate starts a run (anchor) when its
successor would be incremental from it; every other candidate is scored by the dense path.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from edgecompress.quantize.vit_ptq import fused

SPARSE_MAX = 0.04
"""Largest fraction of changed elements scored incrementally (measured on this CPU, DeiT-S fc2
input [6304, 1536]·[1536, 384], 1 thread, loaded: a dense bf16 candidate ~30 ms; an update at 2 %
~17 ms, at 6 % ~34 ms)."""
CSR_MAX = 0.002
"""Up to this fraction the update is an fp32 CSR product (~3 ms at 0.1 %); above it ``ΔV`` is
scattered into a zero buffer for one bf16 product (the CSR product grows past it)."""
MARGIN = 4
"""Sorted positions re-quantized on each side of a moved threshold (float rounding of the keys)."""
K_OVER_R = 2
"""Smallest ``K / R`` scored incrementally (see :func:`applies`). With ``K = R`` the sweep is slower
at every size measured (``benchmarks/ptq_sweep_size.py --families uniform``, 1 thread: 0.82× at
T, K, R = 1431, 384, 384, 0.82× at 3152, 0.89× at DeiT-S's 6304)."""
SWEEP_MIN_MACS = {"adalog": 2**28, "uniform": 3 * 2**28}
"""Smallest candidate product ``T·K·R`` scored incrementally, per family (``quant.sweep_kind``);
smaller searches run the dense bf16 path (operation for operation the code before this module).
Measured on this CPU (``benchmarks/ptq_sweep_size.py``, 1 thread, load ~1; one input search of an
FC2-shaped ``[T, K]·[K, R]`` input; the sweep's speed-up, dense s / sweep s): AdaLog's joint search at K, R = 288, 96
(vit-digits' FC2 at T = 544: 15M) 0.78× at 15M, 0.91× at 30M, 1.14× at 60M, 1.20× at 120M; at
K, R = 1536, 384 (MiniLM's and DeiT-S's FC2) 0.87× at 116M, 1.03× at 232M, 1.17× at 465M, 1.46×
at 930M; uniform FPCS 0.59-0.93× up to 120M at the small K, R, 0.63-0.96× up to 465M at the
large, 1.12× at 930M. The per-candidate bookkeeping (sorting the batch, threshold positions,
gathers) and the fp32 pass over ``[T, R]`` cost more than the products they save until the
product is large. AdaLog's 268M lies between 232M (1.03×, a gain within noise) and 465M (1.17×);
uniform's 805M between 465M (0.96×) and 930M (1.12×)."""


def applies(quant, x: torch.Tensor, p: torch.Tensor, dtype: torch.dtype) -> bool:
    """The bf16 path on a CPU, a family with a step-function view, a product of at least
    :data:`SWEEP_MIN_MACS` multiply-adds for its family (below it the per-candidate bookkeeping and the compiled
    residual cost more than the product they save), and ``K ≥ 2R``: an incremental candidate still
    makes one fp32 pass over ``[T, R]`` (and a dense candidate one quantization pass over ``[T, K]``),
    so with ``K ≈ R`` nothing is saved (measured on MiniLM's K = R = 384 inputs, 1 thread: the input
    searches 1.3-2× slower incremental)."""
    return (
        dtype == torch.bfloat16
        and x.device.type == "cpu"
        and hasattr(quant, "sweep_view")
        and x.numel() >= fused.FUSE_MIN
        and x.numel() * p.shape[-1] >= SWEEP_MIN_MACS[quant.sweep_kind]
        and x.shape[-1] >= K_OVER_R * p.shape[-1]
    )


def _merged(lo: list[int], hi: list[int]) -> list[tuple[int, int]]:
    """The union of the intervals ``[lo_i, hi_i)`` as disjoint sorted intervals (at least one)."""
    out: list[list[int]] = []
    for a, b in sorted(zip(lo, hi)):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        elif b > a:
            out.append([a, b])
    return [tuple(v) for v in out] or [(0, 0)]


class SweepScore:
    """``score(*params [C]) → [C]`` as the dense bf16 ``act_score``, incremental where it pays.

    ``p`` [K, R] and ``b`` [T, R] are the scoring-dtype operands of the dense path, ``const`` and
    ``n`` its constant and normalization; ``dense(*params)`` is the dense score of a batch."""

    def __init__(self, quant, x, prep, p, b, const, n: int, dense: Callable):
        key, base = quant.sweep_view(x, prep)
        self.quant, self.x, self.prep, self.dense = quant, x, prep, dense
        self.p, self.b, self.p32 = p, b, p.float()
        self.g = base @ self.p32 - b.float()  # [T, R]
        self.keys, perm = key.reshape(-1).sort()
        self.perm = perm.to(torch.int32)
        self.const, self.n, self.shape = const, n, x.shape
        self.state: tuple | None = None  # (group, params, threshold positions) of the last scored
        self.u: torch.Tensor | None = None  # V P of that candidate (fp32 [T, R])
        self.buf: torch.Tensor | None = None  # [T·K] zeros in the scoring dtype (scatter updates)
        self.counts = {"dense": 0, "anchor": 0, "sparse": 0}

    def __call__(self, *params: torch.Tensor) -> torch.Tensor:
        c = params[0].shape[0]
        order = sorted(range(c), key=lambda i: tuple(float(v[i]) for v in reversed(params)))
        cands = [tuple(v[i] for v in params) for i in order]
        views = [(self.quant.sweep_group(*p), self._positions(p)) for p in cands]
        out = torch.empty(c, dtype=torch.float64)
        plain = []
        for j, (i, p) in enumerate(zip(order, cands)):
            if self._near(self.state, views[j]):
                out[i] = self._sparse(p, views[j])
            elif j + 1 < c and self._near((*views[j][:1], None, views[j][1]), views[j + 1]):
                out[i] = self._anchor(p, views[j])
            else:
                plain.append(i)
                self.state = self.u = None
        if plain:
            idx = torch.tensor(plain)
            out[idx] = self.dense(*(v[idx] for v in params)).double()
            self.counts["dense"] += len(plain)
        return out.float()

    def _positions(self, p: tuple) -> torch.Tensor:
        th = self.quant.sweep_thresholds(*p).to(self.keys.dtype)
        return torch.searchsorted(self.keys, th)

    def _near(self, state, view) -> bool:
        if state is None or state[0] != view[0]:
            return False
        changed = int((state[-1] - view[1]).abs().sum())
        return changed <= SPARSE_MAX * self.keys.numel()

    def _error(self, a: torch.Tensor) -> float:
        return (
            float(fused.scaled_residual(self.u, self.g, a.reshape(()).float())) + float(self.const)
        ) / self.n

    def _anchor(self, p: tuple, view) -> float:
        """Dense bf16 ``E`` of one candidate (row tiles), then ``U = (E + G)/a``."""
        ps = tuple(v.reshape(1, 1, 1) for v in p)
        e = torch.empty_like(self.g)
        step = max(1, 2**19 // self.shape[1])
        for r0 in range(0, self.shape[0], step):
            r = slice(r0, min(self.shape[0], r0 + step))
            prep = tuple(t[r] for t in self.prep)
            d = self.quant.delta(self.x[r], prep, *ps, dtype=self.p.dtype)[0]
            e[r] = torch.matmul(d, self.p).float().add_(self.b[r].float())
        a = self.quant.sweep_factor(*p).float()
        self.u = e.add(self.g).div_(a)
        self.state = (view[0], p, view[1])
        self.counts["anchor"] += 1
        return (float(e.double().pow(2).sum()) + float(self.const)) / self.n

    def _sparse(self, p: tuple, view) -> float:
        """``U += (V_new − V_old) P`` over the elements between the old and new thresholds."""
        _, old, old_pos = self.state
        lo = (torch.minimum(old_pos, view[1]) - MARGIN).clamp_min(0).tolist()
        hi = (torch.maximum(old_pos, view[1]) + MARGIN).clamp_max(self.keys.numel()).tolist()
        pos = torch.cat([torch.arange(a, b) for a, b in _merged(lo, hi)])
        k = self.keys[pos]
        dv = self.quant.sweep_values(k, *p).sub_(self.quant.sweep_values(k, *old))
        keep = dv != 0
        flat, dv = self.perm[pos[keep]].long(), dv[keep]
        if dv.numel() > CSR_MAX * self.keys.numel():
            self._scatter_update(flat, dv)
        elif dv.numel():
            self._csr_update(flat, dv)
        self.state = (view[0], p, view[1])
        self.counts["sparse"] += 1
        return self._error(self.quant.sweep_factor(*p))

    def _csr_update(self, flat: torch.Tensor, dv: torch.Tensor) -> None:
        """Few changes: an fp32 sparse (CSR) product."""
        (t, k), srt = self.shape, flat.sort()
        rows, cols = srt.values.div(k, rounding_mode="floor"), srt.values % k
        crow = torch.zeros(t + 1, dtype=torch.int64)
        crow[1:] = torch.bincount(rows, minlength=t).cumsum(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            sparse = torch.sparse_csr_tensor(crow, cols, dv[srt.indices], (t, k), check_invariants=False)
        self.u.add_(sparse @ self.p32)

    def _scatter_update(self, flat: torch.Tensor, dv: torch.Tensor) -> None:
        """More changes: scatter ``ΔV`` into a zero buffer, one dense product in the scoring dtype
        (the same rounding as a dense candidate's ``Δ``), clear the buffer."""
        if self.buf is None:
            self.buf = torch.zeros(self.keys.numel(), dtype=self.p.dtype)
        self.buf.index_put_((flat,), dv.to(self.p.dtype))
        self.u.add_(torch.matmul(self.buf.view(self.shape), self.p).float())
        self.buf.index_fill_(0, flat, 0)
