"""The forms of block-sparse attention once the kept blocks are known, and the gate's training target.

Inputs: ``q`` ``[B, H, N, D]``, ``k``/``v`` ``[B, Hkv, N, D]`` (GQA: query head ``h`` reads K/V head
``h // (H / Hkv)``), ``keep`` ``[B, H, nb, nb]`` bool, ``valid`` ``[B, N]`` the real (not padding)
keys (``None``: all), ``bias`` an additive float or a bool mask broadcastable to ``[B, H, N, N]``
beyond that (``None``: none; :func:`simplify_bias` splits the model's mask into the two), ``causal``
(keys after the query masked element-wise, inside the diagonal block too). A query row with no
kept key outputs zeros.

* :func:`masked_dense` — the reference (oracle): every score computed, the dropped blocks masked;
* :func:`gathered` — a CPU form that skips the work without compiling: per chunk of query blocks
  (a cache-sized chunk, into buffers allocated once per call), the kept K/V blocks are gathered (one
  ``index_select`` each) and the chunk runs PyTorch's fused CPU flash-attention kernel against
  them, with a mask only where one is needed (a partial last block, padding, a bias). Decoders run
  each row's diagonal block apart with the kernel's own causal mask and merge the two parts by
  their log-sum-exp, so no query-dependent mask is built. Measured on the 2-core Xeon
  (``benchmarks/seer.py --parts forms``, 2026-12-06): 0.16-0.37x SDPA at 30 % density, 4k and 16k
  tokens, where FlexAttention (:mod:`.flex`) was 1.1-1.4x; the core runs this form only with a
  model bias (the C++ kernel :mod:`.cpp` and the batched :mod:`.tiled` form are its CPU forms);
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
from edgecompress.sparsity.seer.dropped import merge, safe_lse
from edgecompress.sparsity.seer.gate import num_blocks

GATHER_BYTES = 16 << 20  # gathered K and V per chunk of query blocks (cache-sized; buffers reused)


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


def masked_dense(q, k, v, keep, bias, causal: bool, scale: float, block: int, valid=None, lse: bool = False):
    """Reference: all scores, the dropped blocks, the causal upper triangle and padding keys set to -inf.
    With ``lse``: ``(out, logsumexp [B, H, N])`` (``-inf`` for a row with nothing kept)."""
    n = q.shape[2]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = (q.float() @ k.float().transpose(-1, -2)) * scale  # [B, H, N, N]
    if bias is not None:
        s = s + additive(bias, s.dtype)
    mask = element_mask(keep, n, block, causal)
    if valid is not None:
        mask = mask & valid[:, None, None, :]
    s = s.masked_fill(~mask, float("-inf"))
    p = s.softmax(-1).nan_to_num(nan=0.0)  # rows with nothing kept: 0
    out = (p @ v.float()).to(q.dtype)
    return (out, safe_lse(s)) if lse else out


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


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _attend(q, k, v, mask, causal: bool, scale: float):
    """``(out, logsumexp)`` of softmax attention: PyTorch's fused CPU flash kernel (which returns the
    row log-sum-exp), else explicit matmuls. Rows with no visible key give out 0 (their lse is unused)."""
    if _FLASH_CPU is not None and q.device.type == "cpu":
        return _FLASH_CPU(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
    s = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(), float("-inf"))
    lse = s.logsumexp(-1)
    return (s - lse[..., None]).exp().nan_to_num(nan=0.0) @ v, lse


def _merge(o1, l1, has1, o2, l2, has2):
    """Softmax over the union of two disjoint key sets from each part's output and log-sum-exp."""
    return merge(o1, l1.masked_fill(~has1, float("-inf")), o2, l2.masked_fill(~has2, float("-inf")))


