"""The forms of block-sparse attention once the kept blocks are known, and the gate's training target.

Inputs: ``q`` ``[B, H, N, D]``, ``k``/``v`` ``[B, Hkv, N, D]`` (GQA: query head ``h`` reads K/V head
``h // (H / Hkv)``), ``keep`` ``[B, H, nb, nb]`` bool, ``valid`` ``[B, N]`` the real (not padding)
keys (``None``: all), ``bias`` an additive float or a bool mask broadcastable to ``[B, H, N, N]``
beyond that (``None``: none; :func:`simplify_bias` splits the model's mask into the two), ``causal``
(keys after the query masked element-wise, inside the diagonal block too). A query row with no
kept key outputs zeros.

* :func:`masked_dense` — the reference (oracle): every score computed, the dropped blocks masked;
* :func:`gathered` — the CPU form that skips the work: per chunk of query blocks, the kept K/V
  blocks are gathered (one ``index_select`` each) and the chunk runs PyTorch's fused
  ``scaled_dot_product_attention`` (its CPU flash kernel) against them, with an element mask only
  where one is needed (the causal diagonal, a partial last block, padding, a bias). Cost: the
  kept blocks' FLOPs plus one copy of their K/V. Chosen over per-block matmuls with an explicit
  softmax and over FlexAttention compiled for the CPU, measured in ``benchmarks/seer.py``;
* the Triton kernel :func:`edgecompress.kernels.block_sparse_attention` (index-list masks: a skipped
  block costs nothing) on CUDA, where there is no bias beyond the causal mask;
* :func:`dense` — PyTorch SDPA, for sequences below the pass's ``min_seq_len`` and rows that keep
  every block.

:func:`pooled_truth` is the self-distillation target: dense attention and, per (query block, key
block), the largest softmax probability in the tile, row-normalised over key blocks (padding query
rows left out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgecompress.kernels.inputs import BLOCK_SIZES, block_mask_to_index
from edgecompress.kernels.reference import element_mask
from edgecompress.sparsity.seer.gate import num_blocks

GATHER_BYTES = 64 << 20  # gathered K and V per chunk of query blocks


def additive(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool mask (True = attend) as 0 / -inf; a float bias as it is."""
    if bias is None or bias.dtype != torch.bool:
        return bias
    return torch.zeros(bias.shape, dtype=dtype, device=bias.device).masked_fill(~bias, float("-inf"))


def attend_mask(bias: torch.Tensor) -> torch.Tensor:
    """Where a bias lets a query attend: True entries of a bool mask, entries above half the float minimum."""
    if bias.dtype == torch.bool:
        return bias
    return bias > torch.finfo(bias.dtype).min / 2


def simplify_bias(bias: torch.Tensor | None, causal: bool, n: int):
    """``(bias, valid)``: ``valid`` ``[B|1, N]`` the keys some query may see (None: all) and the bias, or
    None where the causal structure and ``valid`` say all it says (a padding mask). One pass over it."""
    if bias is None:
        return None, None
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    ok = attend_mask(bias)  # [B|1, H|1, N|1, N]
    valid = ok.any(dim=1).any(dim=1)  # [B|1, N]
    plain = bias.dtype == torch.bool or not bool((bias.masked_fill(~ok, 0) != 0).any())
    if plain:
        structure = torch.ones(n, n, dtype=torch.bool, device=bias.device)
        structure = structure.tril() if causal else structure
        if bool((ok == (structure & valid[:, None, None, :])).all()):
            bias = None
    return bias, (None if bool(valid.all()) else valid)


def dense(q, k, v, bias, causal: bool, scale: float) -> torch.Tensor:
    """PyTorch SDPA (fused on CPU and GPU), K/V heads shared for GQA; ``bias`` is the model's own mask."""
    mask = additive(bias, q.dtype)
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=causal and mask is None,
        scale=scale,
        enable_gqa=k.shape[1] != q.shape[1],
    )


