"""The CPU form ``tiled`` of SeerAttention's block-sparse attention: batched matmuls over the kept blocks.

Every (query block, batch, head) is a *pair*; pairs are ordered row by row (query block, then batch,
then head), so a run of them is one contiguous slice of the queries and of the output. A per-row top-k
budget gives every pair of a row the same number of kept key blocks, and neighbouring rows mostly the
same number too, so the pairs are cut into *pieces* of equal width ``w`` (kept key blocks) whose
scores fit a cache-sized budget. Per piece, with no Python loop over blocks:

1. the kept K and V blocks are gathered (one ``index_select`` each on a block view, into buffers
   allocated once per call) into ``[P, w·block, D]``;
2. one batched matmul gives the scores ``[P, block, w·block]`` (the scale is folded into Q beforehand);
3. masks are added only where needed: a decoder's diagonal block is put in slot 0 and gets the causal
   triangle; slots past a pair's own count (a ragged piece, e.g. ``threshold`` rows) and keys that are
   padding or past ``N`` (a partial last block) get ``-inf``;
4. the softmax runs in place over the ``w·block`` keys (a row with no visible key gives 0);
5. one batched matmul with the gathered V writes the piece's rows of the output.

The matmuls are oneDNN/MKL's, run at close to their full rate; what dense SDPA does not pay is the
gather and the softmax's passes over the scores in memory (measured in ``benchmarks/seer.py --parts
forms speed``). Same dtype as the inputs throughout (the scores too), like PyTorch's eager math.
No model bias beyond the causal and padding masks (the core runs the gathered form then); no autograd
(the core runs the masked-dense reference under autograd).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgecompress.sparsity.seer.gate import num_blocks

SCORE_BYTES = 4 << 20  # the scores of one piece (bytes): the gathered K/V and the scores stay in cache


def kept_index(keep: torch.Tensor, causal: bool):
    """``(index, counts, diagonal)``: per (batch, head, query block) the kept key blocks ``[B, H, nb, nb]``
    (int64, ``-1`` after the ``counts`` kept ones) — for decoders the diagonal block first (where kept)
    and the blocks after the diagonal dropped, the rest ascending — and whether the diagonal is kept
    (``None`` for encoders)."""
    nb = keep.shape[-1]
    i = torch.arange(nb, device=keep.device)
    diagonal = None
    if causal:
        keep = keep & (i[:, None] >= i[None, :])
        diagonal = keep.diagonal(dim1=-2, dim2=-1)  # [B, H, nb]
    keys = torch.where(keep, i, i + nb)  # kept first, ascending
    if causal:
        keys = torch.where(keep & (i[:, None] == i[None, :]), -1, keys)  # the diagonal before them
    keys = keys.sort(dim=-1).values
    index = torch.where(keys < 0, i[:, None], keys)
    return torch.where(index >= nb, -1, index), keep.sum(-1), diagonal


def _pieces(widths: list[int], uniform: list[bool], pairs_per_row: int, per_slot: int, budget: int):
    """``(r0, r1, j0, j1, w, ragged)``: rows ``r0:r1`` of equal width ``w`` whose scores fit ``budget`` bytes,
    or, where one row does not fit, pairs ``j0:j1`` of the single row ``r0``."""
    out, r0 = [], 0
    while r0 < len(widths):
        r1 = r0 + 1
        while r1 < len(widths) and widths[r1] == widths[r0] and uniform[r1] == uniform[r0]:
            r1 += 1
        w, ragged = widths[r0], not uniform[r0]
        cap = max(1, budget // max(1, w * per_slot))  # pairs per piece
        if cap >= pairs_per_row:
            rows = cap // pairs_per_row
            out += [(a, min(a + rows, r1), 0, pairs_per_row, w, ragged) for a in range(r0, r1, rows)]
        else:
            out += [(r, r + 1, j, min(j + cap, pairs_per_row), w, ragged)
                    for r in range(r0, r1) for j in range(0, pairs_per_row, cap)]  # fmt: skip
        r0 = r1
    return out


def key_bias(n: int, nb: int, block: int, valid, b: int, dtype, device):
    """``[B·nb, block]`` additive 0 / -inf per key (padding keys and the tail past ``N``); None if none."""
    span = nb * block
    if valid is None and span == n:
        return None
    ok = (torch.arange(span, device=device) < n).expand(b, span)
    if valid is not None:
        ok = ok & F.pad(valid, (0, span - n))
    return torch.zeros(b * nb, block, dtype=dtype, device=device).masked_fill(
        ~ok.reshape(b * nb, block), float("-inf")
    )


def tiled(
    q, k, v, keep, causal: bool, scale: float, block: int, valid=None, budget: int = SCORE_BYTES, lse: bool = False
):  # fmt: skip
    """Attention of ``q`` ``[B, H, N, D]`` over the kept blocks of ``k``/``v`` ``[B, Hkv, N, D]`` (GQA:
    query head ``h`` reads K/V head ``h // (H / Hkv)``); ``keep`` ``[B, H, nb, nb]``; ``valid`` ``[B, N]``
    the real keys. Rows with no visible key give 0. See the module docstring. With ``lse``: ``(out,
    logsumexp [B, H, N])`` (float32, ``-inf`` for a row with no visible key; the probabilities are then
    ``exp(s − lse)``)."""
    b, h, n, d = q.shape
    hkv, nb = k.shape[1], num_blocks(n, block)
    pad, bh = nb * block - n, b * h
    index, counts, diagonal = kept_index(keep, causal)
    index = index.permute(2, 0, 1, 3).reshape(nb * bh, nb)  # pairs ordered (row, batch, head)
    counts = counts.permute(2, 0, 1).reshape(nb, bh)
    widths = counts.amax(-1)
    uniform = (counts == widths[:, None]).all(-1)
    head = torch.arange(h, device=q.device) // (h // hkv)
    base = ((torch.arange(b, device=q.device)[:, None] * hkv + head) * nb).reshape(1, bh)  # K/V block 0
    bias_row = (torch.arange(b, device=q.device)[:, None] * nb).expand(b, h).reshape(bh)  # key_bias row 0
    lin = (base.expand(nb, bh).reshape(-1, 1) + index.clamp(min=0)).contiguous()  # [pairs, nb]
    q, k, v = (F.pad(t, (0, 0, 0, pad)) if pad else t for t in (q, k, v))
    kb, vb = (t.reshape(b * hkv * nb, block * d) for t in (k, v))
    kbias = key_bias(n, nb, block, valid, b, q.dtype, q.device)
    tri = None
    if causal:
        tri = torch.full((block, block), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        diag_all = bool(diagonal.all())
        diagonal = diagonal.permute(2, 0, 1).reshape(-1)
    pieces = _pieces(widths.tolist(), uniform.tolist(), bh, block * block * q.element_size(), budget)
    slots = max([(r1 - r0) * (j1 - j0) * w for r0, r1, j0, j1, w, _ in pieces] + [1])
    pairs = max((r1 - r0) * (j1 - j0) for r0, r1, j0, j1, _, _ in pieces)
    kbuf, vbuf = (q.new_empty(slots, block * d) for _ in range(2))  # reused: no page faults per piece
    sbuf, qbuf, obuf = (
        q.new_empty(slots * block * block),
        q.new_empty(pairs, block, d),
        q.new_empty(pairs, block, d),
    )
    out = q.new_empty(b, h, nb * block, d)
    lout = q.new_full((b, h, nb * block), float("-inf"), dtype=torch.float32) if lse else None
    lv = lout.view(b, h, nb, block).permute(2, 0, 1, 3).flatten(1, 2) if lse else None  # [nb, B·H, bs]
    qv = q.reshape(b, h, nb, block, d).permute(2, 0, 1, 3, 4).flatten(1, 2)  # [nb, B·H, bs, D]
    ov = out.view(b, h, nb, block, d).permute(2, 0, 1, 3, 4).flatten(1, 2)  # views: pairs (row, batch, head)
    for r0, r1, j0, j1, w, ragged in pieces:
        dst = ov[r0:r1, j0:j1]
        if w == 0:
            dst.zero_()
            continue
        p, p0, p1 = (r1 - r0) * (j1 - j0), r0 * bh + j0, (r1 - 1) * bh + j1
        qc = torch.mul(qv[r0:r1, j0:j1], scale, out=qbuf[:p].view(dst.shape)).view(p, block, d)
        ids = lin[p0:p1, :w].reshape(-1)
        kg = torch.index_select(kb, 0, ids, out=kbuf[: p * w]).view(p, w * block, d)
        vg = torch.index_select(vb, 0, ids, out=vbuf[: p * w]).view(p, w * block, d)
        s = torch.bmm(qc, kg.transpose(1, 2), out=sbuf[: p * block * w * block].view(p, block, w * block))
        masked = _mask_piece(s, index, counts, kbias, bias_row, bh, p0, p1, w, ragged, block)
        if tri is not None:  # the diagonal block, in slot 0 where kept
            first = s.view(p, block, w, block)[:, :, 0]
            first += tri if diag_all else torch.where(diagonal[p0:p1, None, None], tri, 0.0)
        if lse:  # the softmax from the log-sum-exp: exp(s − lse), in place (no second reduction)
            row_lse = torch.logsumexp(s, -1, keepdim=True)
            lv[r0:r1, j0:j1] = row_lse.float().view(lv[r0:r1, j0:j1].shape)
            torch.sub(s, row_lse, out=s).exp_()  # a row with nothing kept: NaN, zeroed below
        else:
            torch.ops.aten._softmax.out(s, -1, False, out=s)
        if masked:
            s.nan_to_num_(nan=0.0)
        dst.copy_(torch.bmm(s, vg, out=obuf[:p]).view(dst.shape))
    out = out[:, :, :n] if pad else out
    return (out, lout[:, :, :n]) if lse else out


def _mask_piece(s, index, counts, key_bias, bias_row, bh, p0, p1, w, ragged, block) -> bool:
    """Add -inf for slots past a pair's count and for padding keys; whether anything was added."""
    if not ragged and key_bias is None:
        return False
    p = p1 - p0
    m = torch.zeros(p, w, block, dtype=s.dtype, device=s.device)
    if key_bias is not None:
        rows = bias_row[torch.arange(p0, p1, device=s.device) % bh]
        m += key_bias[(rows[:, None] + index[p0:p1, :w].clamp(min=0)).reshape(-1)].view(p, w, block)
    if ragged:
        cnt = counts.reshape(-1)[p0:p1]
        off = torch.arange(w, device=s.device)[None, :] >= cnt[:, None]
        m.masked_fill_(off[..., None], float("-inf"))
    s += m.view(p, 1, w * block)
    return True
