"""Adaptive Computation Module forward as a grouped GEMM with per-group K (ACM, arXiv 2312.10193).

Token i executes its first k[i] learners: out_i = GELU(x_i @ W1[:, :k h] + b1[:k h]) @ W2[:k h, :]
(the prefix sum over learners is implicit in the shortened reduction). The paper buckets tokens by k
and runs both GEMMs per bucket in Triton; its code has no kernel, so the choices here are ours:

1. ``_bucket_kernel``: tokens are scattered into per-bucket lists ``perm[b, :count[b]]`` (capacity T per
   bucket, so no prefix sum over buckets is needed; a slot comes from one atomic add per program and
   bucket). Order inside a bucket is arbitrary; results do not depend on it.
2. ``_fc1_kernel``: H[tok, :k h] = GELU(X[tok] @ W1[:, :k h] + b1) for tiles of one bucket (exact erf GELU
   in float32, rounded once to the input dtype). H is kept in token order, [T, n_learners*h].
3. ``_fc2_kernel``: out[tok] = H[tok, :k h] @ W2[:k h, :]; the K loop stops at k*h. Bucket 0 runs no K
   step and writes zeros, so the output needs no memset.

Both GEMMs are persistent: a fixed grid walks the tiles that exist (sum over buckets of row tiles x
column tiles), read from the device-side counts, so nothing waits on the host and no empty program is
launched per absent (bucket, tile). k outside [0, n_learners] is clamped, which matches the definition.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from edgecompress.kernels.triton.configs import INTERPRET, cast, dot, numerics


@triton.jit
def _bucket_kernel(Kv, Counts, Perm, T, N_LEARNERS: tl.constexpr, CHUNK: tl.constexpr):
    offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)  # [CHUNK]
    valid = offs < T
    kk = tl.load(Kv + offs, mask=valid, other=0).to(tl.int32)
    kk = tl.minimum(tl.maximum(kk, 0), N_LEARNERS)
    for b in tl.static_range(N_LEARNERS + 1):
        sel = (valid & (kk == b)).to(tl.int32)
        base = tl.atomic_add(Counts + b, tl.sum(sel, 0))
        pos = base + tl.cumsum(sel, 0) - 1
        tl.store(Perm + b * T + pos, offs, mask=sel != 0)


@triton.jit
def _tile_of(item, Counts, cols_of_bucket, N_LEARNERS: tl.constexpr, L_P2: tl.constexpr,
             BLOCK_M: tl.constexpr):  # fmt: skip
    """Map a linear tile id to (bucket, row tile, column tile, rows in the bucket)."""
    buckets = tl.arange(0, L_P2)
    counts = tl.load(Counts + buckets, mask=buckets <= N_LEARNERS, other=0)  # [L_P2]
    col_tiles = cols_of_bucket  # [L_P2]
    tiles = tl.cdiv(counts, BLOCK_M) * col_tiles
    ends = tl.cumsum(tiles, 0)
    bucket = tl.sum((ends <= item).to(tl.int32), 0)
    pick = buckets == bucket
    local = item - tl.sum(tl.where(pick, ends - tiles, 0), 0)
    n_cols = tl.sum(tl.where(pick, col_tiles, 0), 0)
    return bucket, local // n_cols, local % n_cols, tl.sum(tl.where(pick, counts, 0), 0)


@triton.jit
def _total_tiles(Counts, cols_of_bucket, N_LEARNERS: tl.constexpr, L_P2: tl.constexpr, BLOCK_M: tl.constexpr):
    buckets = tl.arange(0, L_P2)
    counts = tl.load(Counts + buckets, mask=buckets <= N_LEARNERS, other=0)
    return tl.sum(tl.cdiv(counts, BLOCK_M) * cols_of_bucket, 0)


@triton.jit
def _load_tile(base, rows, cols, stride, row_ok, col_ok, EVEN_COLS: tl.constexpr):
    """[len(rows), len(cols)] tile of a row-major matrix; with EVEN_COLS only rows are masked."""
    ptrs = base + rows[:, None] * stride + cols[None, :]
    if EVEN_COLS:
        tile = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        tile = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    return tile


@triton.heuristics(
    {"EVEN_K": lambda a: a["D"] % a["BLOCK_K"] == 0, "EVEN_N": lambda a: a["HID"] % a["BLOCK_N"] == 0}
)
@triton.jit
def _fc1_kernel(
    X, W1, B1, Hbuf, Perm, Counts, T, D, HID, T_BUCKET,
    stride_xt, stride_w1, stride_ht,
    N_LEARNERS: tl.constexpr, L_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, NUMERICS: tl.constexpr,
):  # fmt: skip
    buckets = tl.arange(0, L_P2)
    cols_of_bucket = tl.cdiv(buckets * HID, BLOCK_N)  # [L_P2] column tiles of H per bucket (0 for k=0)
    total = _total_tiles(Counts, cols_of_bucket, N_LEARNERS, L_P2, BLOCK_M)
    for item in range(tl.program_id(0), total, tl.num_programs(0)):
        b, tm, tn, count = _tile_of(item, Counts, cols_of_bucket, N_LEARNERS, L_P2, BLOCK_M)
        offs_r = tm * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] slots in the bucket
        r_ok = offs_r < count
        rows = tl.load(Perm + b * T + offs_r, mask=r_ok, other=0).to(tl.int64)  # [BLOCK_M] token ids
        offs_n = tn * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] hidden units
        n_ok = offs_n < b * HID
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < D
            a = _load_tile(X, rows, offs_k, stride_xt, r_ok, k_ok, EVEN_K)  # [BLOCK_M, BLOCK_K]
            w = _load_tile(W1, offs_k, offs_n, stride_w1, k_ok, n_ok, EVEN_N)  # [BLOCK_K, BLOCK_N]
            acc = dot(a, w, acc, NUMERICS)  # [BLOCK_M, BLOCK_N]
        z = acc + tl.load(B1 + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        g = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))  # exact GELU
        h_ptrs = Hbuf + rows[:, None] * stride_ht + offs_n[None, :]
        tl.store(h_ptrs, cast(g, Hbuf.dtype.element_ty, NUMERICS), mask=r_ok[:, None] & n_ok[None, :])


@triton.heuristics(
    {"EVEN_K": lambda a: a["HID"] % a["BLOCK_K"] == 0, "EVEN_N": lambda a: a["D_OUT"] % a["BLOCK_N"] == 0}
)
@triton.jit
def _fc2_kernel(
    Hbuf, W2, Out, Perm, Counts, T, HID, D_OUT, T_BUCKET,
    stride_ht, stride_w2, stride_ot,
    N_LEARNERS: tl.constexpr, L_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, NUMERICS: tl.constexpr,
):  # fmt: skip
    buckets = tl.arange(0, L_P2)
    cols_of_bucket = tl.where(buckets <= N_LEARNERS, tl.cdiv(D_OUT, BLOCK_N), 0)  # [L_P2]
    total = _total_tiles(Counts, cols_of_bucket, N_LEARNERS, L_P2, BLOCK_M)
    for item in range(tl.program_id(0), total, tl.num_programs(0)):
        b, tm, tn, count = _tile_of(item, Counts, cols_of_bucket, N_LEARNERS, L_P2, BLOCK_M)
        offs_r = tm * BLOCK_M + tl.arange(0, BLOCK_M)
        r_ok = offs_r < count
        rows = tl.load(Perm + b * T + offs_r, mask=r_ok, other=0).to(tl.int64)  # [BLOCK_M] token ids
        offs_n = tn * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output features
        n_ok = offs_n < D_OUT
        k_len = b * HID  # this bucket's reduction length: learners 0..b-1
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, k_len, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < k_len
            a = _load_tile(Hbuf, rows, offs_k, stride_ht, r_ok, k_ok, EVEN_K)  # [BLOCK_M, BLOCK_K]
            w = _load_tile(W2, offs_k, offs_n, stride_w2, k_ok, n_ok, EVEN_N)  # [BLOCK_K, BLOCK_N]
            acc = dot(a, w, acc, NUMERICS)  # [BLOCK_M, BLOCK_N]
        o_ptrs = Out + rows[:, None] * stride_ot + offs_n[None, :]
        tl.store(o_ptrs, cast(acc, Out.dtype.element_ty, NUMERICS), mask=r_ok[:, None] & n_ok[None, :])


def _gemm_configs(wide: bool) -> list[triton.Config]:
    """Tiles for the grouped GEMMs. fc1 keeps a GELU epilogue live, so its tiles stay <= 128x128 at 8
    warps (128x128 at 4 warps and 128x256 spill registers on sm_80/sm_90 there)."""
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
        (128, 128, 64, 8, 3),
        (128, 128, 32, 8, 4),
        (128, 64, 64, 4, 3),
        (64, 128, 64, 4, 3),
        (64, 64, 64, 4, 3),
    ] + ([(128, 256, 64, 8, 3)] if wide else [])
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


_fc1_tuned = (
    None
    if INTERPRET
    else triton.autotune(_gemm_configs(False), key=["D", "HID", "N_LEARNERS", "T_BUCKET"])(_fc1_kernel)
)
_fc2_tuned = (
    None
    if INTERPRET
    else triton.autotune(_gemm_configs(True), key=["HID", "D_OUT", "N_LEARNERS", "T_BUCKET"])(_fc2_kernel)
)
_INTERPRET_CFG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}
_INTERPRET_PROGRAMS = 3  # several tiles per program, so the persistent loop is exercised


def _programs(device: torch.device) -> int:
    if INTERPRET or device.type != "cuda":
        return _INTERPRET_PROGRAMS
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def acm_mlp_fwd(
    x: torch.Tensor, k: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, n_learners: int
) -> torch.Tensor:
    """Launch bucketing and the two grouped GEMMs. x [T, d], k [T] int, w1 [d, L*h], b1 [L*h],
    w2 [L*h, d_out] -> [T, d_out] in x's dtype."""
    t, d = x.shape
    width, d_out = w2.shape
    if w1.shape != (d, width) or b1.shape != (width,) or k.shape != (t,) or width % n_learners:
        raise ValueError(f"bad ACM shapes x {tuple(x.shape)} w1 {tuple(w1.shape)} w2 {tuple(w2.shape)}")
    if (
        x.dtype not in (torch.float16, torch.bfloat16, torch.float32)
        or len({x.dtype, w1.dtype, b1.dtype, w2.dtype}) != 1
    ):
        raise ValueError(f"x, w1, b1, w2 must share a dtype in fp16/bf16/fp32, got {x.dtype}, {w1.dtype}")
    x, w1, w2 = (a if a.stride(-1) == 1 else a.contiguous() for a in (x, w1, w2))
    b1, k = b1.contiguous(), k.contiguous()
    out = torch.empty(t, d_out, dtype=x.dtype, device=x.device)  # [T, d_out]
    if t == 0 or d_out == 0:
        return out
    hid = width // n_learners
    counts = torch.zeros(n_learners + 1, dtype=torch.int32, device=x.device)  # [L+1]
    perm = torch.empty(n_learners + 1, t, dtype=torch.int32, device=x.device)  # [L+1, T] token ids
    hbuf = torch.empty(t, width, dtype=x.dtype, device=x.device)  # [T, L*h], only [:k h] written
    chunk = 1024
    _bucket_kernel[(triton.cdiv(t, chunk),)](k, counts, perm, t, N_LEARNERS=n_learners, CHUNK=chunk)

    meta = dict(
        N_LEARNERS=n_learners, L_P2=triton.next_power_of_2(n_learners + 1), NUMERICS=numerics(x.dtype)
    )
    t_bucket = t.bit_length()  # autotune key: retune per power-of-two token count
    s_h = hbuf.stride(0)
    fc1_args = (x, w1, b1, hbuf, perm, counts, t, d, hid, t_bucket, x.stride(0), w1.stride(0), s_h)
    fc2_args = (hbuf, w2, out, perm, counts, t, hid, d_out, t_bucket, s_h, w2.stride(0), out.stride(0))
    n_prog = _programs(x.device)
    if _fc1_tuned is None:
        _fc1_kernel[(n_prog,)](*fc1_args, **meta, **_INTERPRET_CFG)
        _fc2_kernel[(n_prog,)](*fc2_args, **meta, **_INTERPRET_CFG)
    else:
        _fc1_tuned[(n_prog,)](*fc1_args, **meta)
        _fc2_tuned[(n_prog,)](*fc2_args, **meta)
    return out
