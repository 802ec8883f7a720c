"""ACM math (arXiv 2312.10193): the execution forms, the module and the losses (the MLP sites:
test_acm_sites.py).

Oracles and tolerances:

* the definition written out token by token and learner by learner, with the activations written
  out here (float64), validates :func:`execute.masked_dense`, which is then the oracle of the other
  forms: float64 forms ≤ 1e-12 absolute (outputs ~1); the float32 Triton kernel and bucketed form
  under the kernel rule of ``tests/kernels/oracle.py`` (error vs the float64 oracle ≤ 2 × the
  masked-dense float32 error + 1e-6);
* module forwards against the same oracle with the gate's ``argmax`` recomputed here; the training
  forward against ``prefix_outputs`` at the sampled one-hot (float32 straight-through one-hot: 1e-6)
  and its gradients against the paper's ``Σ_c y_c h(z, c)`` with the same Gumbel noise (1e-5 rel);
* losses and labels against values computed by hand in the comments (exact or 1e-12).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from edgecompress.kernels import reference
from edgecompress.sparsity.acm import losses as L
from edgecompress.sparsity.acm.execute import bucketed, masked_dense
from tests.kernels.oracle import assert_within_torch_error

N = 4  # learners
F64 = 1e-12  # float64 forms on outputs ~1
ACTS = ["gelu", "gelu_tanh", "silu", "relu", "quick_gelu"]


def _act(name: str, z: torch.Tensor) -> torch.Tensor:
    """The activations written out (independent of ``execute.ACTIVATIONS``)."""
    if name == "gelu":
        return 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
    if name == "silu":
        return z / (1 + torch.exp(-z))
    if name == "relu":
        return z.clamp_min(0)
    return z / (1 + torch.exp(-1.702 * z))  # quick_gelu


def _by_definition(x, k, w1, b1, w2, n, act, wu=None) -> torch.Tensor:
    """out_i = Σ_{j < k_i} learner_j(x_i), one token and one learner at a time (nn.Linear layout)."""
    h = w1.shape[0] // n
    out = torch.zeros(x.shape[0], w2.shape[0], dtype=x.dtype)
    for i in range(x.shape[0]):
        for j in range(min(max(int(k[i]), 0), n)):
            rows = slice(j * h, (j + 1) * h)
            z = _act(act, w1[rows] @ x[i] + b1[rows])
            if wu is not None:
                z = z * (wu[rows] @ x[i])
            out[i] += w2[:, rows] @ z
    return out


def _weights(d, h, d_out, gated, dtype=torch.float64, seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(n * h, d, generator=g, dtype=dtype) / d**0.5
    b1 = torch.randn(n * h, generator=g, dtype=dtype) * 0.5
    w2 = torch.randn(d_out, n * h, generator=g, dtype=dtype) / (n * h) ** 0.5
    wu = torch.randn(n * h, d, generator=g, dtype=dtype) / d**0.5 if gated else None
    return w1, b1, w2, wu


def _ks(case: str, t: int, seed: int = 0, n: int = N) -> torch.Tensor:
    if case == "zero":
        return torch.zeros(t, dtype=torch.long)
    if case == "full":
        return torch.full((t,), n, dtype=torch.long)
    return torch.randint(0, n + 1, (t,), generator=torch.Generator().manual_seed(seed))


def _close(a, b, atol, what=""):
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    assert a.shape == b.shape and err <= atol, f"{what}: max error {err:.3g} > {atol:g}"


# ---- the three execution forms ---------------------------------------------------------------------


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("act", ACTS)
def test_masked_dense_is_the_definition(act, gated):
    w1, b1, w2, wu = _weights(20, 6, 13, gated, seed=1)
    x = torch.randn(59, 20, dtype=torch.float64)
    k = _ks("mixed", 59, seed=2)
    _close(masked_dense(x, k, w1, b1, w2, N, act, wu), _by_definition(x, k, w1, b1, w2, N, act, wu), F64, act)


@pytest.mark.parametrize("t", [1, 59, 97, 130])
@pytest.mark.parametrize("case", ["mixed", "zero", "full"])
@pytest.mark.parametrize(
    ("act", "gated"), [("gelu", False), ("silu", True), ("relu", False), ("gelu_tanh", True)]
)
def test_bucketed_and_reference_op_equal_masked_dense_fp64(t, case, act, gated):
    w1, b1, w2, wu = _weights(24, 8, 20, gated, seed=t)
    x = torch.randn(t, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(t + 1))
    k = _ks(case, t, seed=t + 2)
    oracle = masked_dense(x, k, w1, b1, w2, N, act, wu)
    got = bucketed(x, k, w1, b1, w2, N, act, wu)
    _close(got, oracle, F64, f"bucketed {case} t={t}")
    assert torch.equal(got[k == 0], torch.zeros_like(got[k == 0]))  # k = 0: no work, exact zeros
    if act == "gelu" and not gated:  # the kernel op's twin: weights transposed ([d, L h], [L h, d_out])
        ref = reference.acm_mlp(x, k, w1.t(), b1, w2.t(), N)
        _close(ref, oracle, F64, f"reference.acm_mlp {case} t={t}")


def test_out_of_range_k_acts_as_clamped_in_every_form():
    w1, b1, w2, _ = _weights(24, 8, 20, False, seed=3)
    x = torch.randn(33, 24, dtype=torch.float64)
    k = torch.tensor([-3, 0, 1, 4, 9, 2] * 5 + [7, -1, 3])
    oracle = masked_dense(x, k.clamp(0, N), w1, b1, w2, N)
    _close(masked_dense(x, k, w1, b1, w2, N), oracle, 0.0, "masked")
    _close(bucketed(x, k, w1, b1, w2, N), oracle, F64, "bucketed")
    _close(reference.acm_mlp(x, k, w1.t(), b1, w2.t(), N), oracle, F64, "reference op")


@pytest.mark.parametrize("t", [1, 59, 97, 130])
@pytest.mark.parametrize("case", ["mixed", "zero", "full"])
def test_triton_kernel_and_bucketed_fp32_within_the_kernel_rule(t, case, kernel_device):
    from edgecompress.kernels import acm_mlp

    w1, b1, w2, _ = _weights(24, 8, 20, False, dtype=torch.float32, seed=10 + t)
    x = torch.randn(t, 24, generator=torch.Generator().manual_seed(t))
    k = _ks(case, t, seed=t + 5)
    oracle = masked_dense(x.double(), k, w1.double(), b1.double(), w2.double(), N)
    at_fp32 = masked_dense(x, k, w1, b1, w2, N)
    dev = [a.to(kernel_device) for a in (x, k, w1.t().contiguous(), b1, w2.t().contiguous())]
    out = acm_mlp(*dev, N).cpu()
    assert out.dtype == torch.float32 and out.shape == (t, 20)
    assert_within_torch_error(out, oracle, at_fp32, f"triton {case} t={t}")
    assert torch.equal(out[k == 0], torch.zeros_like(out[k == 0]))
    assert_within_torch_error(bucketed(x, k, w1, b1, w2, N), oracle, at_fp32, f"bucketed fp32 {case} t={t}")


# ---- the module ------------------------------------------------------------------------------------


def _prefixes(errors: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefixes [T, L+1, 1] whose distance to the target 0 is exactly ``errors``."""
    e = torch.tensor(errors, dtype=torch.float64)
    return e[:, :, None], torch.zeros(e.shape[0], 1, dtype=torch.float64)