def masked_dense(q, k, v, keep, bias, causal: bool, scale: float, block: int, valid=None) -> torch.Tensor:
    """Reference: all scores, the dropped blocks, the causal upper triangle and padding keys set to -inf."""
    n = q.shape[2]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = (q.float() @ k.float().transpose(-1, -2)) * scale  # [B, H, N, N]
    if bias is not None:
        s = s + additive(bias, s.dtype)
    mask = element_mask(keep, n, block, causal)
    if valid is not None:
        mask = mask & valid[:, None, None, :]
    p = s.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(nan=0.0)  # rows with nothing kept: 0
    return (p @ v.float()).to(q.dtype)


def _row_chunks(widths: list[int], per_slot: int, budget: int) -> list[tuple[int, int, int]]:
    """Contiguous ranges ``(r0, r1, width)`` of query blocks whose gathered K/V stay within ``budget``."""
    out, r0 = [], 0
    while r0 < len(widths):
        r1, w = r0 + 1, widths[r0]
        while r1 < len(widths) and (r1 + 1 - r0) * max(w, widths[r1]) * per_slot <= budget:
            w = max(w, widths[r1])
            r1 += 1
        out.append((r0, r1, w))
        r0 = r1
    return out


def _chunk_mask(idx, counts, r0, r1, n, block, causal, bias, valid, dtype):
    """Additive mask of one chunk ``[B, H, R, block or 1, W·block]`` (0 / -inf, plus a bias); None if every
    gathered key is visible to every query of the chunk. Without a causal mask or a bias it does not
    depend on the query (one row, broadcast by SDPA)."""
    b, h, r, w = idx.shape
    offs = torch.arange(block, device=idx.device)
    kpos = (idx.clamp(min=0)[..., None] * block + offs).reshape(b, h, r, w * block)  # [B, H, R, W*bs]
    slot_ok = (torch.arange(w, device=idx.device) < counts[..., None]).repeat_interleave(block, dim=-1)
    ok = slot_ok & (kpos < n)
    if valid is not None:  # padding keys
        ok = ok & valid.gather(-1, kpos.clamp(max=n - 1).reshape(b, -1)).view(b, h, r, w * block)
    ok = ok[:, :, :, None, :]  # [B, H, R, 1, W*bs]
    qpos = (torch.arange(r0, r1, device=idx.device)[:, None] * block + offs).reshape(1, 1, r, block, 1)
    if causal:
        ok = ok & (kpos[:, :, :, None, :] <= qpos)
    if bias is None:
        return (
            None
            if bool(ok.all())
            else torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill(~ok, float("-inf"))
        )
    full = bias.expand(b, h, n, n)
    qidx = qpos.clamp(max=n - 1).reshape(1, 1, r * block, 1).expand(b, h, r * block, n)
    rows = full.gather(2, qidx).view(b, h, r, block, n)  # [B, H, R, bs, N]
    vals = rows.gather(-1, kpos.clamp(max=n - 1)[:, :, :, None, :].expand(b, h, r, block, w * block))
    return additive(vals, dtype).masked_fill(~ok, float("-inf"))


