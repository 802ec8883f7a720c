"""Input checks and the block-index mask layout shared by the ops, the reference and the launchers.

Block-index layout (what the block-sparse kernel iterates)
----------------------------------------------------------
``BlockIndex(indices, counts)`` lists, for every (batch, head, query block), the key blocks it keeps:

- ``indices`` ``[B, H, nQ, W]`` int32: the kept key-block indices of each row in strictly ascending
  order, then ``-1`` padding (``W`` is any width >= the largest count; ``block_mask_to_index`` uses nK),
- ``counts`` ``[B, H, nQ]`` int32: how many leading entries of each row are valid.

The kernel reads only the first ``counts`` entries of a row, so a skipped block costs nothing, not even
a mask load. Under ``causal=True`` a row must not list key blocks above its diagonal. Rows built by
``block_mask_to_index`` satisfy all of this; a hand-built index is trusted (checked for shape and dtype
only, never for content, so no device sync happens).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_SIZES = (32, 64, 128)
MAX_HEAD_DIM = 256


class BlockIndex(NamedTuple):
    """Kept key blocks per query block: ``indices`` [B, H, nQ, W] int32 (-1 padded), ``counts`` [B, H, nQ]."""

    indices: torch.Tensor
    counts: torch.Tensor


def num_blocks(n: int, block: int) -> int:
    return (n + block - 1) // block


def block_mask_to_index(block_mask: torch.Tensor, causal: bool = False) -> BlockIndex:
    """Convert a dense ``[B, H, nQ, nK]`` bool block mask to the sorted ``BlockIndex`` layout.

    With ``causal=True`` key blocks above the diagonal are dropped (the causal mask removes them anyway).
    Pure torch on the mask's device, without host synchronisation, so it is safe under torch.compile.
    """
    if block_mask.dim() != 4 or block_mask.dtype != torch.bool:
        raise ValueError(
            f"block_mask must be a 4-D bool tensor [B, H, nQ, nK], got {block_mask.dtype} "
            f"with shape {tuple(block_mask.shape)}"
        )
    n_q, n_k = block_mask.shape[-2:]
    if causal:
        tril = torch.ones(n_q, n_k, dtype=torch.bool, device=block_mask.device).tril()
        block_mask = block_mask & tril  # [B, H, nQ, nK]
    counts = block_mask.sum(-1, dtype=torch.int32)  # [B, H, nQ]
    cols = torch.arange(n_k, device=block_mask.device)  # [nK]
    keys = torch.where(block_mask, cols, cols + n_k)  # kept blocks sort first, in ascending order
    keys = keys.sort(dim=-1).values  # [B, H, nQ, nK]
    indices = torch.where(keys < n_k, keys, -1).to(torch.int32)
    return BlockIndex(indices.contiguous(), counts.contiguous())


def index_to_block_mask(index: BlockIndex, n_kblocks: int) -> torch.Tensor:
    """Inverse of ``block_mask_to_index``: ``[B, H, nQ, nK]`` bool mask of the listed blocks."""
    indices, counts = index
    width = indices.shape[-1]
    slots = torch.arange(width, device=indices.device)  # [W]
    valid = (slots < counts[..., None]) & (indices >= 0) & (indices < n_kblocks)  # [B, H, nQ, W]
    target = torch.where(valid, indices.long(), n_kblocks)  # invalid entries land in a spare column
    mask = torch.zeros(*indices.shape[:-1], n_kblocks + 1, dtype=torch.bool, device=indices.device)
    mask.scatter_(-1, target, True)
    return mask[..., :n_kblocks]


def _check_dtypes(names: str, tensors: tuple[torch.Tensor, ...], allow_fp64: bool) -> None:
    allowed = KERNEL_DTYPES + ((torch.float64,) if allow_fp64 else ())
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1:
        raise ValueError(f"{names} must share one dtype, got {[t.dtype for t in tensors]}")
    if tensors[0].dtype not in allowed:
        raise ValueError(f"{names} dtype must be one of {allowed}, got {tensors[0].dtype}")
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"{names} must be on one device, got {[str(t.device) for t in tensors]}")


def check_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, allow_fp64: bool = False
) -> tuple[int, int, int, int, int]:
    """Validate q [B, H, N, D], k/v [B, Hkv, N, D] with H % Hkv == 0; returns (B, H, Hkv, N, D)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor [B, heads, N, D], got {shape}")
    _check_dtypes("q, k, v", (q, k, v), allow_fp64)
    b, h, n, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    bk, hkv, nk, dk = k.shape
    if bk != b or nk != n:
        raise ValueError(f"k/v must be [B={b}, Hkv, N={n}, D], got {tuple(k.shape)} for q {tuple(q.shape)}")
    if dk != d:
        raise ValueError(f"head dims differ: q has D={d}, k/v have D={dk}")
    if hkv == 0 or h % hkv != 0:
        raise ValueError(f"query heads H={h} must be a multiple of key/value heads Hkv={hkv} (GQA)")
    if not allow_fp64 and not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D={d} not supported by the kernels (1..{MAX_HEAD_DIM})")
    if block not in BLOCK_SIZES:
        raise ValueError(f"block must be one of {BLOCK_SIZES}, got {block}")
    return b, h, hkv, n, d