def _diagonal_part(qc, kb5, vb5, head, r0, r1, n, valid, scale):
    """Each query block against its own key block, causal inside it: ``(out, lse)`` ``[B, H*R, bs, ...]``."""
    b, hr, block, d = qc.shape
    kd = kb5[:, head, r0:r1].reshape(b, hr, block, d)  # [B, H*R, bs, D] (GQA: the query head's K/V head)
    vd = vb5[:, head, r0:r1].reshape(b, hr, block, d)
    if valid is None:  # keys past N sit after every real query: the causal mask hides them
        return _attend(qc, kd, vd, None, True, scale)
    kpos = torch.arange(r0 * block, r1 * block, device=qc.device)
    ok = F.pad(valid, (0, kb5.shape[2] * block - valid.shape[1]))[:, kpos].view(b, 1, r1 - r0, 1, block)
    ok = ok & torch.ones(block, block, dtype=torch.bool, device=qc.device).tril()
    mask = torch.zeros(ok.shape, dtype=qc.dtype, device=qc.device).masked_fill(~ok, float("-inf"))
    mask = mask.expand(b, hr // (r1 - r0), r1 - r0, block, block).reshape(b, hr, block, block)
    return _attend(qc, kd, vd, mask, False, scale)


def gathered(
    q, k, v, keep, bias, causal: bool, scale: float, block: int, valid=None, budget: int = GATHER_BYTES,
    lse: bool = False,
):  # fmt: skip
    """CPU form: per chunk of query blocks, SDPA against the gathered kept K/V blocks (module docstring).

    Decoders without a bias run each row's diagonal block apart (causal inside it) and merge it with the
    row's other blocks by their log-sum-exp, so no query-dependent mask is built. Under autograd (a later
    pass training through the core) the masked-dense form runs instead. With ``lse``: ``(out, logsumexp)``
    as :func:`masked_dense` gives them."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return masked_dense(q, k, v, keep, bias, causal, scale, block, valid, lse)
    b, h, n, d = q.shape
    hkv, nb = k.shape[1], num_blocks(n, block)
    pad = nb * block - n
    split = causal and bias is None
    eye = torch.eye(nb, dtype=torch.bool, device=q.device)
    diag = (keep & eye).any(-1) if split else None  # [B, H, nb]
    index = block_mask_to_index(keep & ~eye if split else keep, causal)  # ascending kept blocks, -1 padded
    widths = index.counts.amax(dim=(0, 1)).tolist()  # [nb] (one host sync)
    kb, vb, qb = (F.pad(t, (0, 0, 0, pad)) if pad else t for t in (k, v, q))
    kb5, vb5 = kb.reshape(b, hkv, nb, block, d), vb.reshape(b, hkv, nb, block, d)
    kb, vb = kb5.reshape(b * hkv * nb, block, d), vb5.reshape(b * hkv * nb, block, d)
    qb = qb.reshape(b, h, nb, block, d)
    head = torch.arange(h, device=q.device) // (h // hkv)
    base = ((torch.arange(b, device=q.device)[:, None] * hkv + head) * nb)[:, :, None, None]  # [B, H, 1, 1]
    out = q.new_zeros(b, h, nb, block, d)
    lout = q.new_full((b, h, nb, block), float("-inf"), dtype=torch.float32) if lse else None
    per_slot = 2 * b * h * block * d * q.element_size()
    chunks = _row_chunks(widths, per_slot, budget)
    slots = max([b * h * (r1 - r0) * w for r0, r1, w in chunks] + [1])
    kbuf, vbuf = (
        q.new_empty(slots, block, d),
        q.new_empty(slots, block, d),
    )  # reused: no page faults per chunk
    for r0, r1, w in chunks:
        r = r1 - r0
        qc = qb[:, :, r0:r1].reshape(b, h * r, block, d)
        counts = index.counts[:, :, r0:r1]
        if w:
            idx = index.indices[:, :, r0:r1, :w]
            lin = (base + idx.clamp(min=0)).reshape(-1)
            kg = torch.index_select(kb, 0, lin, out=kbuf[: lin.numel()]).view(b, h * r, w * block, d)
            vg = torch.index_select(vb, 0, lin, out=vbuf[: lin.numel()]).view(b, h * r, w * block, d)
            mask = _chunk_mask(idx, counts, r0, r1, n, block, causal and not split, bias, valid, q.dtype)
            if mask is not None:
                mask = mask.reshape(b, h * r, mask.shape[3], w * block)
        has_r = (counts > 0).reshape(b, h * r, 1)
        o_r, l_r = _attend(qc, kg, vg, mask, False, scale) if w else (qc.new_zeros(qc.shape), None)
        if not split:
            o, lc = o_r, (l_r.masked_fill(~has_r, float("-inf")) if w else None)
        else:
            od, ld = _diagonal_part(qc, kb5, vb5, head, r0, r1, n, valid, scale)
            has_d = diag[:, :, r0:r1].reshape(b, h * r, 1)
            o = _merge(o_r, l_r, has_r, od, ld, has_d) if w else od * has_d[..., None]
            ld = ld.float().masked_fill(~has_d, float("-inf"))
            lc = torch.logaddexp(l_r.float().masked_fill(~has_r, float("-inf")), ld) if w else ld
        out[:, :, r0:r1] = o.view(b, h, r, block, d)
        if lse and lc is not None:
            lout[:, :, r0:r1] = lc.float().view(b, h, r, block)
    out = out.view(b, h, nb * block, d)[:, :, :n]
    return (out, lout.view(b, h, nb * block)[:, :, :n]) if lse else out


def triton_ok(q: torch.Tensor, bias, valid, block: int) -> bool:
    """Whether the Triton kernel can run this call: CUDA, no mask beyond the causal one, its block sizes."""
    from edgecompress.kernels.ops import HAS_TRITON, INTERPRET

    return (
        HAS_TRITON and q.is_cuda and not INTERPRET and bias is None and valid is None and block in BLOCK_SIZES
    )


def triton(q, k, v, keep, causal: bool, scale: float, block: int, lse: bool = False):
    """The Triton kernel; with ``lse``: ``(out, logsumexp)``."""
    from edgecompress.kernels import block_sparse_attention

    index = block_mask_to_index(keep, causal)
    return block_sparse_attention(q, k, v, index, causal, scale, block=block, return_lse=lse)


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