def test_gate_labels_by_hand():
    # e_0..e_4            ratios e_n / e_{n+1}          first n (≥ k_min) with ratio < τ = 1.2
    rows = [
        [8, 4, 3.9, 3.8, 0.5],  # 2, 1.026, 1.026, 7.6      -> 1
        [8, 4, 2, 1, 0.5],  # 2, 2, 2, 2 (every learner helps) -> none -> L = 4
        [1, 1, 1, 1, 1],  # 1, 1, 1, 1 (no learner helps)    -> 0
        [8, 4, 2, 0, 0],  # 2, 2, inf, 0/0 -> 0 (exact)     -> 3
        [9, 8, 4, 2, 1],  # 1.125, 2, 2, 2                  -> 0
    ]
    pre, target = _prefixes(rows)
    assert L.gate_labels(pre, target, 1.2).tolist() == [1, 4, 0, 3, 0]
    # k_min = 2: only n ≥ 2 count, labels are k − k_min
    assert L.gate_labels(pre, target, 1.2, k_min=2).tolist() == [0, 2, 0, 1, 2]  # 2, L, 2, 3, L
    assert L.gate_labels(pre, target, 1.2, k_min=3).tolist() == [1, 1, 0, 0, 1]  # L, L, 3, 3, L
    # τ = 2.5: row 1's ratios 2 are all below it -> 0; row 0: 2 < 2.5 -> 0
    assert L.gate_labels(pre, target, 2.5).tolist() == [0, 0, 0, 0, 0]
    # the norm is over the features: a 3-4-5 triangle gives e_0 = 5
    two_d = torch.tensor([[[3.0, 4.0], [3.0, 4.0], [0.0, 0.0]]])
    assert L.gate_labels(two_d, torch.zeros(1, 2), 1.2).tolist() == [0]  # e = 5, 5, 0: 5/5 < τ at n=0


