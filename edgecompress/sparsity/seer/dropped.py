"""``dropped: mean`` — each dropped key block's share of the attention estimated from its mean key and
value, instead of being left out (an option of ours; SeerAttention itself skips dropped blocks).

Why: on an encoder whose attention is spread over the sequence (``demo:minilm`` at 512 tokens), the
dropped blocks still hold ~18 % of every row's softmax mass at density 0.5, and skipping them
renormalises that mass onto the kept blocks. Measured with the oracle block choice (the blocks of
largest true mass, per-row top-k; masked-dense form; 8 windows of 512 built-in test tokens;
``benchmarks/seer_dropped.py --parts oracle``, 2026-12-06), embedding cosine to dense at density
0.5 / 0.3 / 0.1: block 16, skip 0.9750 / 0.9323 / 0.7968, mean 0.9919 / 0.9778 / 0.9291; block 32,
skip 0.9659 / 0.9120 / 0.7212, mean 0.9866 / 0.9639 / 0.8738. With random blocks it changes little
(density 0.5, block 16: 0.9736 → 0.9745; static local + global: 0.9629 → 0.9727): the estimate is
good for blocks whose keys are alike, which is what a good gate drops.

The estimate, per query row ``i`` and dropped block ``j`` (keys ``K_j``, values ``V_j``):
``Σ_{t∈j} exp(s·q_i·k_t + b_it) v_t ≈ exp(s·q_i·k̄_j + β_ij) v̄_j`` with ``k̄_j``, ``v̄_j`` the means
over the block's real keys and ``β_ij = log Σ_{t∈j} exp(b_it)`` (``log`` of the block's real-key
count where the model's mask is only padding: the block acts as that many copies of its mean key —
Jensen's lower bound of the block's softmax weight). The dropped blocks are thus one extra key each,
at ``1/block`` of a kept block's cost, and join the kept blocks' softmax through the log-sum-exp:
:func:`merge` combines a form's ``(out, lse)`` over the kept blocks with :func:`dropped_part`'s. A
decoder's row never estimates its own or later blocks (they would leak future keys): only blocks
wholly before it. Forms (:mod:`.core`): the C++ kernel (:mod:`.cpp`, the CPU default) puts the
estimates into each row's softmax itself (``nb`` more score columns per row, two more small
brgemms per query block); the masked-dense reference, ``tiled`` and ``gathered`` return their
log-sum-exp and :func:`dropped_part` is merged in (chunked over query blocks so its scores stay in
cache); ``flex`` hands over to ``tiled``; the Triton kernel returns its log-sum-exp too (tested
with ``TRITON_INTERPRET=1``; on a GPU unverified here). The cost, measured against skipping
(``benchmarks/seer_dropped.py --parts speed``, 2-core Xeon, 2 threads, block 64, under the bench
lock at load ~5, 2026-12-06): the C++ kernel with estimates over without, 0.86-1.06x at densities
0.5 and 0.3 (noise) and 0.99-1.29x at 0.1, 4k and 16k tokens; merging the PyTorch estimates into the
kernel's output instead cost 1.2-2.2x (an earlier, in-place version of :func:`dropped_part`; why the
kernel does it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgecompress.sparsity.seer.gate import num_blocks, pool_blocks

DROPPED = ("skip", "mean")
CHUNK_BYTES = 2 << 20  # the estimates' scores of one chunk of query blocks: they stay in cache


def safe_lse(s: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over the last dim with ``-inf`` (not NaN) for rows that are all ``-inf`` — in
    eager PyTorch and in an exported graph alike."""
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return _log((s - m).exp().sum(-1)) + m[..., 0]


def _log(total: torch.Tensor) -> torch.Tensor:
    """``log`` with ``-inf`` at 0 whose gradient there is 0, not NaN (a row with nothing to sum)."""
    return torch.where(total > 0, total.clamp(min=1e-30).log(), float("-inf"))


def block_means(k: torch.Tensor, v: torch.Tensor, block: int, valid=None):
    """``(k̄, v̄, count)``: per key block the mean key and value over its real keys ``[B, Hkv, nb, D]``
    (float32, the gate's own average pooling; zero for a block without one) and the count of real
    keys ``[B, nb]``."""
    b, _, n, _ = k.shape
    nb = num_blocks(n, block)
    real = torch.ones(b, n, device=k.device) if valid is None else valid.float()
    count = F.pad(real, (0, nb * block - n)).view(b, nb, block).sum(-1)
    return (
        pool_blocks(k.float(), block, valid, ("avg",)),
        pool_blocks(v.float(), block, valid, ("avg",)),
        count,
    )


