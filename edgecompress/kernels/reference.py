"""Pure-torch twins of every kernel op: the oracle in tests and the fallback without Triton or a GPU.

Each function has the signature of its op in ``edgecompress.kernels`` and is written for clarity, not
speed: attention materialises the N x N score matrix. Inputs may also be float64 (the test oracle).
Scores, softmax and the learner sum are computed in float32 (float64 for float64 inputs) and the
output is cast back to the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgecompress.kernels.inputs import (
    BlockIndex,
    check_acm,
    check_attention,
    check_block_mask,
    index_to_block_mask,
    num_blocks,
    resolve_scale,
)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scores(q: torch.Tensor, k: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """Scaled scores with k/v heads repeated for GQA: [B, H, N, N] in the compute dtype."""
    ct = _compute_dtype(q.dtype)
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # [B, H, N, D]
    return (q.to(ct) @ k.to(ct).transpose(-1, -2)) * sm_scale  # [B, H, N, N]


def element_mask(block_mask: torch.Tensor, n: int, block: int, causal: bool) -> torch.Tensor:
    """Expand a [B, H, nQ, nK] block mask to [B, H, N, N] and apply the causal mask."""
    mask = block_mask.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)
    mask = mask[..., :n, :n]  # [B, H, N, N]
    if causal:
        mask = mask & torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    return mask


def _masked_attention(q, k, v, mask: torch.Tensor, sm_scale: float) -> tuple[torch.Tensor, ...]:
    """Softmax attention under an element mask: ``(out, probabilities, masked scores)``; rows with
    nothing kept get zero probabilities (and scores of ``-inf`` only)."""
    s = _scores(q, k, sm_scale).masked_fill(~mask, float("-inf"))  # [B, H, N, N]
    p = torch.softmax(s, dim=-1).nan_to_num(nan=0.0)  # fully masked rows: NaN -> 0
    group = q.shape[1] // k.shape[1]
    v = v.repeat_interleave(group, dim=1).to(p.dtype)  # [B, H, N, D]
    return (p @ v).to(q.dtype), p, s


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor | BlockIndex,
    causal: bool = False,
    sm_scale: float | None = None,
    *,
    block: int = 64,
    return_lse: bool = False,
):
    """Masked dense attention: the block mask expanded to elements, then an explicit softmax.

    A query row with no kept key (after block mask and causal mask) outputs zeros. With ``return_lse``:
    ``(out, lse)``, each row's log-sum-exp of its scaled kept scores, float32 (``-inf``: none kept).
    """
    b, h, _, n, d = check_attention(q, k, v, block, allow_fp64=True)
    check_block_mask(block_mask, b, h, n, block, q.device)
    if isinstance(block_mask, BlockIndex):
        block_mask = index_to_block_mask(block_mask, num_blocks(n, block))
    mask = element_mask(block_mask, n, block, causal)  # [B, H, N, N]
    out, _, s = _masked_attention(q, k, v, mask, resolve_scale(sm_scale, d))
    return (out, s.float().logsumexp(-1)) if return_lse else out  # rows of -inf only: -inf


def attention_with_pooled_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block: int = 64,
    causal: bool = False,
    sm_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention and the max softmax probability of every (query block, key block) tile.

    Pooled from the full [B, H, N, N] probability matrix; padding of a partial last block counts as 0.
    Returns (out [B, H, N, D] in q's dtype, pooled [B, H, nQ, nK] float32).
    """
    b, h, _, n, d = check_attention(q, k, v, block, allow_fp64=True)
    mask = torch.ones(n, n, dtype=torch.bool, device=q.device)
    if causal:
        mask = mask.tril()
    out, p, _ = _masked_attention(q, k, v, mask, resolve_scale(sm_scale, d))  # p: [B, H, N, N]
    nb = num_blocks(n, block)
    pad = nb * block - n
    p = F.pad(p, (0, pad, 0, pad))  # [B, H, nQ*block, nK*block]
    pooled = p.reshape(b, h, nb, block, nb, block).amax(dim=(3, 5))  # [B, H, nQ, nK]
    return out, pooled.float()


def acm_mlp(
    x: torch.Tensor,
    k: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    n_learners: int,
) -> torch.Tensor:
    """ACM forward as a loop over learners: token i sums learners n < k[i] (k <= 0: zeros).

    Learner n is GELU(x @ w1[:, n*h:(n+1)*h] + b1[n*h:(n+1)*h]) @ w2[n*h:(n+1)*h, :] (exact erf GELU,
    no output bias). k above n_learners acts as n_learners.
    """
    t, _, h, d_out = check_acm(x, k, w1, b1, w2, n_learners, allow_fp64=True)
    out = torch.zeros(t, d_out, dtype=_compute_dtype(x.dtype), device=x.device)  # [T, d_out]
    for n in range(n_learners):
        cols = slice(n * h, (n + 1) * h)
        hidden = F.gelu(x @ w1[:, cols] + b1[cols])  # [T, h]
        contrib = hidden @ w2[cols, :]  # [T, d_out]
        out += torch.where((k > n)[:, None], contrib.to(out.dtype), 0.0)
    return out.to(x.dtype)
