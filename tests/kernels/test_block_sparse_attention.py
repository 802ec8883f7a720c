"""Block-sparse attention kernel vs float64 masked dense attention (tolerance rule in oracle.py)."""

import pytest
import torch
import torch.nn.functional as F

from edgecompress.kernels import BlockIndex, block_mask_to_index, block_sparse_attention
from edgecompress.kernels.inputs import index_to_block_mask, num_blocks
from tests.kernels.oracle import (
    assert_within_torch_error,
    check_attention,
    qkv,
    random_block_mask,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "d", "causal"), [(59, 32, False), (130, 64, True)])
def test_full_mask_equals_dense_attention(device, dtype, n, d, causal):
    """0% sparsity: the kernel is dense attention (oracle: float64 SDPA)."""
    q, k, v = qkv(1, 2, 2, n, d, dtype, device)
    mask = torch.ones(1, 2, num_blocks(n, 64), num_blocks(n, 64), dtype=torch.bool, device=device)
    out = block_sparse_attention(q, k, v, mask, causal)
    assert out.shape == q.shape and out.dtype == dtype
    oracle = F.scaled_dot_product_attention(*(t.cpu().double() for t in (q, k, v)), is_causal=causal)
    torch_out = F.scaled_dot_product_attention(*(t.cpu() for t in (q, k, v)), is_causal=causal)
    assert_within_torch_error(out.cpu(), oracle, torch_out, "dense vs SDPA")


@pytest.mark.parametrize(
    ("n", "block", "causal", "h", "hkv"),
    [(97, 32, False, 2, 2), (130, 64, True, 4, 2), (130, 64, False, 2, 1), (200, 128, True, 2, 1)],
)
def test_random_mask_equals_masked_dense(device, n, block, causal, h, hkv):
    q, k, v = qkv(2, h, hkv, n, 32, torch.float32, device)
    mask = random_block_mask(2, h, n, block, 0.5, device)
    out = block_sparse_attention(q, k, v, mask, causal, block=block)
    check_attention(out, q, k, v, mask, causal, block, what=f"n={n} block={block} causal={causal}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_random_mask_low_precision(device, dtype):
    q, k, v = qkv(1, 4, 2, 123, 64, dtype, device)
    mask = random_block_mask(1, 4, 123, 32, 0.4, device)
    out = block_sparse_attention(q, k, v, mask, True, block=32)
    check_attention(out, q, k, v, mask, True, 32, what=str(dtype))


@pytest.mark.parametrize("d", [16, 48, 128, 256])
def test_head_dims(device, d):
    """Powers of two up to 256 and a padded odd head dim."""
    q, k, v = qkv(1, 2, 1, 70, d, torch.float32, device)
    mask = random_block_mask(1, 2, 70, 32, 0.6, device)
    out = block_sparse_attention(q, k, v, mask, False, block=32)
    check_attention(out, q, k, v, mask, False, 32, what=f"d={d}")


@pytest.mark.parametrize(
    ("n", "block", "causal"), [(20, 64, False), (20, 64, True), (1, 32, True), (33, 128, False)]
)
def test_sequence_shorter_than_block(device, n, block, causal):
    q, k, v = qkv(2, 2, 1, n, 32, torch.float32, device)
    mask = torch.ones(2, 2, 1, 1, dtype=torch.bool, device=device)
    out = block_sparse_attention(q, k, v, mask, causal, block=block)
    check_attention(out, q, k, v, mask, causal, block, what=f"n={n}")


def test_gqa_equals_repeated_heads(device):
    """H=4 query heads on Hkv=1: same as 4 explicit copies of K/V (kernel vs kernel, exact)."""
    q, k, v = qkv(1, 4, 1, 97, 32, torch.float32, device)
    mask = random_block_mask(1, 4, 97, 32, 0.5, device)
    out = block_sparse_attention(q, k, v, mask, True, block=32)
    expanded = block_sparse_attention(q, k.expand(1, 4, 97, 32), v.expand(1, 4, 97, 32), mask, True, block=32)
    assert torch.equal(out, expanded)
    check_attention(out, q, k, v, mask, True, 32, what="gqa")


def test_index_form_equals_bool_form(device):
    q, k, v = qkv(2, 2, 2, 130, 32, torch.float32, device)
    mask = random_block_mask(2, 2, 130, 32, 0.5, device, keep_diagonal=False)
    index = block_mask_to_index(mask)
    assert index.indices.dtype == torch.int32 and index.counts.dtype == torch.int32
    assert torch.equal(index_to_block_mask(index, mask.shape[-1]), mask)
    for causal in (False, True):
        dense = block_sparse_attention(q, k, v, mask, causal, block=32)
        sparse = block_sparse_attention(q, k, v, block_mask_to_index(mask, causal), causal, block=32)
        assert torch.equal(dense, sparse)
    # a trimmed, wider-padded hand-built index gives the same result
    width = int(index.counts.max())
    padded = torch.cat([index.indices[..., :width], torch.full_like(index.indices[..., :3], -1)], -1)
    by_hand = block_sparse_attention(q, k, v, BlockIndex(padded, index.counts), False, block=32)
    assert torch.equal(by_hand, block_sparse_attention(q, k, v, mask, False, block=32))


def test_rows_with_nothing_kept_are_zero(device):
    """Query blocks whose mask row is empty (or, under causal, keeps only future blocks) output 0."""
    n, block = 97, 32
    q, k, v = qkv(1, 2, 1, n, 32, torch.float32, device)
    mask = random_block_mask(1, 2, n, block, 0.5, device)
    mask[0, 0, 1] = False  # head 0, query block 1: nothing kept
    mask[0, 1, 0] = False
    mask[0, 1, 0, 2] = True  # head 1, query block 0 keeps only a future block
    for causal in (False, True):
        out = block_sparse_attention(q, k, v, mask, causal, block=block)
        assert torch.equal(out[0, 0, block : 2 * block], torch.zeros_like(out[0, 0, block : 2 * block]))
        head1_block0 = out[0, 1, :block]
        assert torch.equal(head1_block0 == 0, torch.full_like(head1_block0, causal, dtype=torch.bool))
        check_attention(out, q, k, v, mask, causal, block, what=f"zero rows causal={causal}")


def test_sm_scale_and_strided_inputs(device):
    """A custom scale, and q/k/v as transposed views of [B, N, H, D] tensors."""
    base = torch.randn(3, 1, 75, 2, 32, device=device)  # [qkv, B, N, H, D]
    q, k, v = (t.transpose(1, 2) for t in base)  # [B, H, N, D] views, stride(-1) == 1
    mask = random_block_mask(1, 2, 75, 32, 0.5, device)
    out = block_sparse_attention(q, k, v, mask, True, 0.3, block=32)
    contiguous = block_sparse_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), mask, True, 0.3, block=32
    )
    assert torch.equal(out, contiguous)
    check_attention(out, q, k, v, mask, True, 32, scale=0.3, what="sm_scale")


def test_eager_baseline_detects_a_wrong_scale(device):
    """The tolerance rule can fail: a kernel run with the wrong scale is rejected."""
    q, k, v = qkv(1, 2, 2, 64, 32, torch.float32, device)
    mask = torch.ones(1, 2, 2, 2, dtype=torch.bool, device=device)
    wrong = block_sparse_attention(q, k, v, mask, False, 0.2, block=32)
    with pytest.raises(AssertionError):
        check_attention(wrong, q, k, v, mask, False, 32, what="wrong scale")
