"""The GPU benchmark's mask builders and baselines, checked on CPU so that it cannot time FlexAttention
or the per-learner loop on a different problem than our kernels (benchmarks/gpu_kernels.py)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from edgecompress.kernels import block_mask_to_index, block_sparse_attention, reference

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_kernels.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.DEVICE = "cpu"
    module.BLOCK = 32
    return module


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sparsity", [0.0, 0.75])
def test_block_mask_density_and_diagonal(bench, causal, sparsity):
    nb = 12
    mask = bench._block_mask(3, nb, sparsity, causal, torch.Generator().manual_seed(0))
    cand = torch.ones(nb, nb, dtype=torch.bool).tril() if causal else torch.ones(nb, nb, dtype=torch.bool)
    assert bool(mask.diagonal(dim1=-2, dim2=-1).all()) and not bool((mask & ~cand).any())
    want = ((1 - sparsity) * cand.sum(-1)).round().clamp(min=1)  # kept blocks per query block
    assert torch.equal(mask.sum(-1)[0].float(), want.expand(3, nb))
    pairs = bench._pairs(mask, causal)
    assert pairs == (
        mask.sum().item() * 32 * 32 if not causal else (mask.sum().item() - 3 * nb) * 1024 + 3 * nb * 528
    )


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_gets_the_same_blocks(bench, device, causal):
    """Eager FlexAttention with the benchmark's BlockMask equals our kernel on the same kept blocks."""
    from torch.nn.attention.flex_attention import flex_attention

    n, h = 128, 2
    mask = bench._block_mask(h, 4, 0.5, causal, torch.Generator().manual_seed(1))
    q, k, v = (torch.randn(1, h, n, 32) for _ in range(3))
    block_mask = bench._flex_mask(mask, causal, n)
    assert torch.equal(block_mask.to_dense().bool(), mask)  # the kv block lists (what compiled flex visits)
    flex_out = flex_attention(q, k, v, block_mask=block_mask)  # eager: applies mask_mod element-wise
    ours = block_sparse_attention(q.to(device), k.to(device), v.to(device), mask.to(device), causal, block=32)
    assert torch.allclose(flex_out, ours.cpu(), atol=1e-5, rtol=0)
    index = block_mask_to_index(mask, causal)
    assert torch.allclose(
        flex_out, reference.block_sparse_attention(q, k, v, index, causal, block=32), atol=1e-5
    )


def test_naive_acm_loop_and_check(bench):
    x, w1, b1, w2 = torch.randn(50, 16), torch.randn(16, 32), torch.randn(32), torch.randn(32, 8)
    k = torch.randint(0, 5, (50,))
    want = reference.acm_mlp(x, k, w1, b1, w2, 4)
    assert torch.allclose(bench._naive_acm(x, k, w1, b1, w2, 4), want, atol=1e-5)
    bench._check("same", want, want, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="not timing it"):
        bench._check("nan", want * float("nan"), want, 1.0, 1.0)