def check_block_mask(
    block_mask: torch.Tensor | BlockIndex, b: int, h: int, n: int, block: int, device: torch.device
) -> None:
    """Validate a dense bool block mask or a BlockIndex against q's shape."""
    nb = num_blocks(n, block)
    if isinstance(block_mask, BlockIndex):
        indices, counts = block_mask
        if indices.dim() != 4 or tuple(indices.shape[:3]) != (b, h, nb):
            raise ValueError(
                f"BlockIndex.indices must be [B={b}, H={h}, nQ={nb}, W], got {tuple(indices.shape)}"
            )
        if tuple(counts.shape) != (b, h, nb):
            raise ValueError(f"BlockIndex.counts must be [B={b}, H={h}, nQ={nb}], got {tuple(counts.shape)}")
        if indices.dtype != torch.int32 or counts.dtype != torch.int32:
            raise ValueError(f"BlockIndex tensors must be int32, got {indices.dtype} and {counts.dtype}")
        tensors = (indices, counts)
    elif isinstance(block_mask, torch.Tensor):
        if block_mask.dtype != torch.bool:
            raise ValueError(f"block_mask must be a bool tensor, got {block_mask.dtype}")
        if tuple(block_mask.shape) != (b, h, nb, nb):
            raise ValueError(
                f"block_mask must be [B={b}, H={h}, ceil(N/block)={nb}, {nb}] for N={n}, block={block}; "
                f"got {tuple(block_mask.shape)}"
            )
        tensors = (block_mask,)
    else:
        raise ValueError(f"block_mask must be a bool tensor or a BlockIndex, got {type(block_mask).__name__}")
    if any(t.device != device for t in tensors):
        raise ValueError(f"block mask must be on {device}, got {[str(t.device) for t in tensors]}")


def resolve_scale(sm_scale: float | None, d: int) -> float:
    return 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)


def check_acm(
    x: torch.Tensor,
    k: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    n_learners: int,
    allow_fp64: bool = False,
) -> tuple[int, int, int, int]:
    """Validate the ACM inputs; returns (T, d, h, d_out) with h the width of one learner."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [T, d], got shape {tuple(x.shape)}")
    t, d = x.shape
    if k.dim() != 1 or k.shape[0] != t:
        raise ValueError(f"k must be 1-D [T={t}], got shape {tuple(k.shape)}")
    if k.dtype.is_floating_point or k.dtype.is_complex or k.dtype == torch.bool:
        raise ValueError(f"k must be an integer tensor, got {k.dtype}")
    if not isinstance(n_learners, int) or n_learners < 1:
        raise ValueError(f"n_learners must be a positive int, got {n_learners!r}")
    if w1.dim() != 2 or w1.shape[0] != d or w1.shape[1] % n_learners != 0 or w1.shape[1] == 0:
        raise ValueError(
            f"w1 must be [d={d}, n_learners*h] with n_learners={n_learners}, got {tuple(w1.shape)}"
        )
    width = w1.shape[1]
    if b1.dim() != 1 or b1.shape[0] != width:
        raise ValueError(f"b1 must be [{width}], got {tuple(b1.shape)}")
    if w2.dim() != 2 or w2.shape[0] != width:
        raise ValueError(f"w2 must be [{width}, d_out], got {tuple(w2.shape)}")
    _check_dtypes("x, w1, b1, w2", (x, w1, b1, w2), allow_fp64)
    if k.device != x.device:
        raise ValueError(f"k must be on {x.device}, got {k.device}")
    return t, d, width // n_learners, w2.shape[1]
