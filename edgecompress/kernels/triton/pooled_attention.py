"""Dense attention that also returns block-pooled softmax probabilities (SeerAttention, arXiv 2410.13276).

SeerAttention trains its AttnGate against a self-distilled target: for every (query block, key block)
tile, the largest softmax probability inside the tile. The probabilities need each row's final max and
sum, so one program (one query tile of one (batch, head)) makes two passes over the keys:

1. row statistics only (q @ k^T, online max and sum in base 2; no V loads),
2. exact probabilities p = exp2(s - lse): accumulate p @ V (already normalised, no rescaling) and
   fold the tile max of p into ``pooled`` with an atomic max (tiles smaller than the block, so several
   programs or key tiles may feed one entry; probabilities are >= 0 and ``pooled`` starts at 0).

Cost: three matmuls per tile instead of FlashAttention's two (about 1.5x its FLOPs); memory O(N * D)
for the output plus the [B, H, nQ, nK] pooled map; the N x N matrix is never stored. Padding rows and
columns of a partial last block, and causally masked entries, count as probability 0. The pooled map is
not row-normalised (SeerAttention normalises it in the loss). GQA as in block_sparse_attention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from edgecompress.kernels.inputs import num_blocks
from edgecompress.kernels.triton.configs import (
    INTERPRET,
    attention_configs,
    cast,
    dot,
    head_dim_pad,
    launch_config,
    numerics,
)

LOG2E = 1.4426950408889634


@triton.jit
def _scores(q, k_base, start_n, offs_m, offs_d, stride_kn, qk_scale, N,
            HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            MASKED: tl.constexpr, CAUSAL: tl.constexpr, NUMERICS: tl.constexpr):  # fmt: skip
    """Scaled base-2 scores of one [BLOCK_M, BLOCK_N] tile; with MASKED, masked entries are -inf."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kt_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None]  # [D_PAD, BLOCK_N]
    if MASKED or D_PAD != HEAD_DIM:
        kt = tl.load(kt_ptrs, mask=(offs_d[:, None] < HEAD_DIM) & (offs_n[None, :] < N), other=0.0)
    else:
        kt = tl.load(kt_ptrs)
    qk = dot(q, kt, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), NUMERICS) * qk_scale
    if MASKED:
        keep = offs_n[None, :] < N
        if CAUSAL:
            keep = keep & (offs_m[:, None] >= offs_n[None, :])
        qk = tl.where(keep, qk, float("-inf"))
    return qk


@triton.jit
def _row_stats(m_i, l_i, q, k_base, lo, hi, offs_m, offs_d, stride_kn, qk_scale, N,
               HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, NUMERICS: tl.constexpr):  # fmt: skip
    """Pass 1 over key tiles [lo, hi): online row max and row sum."""
    for start_n in range(lo, hi, BLOCK_N):
        qk = _scores(q, k_base, start_n, offs_m, offs_d, stride_kn, qk_scale, N,
                     HEAD_DIM, D_PAD, BLOCK_M, BLOCK_N, MASKED, CAUSAL, NUMERICS)  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(qk - m_new[:, None]), 1)
        m_i = m_new
    return m_i, l_i