def _row_beta(bias, valid, n: int, nb: int, block: int) -> torch.Tensor:
    """``[B|1, H|1, nb·block, nb]``: per query row and key block, ``log Σ exp(bias)`` over its real keys."""
    from edgecompress.sparsity.seer.execute import additive

    bb = additive(bias, torch.float32).float()
    bb = bb.reshape((1,) * (4 - bb.dim()) + tuple(bb.shape)).expand(-1, -1, n, n)
    if valid is not None:
        bb = bb.masked_fill(~valid[:, None, None, :], float("-inf"))
    bb = F.pad(bb, (0, nb * block - n, 0, nb * block - n), value=float("-inf"))
    return safe_lse(bb.reshape(*bb.shape[:3], nb, block))


def dropped_part(q, k, v, keep, causal: bool, scale: float, block: int, valid=None, bias=None,
                 chunk_bytes: int = CHUNK_BYTES):  # fmt: skip
    """``(out, lse)`` ``[B, H, N, D]`` / ``[B, H, N]`` of the dropped blocks' estimates (module
    docstring); ``bias`` the model's additive mask beyond ``valid`` (float or bool, broadcastable to
    ``[B, H, N, N]``) or None. Rows estimating nothing: out 0, lse ``-inf``. The scores ``[.., nb]``
    of a chunk of query blocks (``chunk_bytes``) are built, exponentiated and reduced chunk by chunk;
    differentiable (the masked-dense reference and this run under autograd)."""
    b, h, n, d = q.shape
    group = h // k.shape[1]
    kbar, vbar, count = block_means(k, v, block, valid)
    kbar, vbar = kbar.repeat_interleave(group, dim=1), vbar.repeat_interleave(group, dim=1)
    nb = kbar.shape[2]
    pad = nb * block - n
    i = torch.arange(nb, device=q.device)
    ok = ~keep if not causal else ~keep & (i[None, :] < i[:, None])  # [B, H, nb rows, nb cols]
    if bias is None:  # one additive term per (row block, key block): log count, or -inf
        add = torch.where(ok, count.log()[:, None, None, :], float("-inf"))[:, :, :, None, :]
        beta = None
    else:
        add = torch.where(ok, 0.0, float("-inf"))[:, :, :, None, :]
        beta = _row_beta(bias, valid, n, nb, block).view(*_bh(bias, b, h), nb, block, nb)
    qs = q.float() * scale
    if pad:
        qs = F.pad(qs, (0, 0, 0, pad))
    qs = qs.view(b, h, nb, block, d)
    out = qs.new_empty(b, h, nb, block, d)
    lse = qs.new_empty(b, h, nb, block)
    rows = max(1, chunk_bytes // max(1, b * h * block * nb * 4))
    for r0 in range(0, nb, rows):
        r1 = min(nb, r0 + rows)
        s = (
            torch.matmul(qs[:, :, r0:r1], kbar[:, :, None].transpose(-1, -2)) + add[:, :, r0:r1]
        )  # [B, H, R, bs, nb]
        if beta is not None:
            s = s + beta[:, :, r0:r1]
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, 0.0)
        p = (s - m).exp()  # out of place: a later pass may train through the core (autograd)
        total = p.sum(-1)  # [B, H, R, bs]
        out[:, :, r0:r1] = torch.matmul(p, vbar[:, :, None]) / total.clamp(min=1e-30)[..., None]
        lse[:, :, r0:r1] = _log(total) + m[..., 0]
    out, lse = out.view(b, h, nb * block, d), lse.view(b, h, nb * block)
    return (out[:, :, :n], lse[:, :, :n]) if pad else (out, lse)


def _bh(bias, b: int, h: int) -> tuple[int, int]:
    """The batch and head sizes of ``bias`` once broadcast to 4-D (1 where it broadcasts)."""
    shape = (1,) * (4 - bias.dim()) + tuple(bias.shape)
    return shape[0], shape[1]


def merge(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """Softmax attention over the union of two disjoint key sets, from each part's output ``[..., N, D]``
    and log-sum-exp ``[..., N]`` (``-inf``: the part saw no key); in ``o1``'s dtype."""
    m = torch.maximum(l1, l2)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w1, w2 = (l1 - m).exp()[..., None], (l2 - m).exp()[..., None]
    out = (o1.float() * w1 + o2.float() * w2) / (w1 + w2).clamp(min=1e-30)
    return out.to(o1.dtype)