def test_fraction_budget_entropy_diversity_by_hand():
    y = F.one_hot(torch.tensor([0, 2, 1]), 3).float()  # choices over k ∈ {k_min=2 .. L=4}
    assert L.fraction(y, 2, 4).tolist() == [0.5, 1.0, 0.75]  # (2, 4, 3) / 4
    # budget: (1·mean[0, 1, 1, 1] + 3·mean[0.25, 0.25]) / 4 = (0.75 + 0.75) / 4 = 0.375; |0.375 − 0.5|
    f = [torch.tensor([0.0, 1, 1, 1]), torch.tensor([0.25, 0.25])]
    assert math.isclose(L.budget_loss(f, [1.0, 3.0], 0.5).item(), 0.125, abs_tol=1e-7)
    assert math.isclose(L.budget_loss(f, [1.0, 3.0], 0.25).item(), 0.125, abs_tol=1e-7)

    def onehots(idx, c):
        return F.one_hot(torch.tensor(idx), c).float()

    # entropy: 2 samples × 4 tokens, 4 choices; each sample uses every choice once -> −1
    assert math.isclose(L.entropy_loss([onehots([0, 1, 2, 3, 3, 2, 1, 0], 4)], 2).item(), -1.0, abs_tol=1e-7)
    assert L.entropy_loss([onehots([2] * 8, 4)], 2).item() == 0.0  # one choice everywhere -> 0
    # one sample, choices [0, 0, 1, 2]: p = (½, ¼, ¼, 0), H = 1.5 ln 2, / ln 4 -> 0.75
    assert math.isclose(L.entropy_loss([onehots([0, 0, 1, 2], 4)], 1).item(), -0.75, abs_tol=1e-7)
    # two layers average: −(1 + 0) / 2
    two = [onehots([0, 1, 2, 3], 4), onehots([1, 1, 1, 1], 4)]
    assert math.isclose(L.entropy_loss(two, 1).item(), -0.5, abs_tol=1e-7)

    # diversity: identical samples -> 0
    assert L.diversity_loss([onehots([1, 3, 1, 3], 5)], 2).item() == 0.0
    # 2 samples × 2 tokens, C = 5: means (0+0)/2/5 = 0 and (4+2)/2/5 = 0.6; −2·mean|Δ| over 4 pairs = −0.6
    assert math.isclose(L.diversity_loss([onehots([0, 0, 4, 2], 5)], 2).item(), -0.6, abs_tol=1e-7)
    # the samples' means average over layers first: layer 2 gives (0.2, 0.2) -> means (0.1, 0.4) -> −0.3
    layers = [onehots([0, 0, 4, 2], 5), onehots([1, 1, 1, 1], 5)]
    assert math.isclose(L.diversity_loss(layers, 2).item(), -0.3, abs_tol=1e-7)


def test_distill_loss_is_the_mean_over_prefixes_one_to_l():
    pre = torch.tensor([[[9.0], [1.0], [2.0], [4.0]]])  # k = 0 ignored; errors 1, 2, 4 to target 0
    assert L.distill_loss(pre, torch.zeros(1, 1)).item() == (1 + 4 + 16) / 3
