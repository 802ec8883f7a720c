"""The CPU form of SeerAttention's block-sparse attention: PyTorch FlexAttention compiled by Inductor.

The gate's kept blocks become a :class:`torch.nn.attention.flex_attention.BlockMask` built directly
from the block index (no element-wise mask is evaluated to build it): a kept key block whose every
key is visible to every query of the row is listed as *full* (no mask inside it), the others as
*partial*, where a ``mask_mod`` applies the element rules — the causal triangle of a decoder's
diagonal block, padding keys, and the tail past ``N`` of a partial last block. Dropped blocks are not
listed, so the compiled kernel never visits them: its cost is the kept blocks' FLOPs (measured on the
2-core Xeon in ``benchmarks/seer.py --parts forms speed``).

Compiling: one ``torch.compile(flex_attention, dynamic=True)`` for the process, with the block
tables' sizes marked dynamic, so Dynamo compiles once per variant (dtype, GQA, block size; causal or
not is a tensor of the ``mask_mod``, one kernel serves both), whatever the lengths: a model's layers
and later calls reuse the kernel. A single block (a size of 1 would be specialised: another compile)
is left to the caller. A
compile costs ~5-80 s on the 2-core Xeon depending on its load; the core's ``auto`` runs the faster
:mod:`.tiled` form instead (measured in ``benchmarks/seer.py --parts forms``), this one on request. Past Dynamo's recompile limit (8 variants in one process)
FlexAttention runs uncompiled: correct (the ``mask_mod`` names the kept blocks) but dense in cost.
Where compiling fails (no C++ compiler, an unsupported dtype such as float64), :func:`flex` warns
once per variant and returns ``None``: the caller runs another form instead.

Where it does not apply (the caller's choice): autograd (the masked-dense form trains), a model bias
beyond the causal and padding masks, non-CPU devices (the Triton kernel on CUDA).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from edgecompress.kernels.inputs import block_mask_to_index

_COMPILED = None
_FAILED: dict[tuple, str] = {}  # (dtype, gqa, block) -> why compiling failed


def _compiled():
    global _COMPILED
    if _COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED = torch.compile(flex_attention, dynamic=True)
    return _COMPILED


def _mask_mod(keep: torch.Tensor, visible: torch.Tensor, causal: torch.Tensor, block: int):
    """The element rule: the key's block is kept, the key is real (``visible`` ``[B, nb·block]``) and,
    for a decoder (``causal``, a 0-d bool tensor, so that one compiled kernel serves both), not after
    the query. The compiled kernel evaluates it in partial blocks only (and visits listed blocks
    only); uncompiled FlexAttention (Dynamo's recompile limit, compiling disabled) evaluates it
    everywhere, so it must say which blocks are kept, not only the block lists."""

    def rule(b, h, q_idx, kv_idx):
        ok = keep[b, h, q_idx // block, kv_idx // block] & visible[b, kv_idx]
        return ok & ((kv_idx <= q_idx) | ~causal)

    return rule


def block_mask(keep: torch.Tensor, n: int, block: int, causal: bool, valid=None):
    """The FlexAttention ``BlockMask`` of ``keep`` ``[B, H, nb, nb]`` (see the module docstring)."""
    from torch.nn.attention.flex_attention import BlockMask

    b, _, nb, _ = keep.shape
    span = nb * block
    visible = torch.arange(span, device=keep.device) < n  # [nb·block]: the tail of a partial block
    visible = visible.expand(b, span) if valid is None else visible & F.pad(valid, (0, span - n))
    partial_col = ~visible.view(b, nb, block).all(-1)[:, None, None, :]  # [B, 1, 1, nb]
    if causal:
        tril = torch.ones(nb, nb, dtype=torch.bool, device=keep.device).tril()
        keep = keep & tril
        partial = keep & (partial_col | torch.eye(nb, dtype=torch.bool, device=keep.device))
    else:
        partial = keep & partial_col
    part, full = block_mask_to_index(partial), block_mask_to_index(keep & ~partial)
    keep, visible = keep.contiguous(), visible.contiguous()
    for t, dims in ((keep, (2, 3)), (visible, (1,)), *((t, (2, 3)) for t in (part.indices, full.indices)),
                    *((t, (2,)) for t in (part.counts, full.counts))):  # fmt: skip
        for dim in dims:  # block counts and lengths dynamic from the first compile (one compile)
            torch._dynamo.maybe_mark_dynamic(t, dim)
    return BlockMask.from_kv_blocks(
        part.counts, part.indices, full.counts, full.indices, BLOCK_SIZE=block, compute_q_blocks=False,
        mask_mod=_mask_mod(keep, visible, torch.tensor(causal, device=keep.device), block), seq_lengths=(n, n),
    )  # fmt: skip


def flex(q, k, v, keep, causal: bool, scale: float, block: int, valid=None) -> torch.Tensor | None:
    """Attention of ``q`` over the kept blocks by compiled FlexAttention; ``None`` (the caller runs
    another form) where compiling failed and for a single block (which would compile apart).

    Shapes as :mod:`.execute` (GQA: ``k``/``v`` may have fewer heads). Rows with no visible key give 0."""
    variant = (q.dtype, k.shape[1] != q.shape[1], block)
    if variant in _FAILED or keep.shape[-1] < 2:  # one block: a kernel of its own (sizes of 1 specialise)
        return None
    mask = block_mask(keep, q.shape[2], block, causal, valid)
    try:
        return _compiled()(q, k, v, block_mask=mask, scale=scale, enable_gqa=variant[1])
    except Exception as e:  # noqa: BLE001 — Inductor's failures have no common type; the caller falls back
        _FAILED[variant] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        warnings.warn(
            f"SeerAttention: FlexAttention could not be compiled for {variant} ({_FAILED[variant]}); "
            "running another CPU form instead",
            stacklevel=2,
        )
        return None
