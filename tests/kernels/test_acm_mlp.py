"""ACM grouped-GEMM kernel vs the per-learner loop (float64 oracle, tolerance rule in oracle.py)."""

import pytest
import torch
import torch.nn.functional as F

from edgecompress.kernels import acm_mlp, reference
from tests.kernels.oracle import assert_within_torch_error

L = 4


def _weights(d, h, d_out, dtype, device, n_learners=L):
    w1 = torch.randn(d, n_learners * h, dtype=dtype, device=device) / d**0.5
    b1 = torch.randn(n_learners * h, dtype=dtype, device=device) * 0.5
    w2 = torch.randn(n_learners * h, d_out, dtype=dtype, device=device) / (n_learners * h) ** 0.5
    return w1, b1, w2


def _check(out, x, k, w1, b1, w2, n_learners=L, what=""):
    cpu = [t.cpu() for t in (x, k, w1, b1, w2)]
    oracle = reference.acm_mlp(cpu[0].double(), cpu[1], *(t.double() for t in cpu[2:]), n_learners)
    at_dtype = reference.acm_mlp(*cpu, n_learners)
    assert_within_torch_error(out.cpu(), oracle, at_dtype, what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("t", "d", "h", "d_out"), [(59, 32, 16, 32), (130, 48, 24, 40), (97, 40, 32, 48)])
def test_mixed_k(device, dtype, t, d, h, d_out):
    x = torch.randn(t, d, dtype=dtype, device=device)
    k = torch.randint(0, L + 1, (t,), device=device)
    w1, b1, w2 = _weights(d, h, d_out, dtype, device)
    out = acm_mlp(x, k, w1, b1, w2, L)
    assert out.shape == (t, d_out) and out.dtype == dtype
    _check(out, x, k, w1, b1, w2, what=f"{dtype} t={t}")
    assert torch.equal(out[k == 0], torch.zeros_like(out[k == 0]))


def test_all_zero_k_gives_zeros(device):
    x = torch.randn(97, 32, device=device)
    w1, b1, w2 = _weights(32, 16, 24, torch.float32, device)
    out = acm_mlp(x, torch.zeros(97, dtype=torch.long, device=device), w1, b1, w2, L)
    assert torch.equal(out, torch.zeros(97, 24, device=device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_learners_equals_dense_mlp(device, dtype):
    """k = n_learners everywhere: the dense MLP of total width (oracle: float64 dense MLP)."""
    x = torch.randn(97, 32, dtype=dtype, device=device)
    w1, b1, w2 = _weights(32, 16, 40, dtype, device)
    out = acm_mlp(x, torch.full((97,), L, dtype=torch.int32, device=device), w1, b1, w2, L)
    x64, w164, b164, w264 = (t.cpu().double() for t in (x, w1, b1, w2))
    oracle = F.gelu(x64 @ w164 + b164) @ w264
    dense_at_dtype = F.gelu(x.cpu() @ w1.cpu() + b1.cpu()) @ w2.cpu()
    assert_within_torch_error(out.cpu(), oracle, dense_at_dtype, f"full budget {dtype}")


def test_prefix_structure(device):
    """Raising k for one token adds exactly the next learner's output (learner sums are prefix sums)."""
    x = torch.randn(40, 32, device=device)
    w1, b1, w2 = _weights(32, 16, 32, torch.float32, device)
    outs = [acm_mlp(x, torch.full((40,), n, device=device), w1, b1, w2, L).cpu() for n in range(L + 1)]
    for n in range(L):
        cols = slice(n * 16, (n + 1) * 16)
        learner = F.gelu(x.cpu().double() @ w1.cpu().double()[:, cols] + b1.cpu().double()[cols])
        learner = learner @ w2.cpu().double()[cols]
        step = outs[n + 1].double() - outs[n].double()
        assert (step - learner).abs().max().item() <= 1e-5, f"learner {n}"


def test_out_of_range_k_is_clamped(device):
    x = torch.randn(33, 32, device=device)
    w1, b1, w2 = _weights(32, 16, 32, torch.float32, device)
    k = torch.tensor([-3, 0, 1, 4, 9] * 6 + [2, 7, -1], device=device)
    out = acm_mlp(x, k, w1, b1, w2, L)
    clamped = acm_mlp(x, k.clamp(0, L), w1, b1, w2, L)
    assert torch.equal(out, clamped)
    _check(out, x, k, w1, b1, w2, what="clamped k")


@pytest.mark.parametrize("t", [0, 1, 17])
def test_tiny_token_counts_and_one_learner(device, t):
    x = torch.randn(t, 16, device=device)
    k = torch.randint(0, 2, (t,), device=device)
    w1, b1, w2 = _weights(16, 40, 20, torch.float32, device, n_learners=1)
    out = acm_mlp(x, k, w1, b1, w2, 1)
    assert out.shape == (t, 20)
    if t:
        _check(out, x, k, w1, b1, w2, n_learners=1, what=f"t={t}")


def test_non_contiguous_inputs(device):
    """x as a column slice and w1/w2 as transposed views give the contiguous result."""
    x_full = torch.randn(61, 64, device=device)
    x = x_full[:, :32]
    k = torch.randint(0, L + 1, (61,), device=device)
    w1, b1, w2 = _weights(32, 16, 24, torch.float32, device)
    w1_view = w1.t().contiguous().t()
    out = acm_mlp(x, k, w1_view, b1, w2, L)
    assert torch.equal(out, acm_mlp(x.contiguous(), k, w1, b1, w2, L))
