"""Compiled kernels on a CUDA GPU at realistic sizes (run: TRITON_INTERPRET=0 pytest -m gpu tests/kernels)."""

import pytest
import torch
import torch.nn.functional as F

from edgecompress.kernels import acm_mlp, attention_with_pooled_probs, block_sparse_attention, ops, reference
from tests.kernels.oracle import assert_within_torch_error, check_attention, qkv, random_block_mask

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not ops.HAS_TRITON, reason="needs triton"),
    pytest.mark.skipif(ops.INTERPRET, reason="runs the compiled kernels; set TRITON_INTERPRET=0"),
]
CUDA = "cuda"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("d", "causal"), [(64, False), (128, True), (256, False)])
def test_dense_vs_sdpa(dtype, d, causal):
    """0% sparsity vs torch SDPA at the same dtype (oracle: float64 SDPA)."""
    n = 1031
    q, k, v = qkv(1, 4, 4, n, d, dtype, CUDA)
    mask = torch.ones(1, 4, 17, 17, dtype=torch.bool, device=CUDA)
    out = block_sparse_attention(q, k, v, mask, causal)
    oracle = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
    torch_out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert_within_torch_error(out, oracle, torch_out, f"d={d} {dtype}")


@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_sparse_gqa_bf16(block, causal):
    n = 2000
    q, k, v = qkv(2, 8, 2, n, 128, torch.bfloat16, CUDA)
    mask = random_block_mask(2, 8, n, block, 0.1, CUDA)
    out = block_sparse_attention(q, k, v, mask, causal, block=block)
    check_attention(out, q, k, v, mask, causal, block, what=f"block={block}")


def test_pooled_bf16():
    q, k, v = qkv(1, 4, 2, 1500, 128, torch.bfloat16, CUDA)
    out, pooled = attention_with_pooled_probs(q, k, v, 64, True)
    _, oracle_pooled = reference.attention_with_pooled_probs(q.double(), k.double(), v.double(), 64, True)
    # pooled is float32 math on exact bf16 products: absolute 1e-5 against the float64 oracle
    assert (pooled.double() - oracle_pooled).abs().max().item() <= 1e-5
    full = torch.ones(1, 4, 24, 24, dtype=torch.bool, device=CUDA)
    check_attention(out, q, k, v, full, True, 64, what="pooled out")


@pytest.mark.parametrize(("d", "hidden"), [(384, 1536), (768, 3072)])
def test_acm_bf16_vit_widths(d, hidden):
    t, n_learners = 4099, 4
    x = torch.randn(t, d, dtype=torch.bfloat16, device=CUDA)
    k = torch.randint(0, n_learners + 1, (t,), device=CUDA)
    w1 = torch.randn(d, hidden, dtype=torch.bfloat16, device=CUDA) / d**0.5
    b1 = torch.randn(hidden, dtype=torch.bfloat16, device=CUDA) * 0.1
    w2 = torch.randn(hidden, d, dtype=torch.bfloat16, device=CUDA) / hidden**0.5
    out = acm_mlp(x, k, w1, b1, w2, n_learners)
    oracle = reference.acm_mlp(x.double(), k, w1.double(), b1.double(), w2.double(), n_learners)
    assert_within_torch_error(out, oracle, reference.acm_mlp(x, k, w1, b1, w2, n_learners), f"d={d}")
