"""Block-sparse FlashAttention forward (SeerAttention, arXiv 2410.13276, section 3 / its kernel).

Choices made here:
- The mask arrives as a ``BlockIndex`` (see ``edgecompress.kernels.inputs``): each program (one
  query tile of one (batch, head)) loops only over the key blocks its query block keeps, reading one
  int32 index per block. No loop over all key blocks, no per-block branch.
- Online softmax in base 2: scores are prescaled by sm_scale * log2(e) and exponentiated with exp2.
- Two loops: the kept blocks that need no element mask, then the last kept block if it needs one
  (the diagonal block under causal, or the partial last key block), walking only its sub-tiles that
  hold visible keys. Rows are sorted ascending, so such a block can only be the last entry.
- Query rows with no kept key output zeros (running max starts at a finite sentinel so fully masked
  tiles never produce NaN; a zero row sum divides into a zero accumulator).
- GQA: query head h reads key/value head h // (H // Hkv) through strides; K/V are never copied.
- Tiles: BLOCK_M divides the mask block (a program never straddles two query blocks), BLOCK_N divides
  the mask block (a kept key block is walked in BLOCK // BLOCK_N steps of one flattened loop).
- float32 inputs use IEEE dot products (no TF32) so float32 results match torch's float32.
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
LN2 = tl.constexpr(0.6931471805599453)  # used inside the kernel


@triton.jit
def _attend_tile(
    acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_d, stride_kn, stride_vn, qk_scale, N,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    LOAD_MASK: tl.constexpr, SCORE_MASK: tl.constexpr, CAUSAL: tl.constexpr, NUMERICS: tl.constexpr,
):  # fmt: skip
    offs_n = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    kt_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None]  # [D_PAD, BLOCK_N]
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]  # [BLOCK_N, D_PAD]
    if LOAD_MASK or D_PAD != HEAD_DIM:
        d_ok = offs_d < HEAD_DIM
        n_ok = offs_n < N
        kt = tl.load(kt_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        kt = tl.load(kt_ptrs)
        v = tl.load(v_ptrs)
    qk = dot(q, kt, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), NUMERICS) * qk_scale  # log2 units
    if SCORE_MASK:
        keep = offs_n[None, :] < N
        if CAUSAL:
            keep = keep & (offs_m[:, None] >= offs_n[None, :])
        qk = tl.where(keep, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))  # [BLOCK_M]
    p = tl.math.exp2(qk - m_new[:, None])  # [BLOCK_M, BLOCK_N]
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = dot(cast(p, v.dtype, NUMERICS), v, acc, NUMERICS)  # [BLOCK_M, D_PAD]
    return acc, l_i, m_new


@triton.jit
def _block_sparse_attn_kernel(
    Q, K, V, Out, Lse, Idx, Cnt, qk_scale,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    stride_ib, stride_ih, stride_iq, stride_cb, stride_ch,
    H, N, GROUP, N_KBLOCKS, N_BUCKET,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, EVEN_N: tl.constexpr, NUMERICS: tl.constexpr,
    RETURN_LSE: tl.constexpr,
):  # fmt: skip
    # heavy (late, causal) query tiles first for better load balance
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64 offsets: B*H*N*D may exceed 2**31
    h = (pid_bh % H).to(tl.int64)
    kvh = h // GROUP
    start_m = pid_m * BLOCK_M
    q_blk = start_m // BLOCK
    offs_m = start_m + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_d = tl.arange(0, D_PAD)  # [D_PAD]
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < N

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, D_PAD]
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    idx_row = Idx + b * stride_ib + h * stride_ih + q_blk * stride_iq
    count = tl.load(Cnt + b * stride_cb + h * stride_ch + q_blk)

    # the last kept block needs an element mask if it is the diagonal (causal) or the partial tail
    last = tl.load(idx_row + tl.maximum(count - 1, 0), mask=count > 0, other=-1)
    if CAUSAL:
        tail = (last == q_blk).to(tl.int32)
    elif EVEN_N:
        tail = 0
    else:
        tail = (last == N_KBLOCKS - 1).to(tl.int32)
    SUB: tl.constexpr = BLOCK // BLOCK_N
    n_plain = (count - tail) * SUB
    # of the tail block, walk only the sub-tiles that hold a key this query tile may see
    if CAUSAL:
        tail_end = tl.minimum(start_m + BLOCK_M, N)
    else:
        tail_end = N
    hi = n_plain + tl.minimum(tl.cdiv(tail_end - last * BLOCK, BLOCK_N), SUB) * tail

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite sentinel: no inf - inf
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for t in range(0, n_plain):
        start_n = tl.load(idx_row + t // SUB) * BLOCK + (t % SUB) * BLOCK_N
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_d, stride_kn, stride_vn, qk_scale, N,
            HEAD_DIM, D_PAD, BLOCK_M, BLOCK_N, not EVEN_N, False, False, NUMERICS,
        )  # fmt: skip
    for t in range(n_plain, hi):
        start_n = tl.load(idx_row + t // SUB) * BLOCK + (t % SUB) * BLOCK_N
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_d, stride_kn, stride_vn, qk_scale, N,
            HEAD_DIM, D_PAD, BLOCK_M, BLOCK_N, True, True, CAUSAL, NUMERICS,
        )  # fmt: skip

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # rows with nothing kept stay 0
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, cast(out, Out.dtype.element_ty, NUMERICS), mask=m_ok[:, None] & d_ok[None, :])
    if RETURN_LSE:  # natural-log log-sum-exp of the row's scaled scores (m_i, l_i are in base 2); -inf: none
        seen = l_i > 0.0
        lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
        tl.store(Lse + pid_bh.to(tl.int64) * N + offs_m, lse, mask=m_ok)


def _prune(configs, named_args, **kwargs):
    block = kwargs["BLOCK"]
    keep = [c for c in configs if block % c.kwargs["BLOCK_M"] == 0 and block % c.kwargs["BLOCK_N"] == 0]
    return keep or [triton.Config({"BLOCK_M": block, "BLOCK_N": block}, num_warps=4, num_stages=2)]


_tuned_kernel = (
    None
    if INTERPRET
    else triton.autotune(
        configs=attention_configs(),
        key=["HEAD_DIM", "BLOCK", "CAUSAL", "N_BUCKET"],
        prune_configs_by={"early_config_prune": _prune},
    )(_block_sparse_attn_kernel)
)


def block_sparse_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    causal: bool,
    sm_scale: float,
    block: int,
    return_lse: bool = False,
):
    """Launch the kernel. q [B, H, N, D], k/v [B, Hkv, N, D], kv_indices [B, H, nQ, W] int32,
    kv_counts [B, H, nQ] int32 (canonical layout, see ``edgecompress.kernels.inputs``). With
    ``return_lse``: ``(out, lse [B, H, N] float32)``, each row's log-sum-exp (``-inf``: nothing kept)."""
    b, h, n, d = q.shape
    hkv = k.shape[1]
    if k.shape != v.shape or k.shape[0] != b or k.shape[2:] != (n, d) or h % hkv:
        raise ValueError(f"bad attention shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype in fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    nb = num_blocks(n, block)
    if kv_indices.shape[:3] != (b, h, nb) or kv_counts.shape != (b, h, nb):
        raise ValueError(
            f"block index shapes {tuple(kv_indices.shape)} / {tuple(kv_counts.shape)} != {b, h, nb}"
        )
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    kv_indices = kv_indices.contiguous()
    kv_counts = kv_counts.contiguous()
    out = torch.empty(b, h, n, d, dtype=q.dtype, device=q.device)  # [B, H, N, D]
    lse = torch.empty(b, h, n, dtype=torch.float32, device=q.device) if return_lse else out
    if out.numel() == 0:
        return (out, lse) if return_lse else out
    meta = dict(
        HEAD_DIM=d,
        D_PAD=head_dim_pad(d),
        BLOCK=block,
        CAUSAL=bool(causal),
        EVEN_N=n % block == 0,
        NUMERICS=numerics(q.dtype),
        RETURN_LSE=bool(return_lse),
    )
    args = (
        q, k, v, out, lse, kv_indices, kv_counts, sm_scale * LOG2E,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        *kv_indices.stride()[:3], *kv_counts.stride()[:2],
        h, n, h // hkv, nb, n.bit_length(),
    )  # fmt: skip
    if _tuned_kernel is None:
        cfg = launch_config(block)
        grid = (triton.cdiv(n, cfg["BLOCK_M"]), b * h)
        _block_sparse_attn_kernel[grid](*args, **meta, **cfg)
    else:
        grid = lambda m: (triton.cdiv(n, m["BLOCK_M"]), b * h)  # noqa: E731
        _tuned_kernel[grid](*args, **meta)
    return (out, lse) if return_lse else out