def gathered(
    q, k, v, keep, bias, causal: bool, scale: float, block: int, valid=None, budget: int = GATHER_BYTES
) -> torch.Tensor:
    """CPU form: per chunk of query blocks, SDPA against the gathered kept K/V blocks (module docstring)."""
    b, h, n, d = q.shape
    hkv, nb = k.shape[1], num_blocks(n, block)
    pad = nb * block - n
    index = block_mask_to_index(keep, causal)  # ascending kept blocks per row, -1 padded
    widths = index.counts.amax(dim=(0, 1)).tolist()  # [nb] (one host sync)
    kb, vb, qb = (F.pad(t, (0, 0, 0, pad)) if pad else t for t in (k, v, q))
    kb, vb = kb.reshape(b * hkv * nb, block, d), vb.reshape(b * hkv * nb, block, d)
    qb = qb.reshape(b, h, nb, block, d)
    heads = torch.arange(b, device=q.device)[:, None] * hkv + torch.arange(h, device=q.device) // (h // hkv)
    base = (heads * nb)[:, :, None, None]  # [B, H, 1, 1] first block of each query head's K/V head
    out = q.new_zeros(b, h, nb, block, d)
    per_slot = 2 * b * h * block * d * q.element_size()
    for r0, r1, w in _row_chunks(widths, per_slot, budget):
        if w == 0:
            continue
        r = r1 - r0
        idx, counts = index.indices[:, :, r0:r1, :w], index.counts[:, :, r0:r1]
        lin = (base + idx.clamp(min=0)).reshape(-1)
        kg = kb.index_select(0, lin).view(b, h * r, w * block, d)
        vg = vb.index_select(0, lin).view(b, h * r, w * block, d)
        mask = _chunk_mask(idx, counts, r0, r1, n, block, causal, bias, valid, q.dtype)
        if mask is not None:
            mask = mask.reshape(b, h * r, mask.shape[3], w * block)
        qc = qb[:, :, r0:r1].reshape(b, h * r, block, d)
        o = F.scaled_dot_product_attention(qc, kg, vg, attn_mask=mask, scale=scale)
        if mask is not None:  # rows with no visible key: 0, as the reference
            o = o.nan_to_num(nan=0.0)
        out[:, :, r0:r1] = o.view(b, h, r, block, d)
    return out.view(b, h, nb * block, d)[:, :, :n]


def triton_ok(q: torch.Tensor, bias, valid, block: int) -> bool:
    """Whether the Triton kernel can run this call: CUDA, no mask beyond the causal one, its block sizes."""
    from edgecompress.kernels.ops import HAS_TRITON, INTERPRET

    return (
        HAS_TRITON and q.is_cuda and not INTERPRET and bias is None and valid is None and block in BLOCK_SIZES
    )


def triton(q, k, v, keep, causal: bool, scale: float, block: int) -> torch.Tensor:
    from edgecompress.kernels import block_sparse_attention

    return block_sparse_attention(q, k, v, block_mask_to_index(keep, causal), causal, scale, block=block)


def pooled_truth(q, k, v, bias, causal: bool, scale: float, block: int, valid=None):
    """``(out, truth)``: dense attention ``[B, H, N, D]`` and the row-normalised block-max of its softmax
    ``[B, H, nb, nb]`` (float32). On CUDA without a bias: the fused kernel
    :func:`edgecompress.kernels.attention_with_pooled_probs`; else the same quantity from the explicit
    probabilities (this twin is tested against the kernel)."""
    n = q.shape[2]
    from edgecompress.kernels.ops import HAS_TRITON, INTERPRET

    if HAS_TRITON and q.is_cuda and not INTERPRET and bias is None and valid is None and block in BLOCK_SIZES:
        from edgecompress.kernels import attention_with_pooled_probs

        out, pooled = attention_with_pooled_probs(q, k, v, block, causal, scale)
        return out, _normalise(pooled)
    group = q.shape[1] // k.shape[1]
    s = (q.float() @ k.repeat_interleave(group, dim=1).float().transpose(-1, -2)) * scale
    if bias is not None:
        s = s + additive(bias, s.dtype)
    if causal:
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if valid is not None:
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = s.softmax(-1).nan_to_num(nan=0.0)  # [B, H, N, N]
    out = (p @ v.repeat_interleave(group, dim=1).float()).to(q.dtype)
    if valid is not None:  # padding queries and keys are no part of the target
        p = p * (valid[:, None, :, None] & valid[:, None, None, :])
    nb = num_blocks(n, block)
    pad = nb * block - n
    pooled = F.pad(p, (0, pad, 0, pad)).view(*p.shape[:2], nb, block, nb, block).amax(dim=(3, 5))
    return out, _normalise(pooled)


def _normalise(pooled: torch.Tensor) -> torch.Tensor:
    total = pooled.sum(-1, keepdim=True)
    return torch.where(total > 0, pooled / total.clamp(min=1e-30), 0.0)
