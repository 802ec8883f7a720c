"""Oracles and the tolerance rule shared by the kernel tests (DESIGN.md section 6).

Rule for attention and matmul kernels: with `oracle` the float64 reference,
    max|kernel - oracle| <= 2 * max|torch_at_dtype - oracle| + FLOOR[dtype]
where torch_at_dtype is torch's own computation at the test dtype: for attention the eager
composition softmax(q k^T * scale) v with matmuls in the test dtype and the softmax in float32 (as
timm/transformers eager attention run it); for ACM the per-learner reference run at the test dtype.
FLOOR is a small absolute floor, a quarter of the dtype's machine epsilon (1e-6 for float32), that
only matters when torch's own error is near zero.
"""

import torch

from edgecompress.kernels import reference
from edgecompress.kernels.inputs import num_blocks

FLOOR = {torch.float32: 1e-6, torch.float16: 2.5e-4, torch.bfloat16: 2e-3}


def assert_within_torch_error(out, oracle, torch_out, what=""):
    err = (out.double() - oracle.double()).abs().max().item()
    torch_err = (torch_out.double() - oracle.double()).abs().max().item()
    bound = 2 * torch_err + FLOOR[out.dtype]
    assert err <= bound, f"{what}: kernel error {err:.3g} > 2 x torch error {torch_err:.3g} + floor"


def element_mask(block_mask, n, block, causal):
    """[B, H, nQ, nK] block mask -> [B, H, N, N] element mask (independent of the reference's own)."""
    rows = torch.arange(n, device=block_mask.device) // block
    mask = block_mask[..., rows, :][..., rows]  # [B, H, N, N]
    if causal:
        mask = mask & torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    return mask


def torch_attention_at_dtype(q, k, v, mask, scale):
    """Eager attention in q's dtype (float32 softmax); rows with nothing kept give zeros."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, 1)
    v = v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    p = torch.softmax(s.float().masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    return p.to(q.dtype) @ v


def check_attention(out, q, k, v, block_mask, causal, block, scale=None, what=""):
    """Compare a block-sparse attention output with the float64 oracle under the tolerance rule."""
    n, d = q.shape[2], q.shape[3]
    scale = d**-0.5 if scale is None else scale
    q64, k64, v64 = (t.double() for t in (q, k, v))
    oracle = reference.block_sparse_attention(q64, k64, v64, block_mask, causal, scale, block=block)
    mask = element_mask(block_mask, n, block, causal)
    torch_out = torch_attention_at_dtype(q, k, v, mask, scale)
    assert_within_torch_error(out, oracle, torch_out, what)


def random_block_mask(b, h, n, block, density, device="cpu", keep_diagonal=True):
    nb = num_blocks(n, block)
    mask = torch.rand(b, h, nb, nb) < density
    if keep_diagonal:
        mask |= torch.eye(nb, dtype=torch.bool)
    return mask.to(device)


def qkv(b, h, hkv, n, d, dtype, device):
    q = torch.randn(b, h, n, d, dtype=dtype, device=device)
    k = torch.randn(b, hkv, n, d, dtype=dtype, device=device)
    v = torch.randn(b, hkv, n, d, dtype=dtype, device=device)
    return q, k, v