@triton.jit
def _probs_pv(acc, lse, q, k_base, v_base, pooled_row, lo, hi, offs_m, offs_d, stride_kn, stride_vn,
              qk_scale, N, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
              EVEN_N: tl.constexpr, NUMERICS: tl.constexpr):  # fmt: skip
    """Pass 2 over key tiles [lo, hi): exact probabilities, p @ V, tile maxima into the pooled row."""
    for start_n in range(lo, hi, BLOCK_N):
        qk = _scores(q, k_base, start_n, offs_m, offs_d, stride_kn, qk_scale, N,
                     HEAD_DIM, D_PAD, BLOCK_M, BLOCK_N, MASKED, CAUSAL, NUMERICS)  # fmt: skip
        p = tl.math.exp2(qk - lse[:, None])  # [BLOCK_M, BLOCK_N]
        if not EVEN_N:
            p = tl.where(offs_m[:, None] < N, p, 0.0)  # padding rows of the last query tile
        offs_n = start_n + tl.arange(0, BLOCK_N)
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]  # [BLOCK_N, D_PAD]
        if MASKED or D_PAD != HEAD_DIM:
            v = tl.load(v_ptrs, mask=(offs_n[:, None] < N) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = dot(cast(p, v.dtype, NUMERICS), v, acc, NUMERICS)
        tl.atomic_max(pooled_row + start_n // BLOCK, tl.max(tl.max(p, 1), 0))
    return acc


@triton.jit
def _pooled_attn_kernel(
    Q, K, V, Out, Pooled, qk_scale,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    stride_pb, stride_ph, stride_pq,
    H, N, GROUP, N_BUCKET,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, EVEN_N: tl.constexpr, NUMERICS: tl.constexpr,
):  # fmt: skip
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64 offsets: B*H*N*D may exceed 2**31
    h = (pid_bh % H).to(tl.int64)
    kvh = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_d = tl.arange(0, D_PAD)  # [D_PAD]
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < N
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, D_PAD]
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    pooled_row = Pooled + b * stride_pb + h * stride_ph + (start_m // BLOCK) * stride_pq

    # key tiles [0, lo) need no element mask; [lo, hi) may (diagonal tiles, partial last tile)
    if CAUSAL:
        lo = start_m
        hi = tl.minimum(start_m + BLOCK_M, N)
    else:
        lo = (N // BLOCK_N) * BLOCK_N
        hi = N

    # pass 1: final row max and row sum
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite sentinel: no inf - inf
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i, l_i = _row_stats(m_i, l_i, q, k_base, 0, lo, offs_m, offs_d, stride_kn, qk_scale, N,
                          HEAD_DIM, D_PAD, BLOCK_M, BLOCK_N, False, CAUSAL, NUMERICS)  # fmt: skip
    m_i, l_i = _row_stats(m_i, l_i, q, k_base, lo, hi, offs_m, offs_d, stride_kn, qk_scale, N,
                          HEAD_DIM, D_PAD, BLOCK_M, BLOCK_N, True, CAUSAL, NUMERICS)  # fmt: skip
    lse = m_i + tl.math.log2(tl.where(l_i > 0.0, l_i, 1.0))  # [BLOCK_M], base 2

    # pass 2: exact probabilities -> output and pooled tile maxima
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    acc = _probs_pv(acc, lse, q, k_base, v_base, pooled_row, 0, lo, offs_m, offs_d, stride_kn, stride_vn,
                    qk_scale, N, HEAD_DIM, D_PAD, BLOCK, BLOCK_M, BLOCK_N, False, CAUSAL, EVEN_N,
                    NUMERICS)  # fmt: skip
    acc = _probs_pv(acc, lse, q, k_base, v_base, pooled_row, lo, hi, offs_m, offs_d, stride_kn, stride_vn,
                    qk_scale, N, HEAD_DIM, D_PAD, BLOCK, BLOCK_M, BLOCK_N, True, CAUSAL, EVEN_N,
                    NUMERICS)  # fmt: skip

    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, cast(acc, Out.dtype.element_ty, NUMERICS), mask=m_ok[:, None] & d_ok[None, :])


def _prune(configs, named_args, **kwargs):
    block = kwargs["BLOCK"]
    keep = [
        c
        for c in configs
        if block % c.kwargs["BLOCK_M"] == 0 and c.kwargs["BLOCK_M"] % c.kwargs["BLOCK_N"] == 0
    ]
    return keep or [triton.Config({"BLOCK_M": block, "BLOCK_N": block}, num_warps=4, num_stages=2)]


_tuned_kernel = (
    None
    if INTERPRET
    else triton.autotune(
        configs=attention_configs(),
        key=["HEAD_DIM", "BLOCK", "CAUSAL", "N_BUCKET"],
        prune_configs_by={"early_config_prune": _prune},
        reset_to_zero=["Pooled"],
    )(_pooled_attn_kernel)
)


def attention_with_pooled_probs_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, causal: bool, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel. q [B, H, N, D], k/v [B, Hkv, N, D] -> (out [B, H, N, D], pooled [B, H, nQ, nK])."""
    b, h, n, d = q.shape
    hkv = k.shape[1]
    if k.shape != v.shape or k.shape[0] != b or k.shape[2:] != (n, d) or h % hkv:
        raise ValueError(f"bad attention shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype in fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    nb = num_blocks(n, block)
    out = torch.empty(b, h, n, d, dtype=q.dtype, device=q.device)  # [B, H, N, D]
    pooled = torch.zeros(b, h, nb, nb, dtype=torch.float32, device=q.device)  # [B, H, nQ, nK]
    if out.numel() == 0:
        return out, pooled
    meta = dict(
        HEAD_DIM=d,
        D_PAD=head_dim_pad(d),
        BLOCK=block,
        CAUSAL=bool(causal),
        EVEN_N=n % block == 0,
        NUMERICS=numerics(q.dtype),
    )
    args = (
        q, k, v, out, pooled, sm_scale * LOG2E,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *pooled.stride()[:3],
        h, n, h // hkv, n.bit_length(),
    )  # fmt: skip
    if _tuned_kernel is None:
        cfg = launch_config(block)
        grid = (triton.cdiv(n, cfg["BLOCK_M"]), b * h)
        _pooled_attn_kernel[grid](*args, **meta, **cfg)
    else:
        grid = lambda m: (triton.cdiv(n, m["BLOCK_M"]), b * h)  # noqa: E731
        _tuned_kernel[grid](*args, **meta)
    return out, pooled
