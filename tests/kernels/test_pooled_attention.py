"""Pooled-probability attention kernel vs pooling of the full float64 softmax matrix."""

import pytest
import torch

from edgecompress.kernels import attention_with_pooled_probs, reference
from edgecompress.kernels.inputs import num_blocks
from tests.kernels.oracle import check_attention, qkv

POOLED_FLOOR = 1e-6  # pooled probabilities are computed in float32 from exact products at every dtype


def _check_pooled(pooled, q, k, v, block, causal, what, scale=None):
    """pooled error vs the float64 oracle <= 2 x the error of the reference at the test dtype + floor."""
    q64, k64, v64 = (t.cpu().double() for t in (q, k, v))
    oracle = reference.attention_with_pooled_probs(q64, k64, v64, block, causal, scale)[1]
    at_dtype = reference.attention_with_pooled_probs(q.cpu(), k.cpu(), v.cpu(), block, causal, scale)[1]
    err = (pooled.cpu().double() - oracle.double()).abs().max().item()
    ref_err = (at_dtype.double() - oracle.double()).abs().max().item()
    assert err <= 2 * ref_err + POOLED_FLOOR, f"{what}: pooled error {err:.3g} vs reference {ref_err:.3g}"


@pytest.mark.parametrize(
    ("n", "block", "causal", "h", "hkv"),
    [(59, 32, False, 2, 2), (130, 64, True, 2, 1), (97, 64, False, 4, 2), (200, 128, True, 2, 2)],
)
def test_pooled_and_output_match_reference(device, n, block, causal, h, hkv):
    q, k, v = qkv(1, h, hkv, n, 32, torch.float32, device)
    out, pooled = attention_with_pooled_probs(q, k, v, block, causal)
    nb = num_blocks(n, block)
    assert pooled.shape == (1, h, nb, nb) and pooled.dtype == torch.float32
    assert out.shape == q.shape and out.dtype == q.dtype
    _check_pooled(pooled, q, k, v, block, causal, f"n={n} block={block}")
    full = torch.ones(1, h, nb, nb, dtype=torch.bool)
    check_attention(out, q, k, v, full, causal, block, what="pooled-kernel output")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(device, dtype):
    q, k, v = qkv(2, 2, 2, 77, 64, dtype, device)
    out, pooled = attention_with_pooled_probs(q, k, v, 32, True)
    _check_pooled(pooled, q, k, v, 32, True, str(dtype))
    full = torch.ones(2, 2, 3, 3, dtype=torch.bool)
    check_attention(out, q, k, v, full, True, 32, what=str(dtype))


@pytest.mark.parametrize("causal", [False, True])
def test_sequence_shorter_than_block(device, causal):
    q, k, v = qkv(1, 2, 1, 21, 32, torch.float32, device)
    out, pooled = attention_with_pooled_probs(q, k, v, 64, causal)
    assert pooled.shape == (1, 2, 1, 1)
    _check_pooled(pooled, q, k, v, 64, causal, "short")
    if causal:  # the first row attends only to itself: probability 1
        assert torch.allclose(pooled, torch.ones_like(pooled))


def test_causal_structure_and_range(device):
    """Under causal the map is block lower-triangular; every row keeps a positive max <= 1."""
    q, k, v = qkv(1, 2, 2, 100, 32, torch.float32, device)
    _, pooled = attention_with_pooled_probs(q, k, v, 32, True)
    above = torch.ones(4, 4, dtype=torch.bool).triu(1)
    assert torch.equal(pooled[..., above], torch.zeros_like(pooled[..., above]))
    assert bool((pooled.diagonal(dim1=-2, dim2=-1) > 0).all()) and bool((pooled <= 1).all())


def test_sm_scale(device):
    q, k, v = qkv(1, 2, 2, 50, 32, torch.float32, device)
    out, pooled = attention_with_pooled_probs(q, k, v, 32, False, sm_scale=0.5)
    _check_pooled(pooled, q, k, v, 32, False, "sm_scale", scale=0.5)
    full = torch.ones(1, 2, 2, 2, dtype=torch.bool)
    check_attention(out, q, k, v, full, False, 32, scale=0.5, what="sm_scale")
