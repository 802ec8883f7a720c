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

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgecompress.kernels import reference
from edgecompress.sparsity.acm import ACMMLP
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


@pytest.fixture
def kernel_device() -> torch.device:
    """Where ``edgecompress.kernels.acm_mlp`` runs its Triton kernel (interpreter on CPU, or CUDA)."""
    from edgecompress.kernels import ops

    if not ops.HAS_TRITON:
        pytest.skip("triton is not installed")
    if ops.INTERPRET:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    pytest.skip("the Triton kernel needs TRITON_INTERPRET=1 (set before import) or a CUDA GPU")


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


def _acm(gated=False, act="gelu", k_min=0, seed=3, dtype=torch.float64, out_bias=True) -> ACMMLP:
    """20 → 13, 4 learners of 6, gate width 8; weights ~N(0, 0.5) so the random gate mixes its choices."""
    torch.manual_seed(seed)
    m = ACMMLP(20, 13, N, 6, 8, act=act, gated=gated, k_min=k_min, out_bias=out_bias).to(dtype).eval()
    m.use_gate = True  # training mode samples the gate, as in the acm pass's phase III
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    return m


def _oracle(m: ACMMLP, x, k=None):
    """masked_dense with the module's weights (+ bias2); k defaults to the gate's argmax, recomputed."""
    with torch.no_grad():
        if k is None:
            k = F.linear(
                F.gelu(F.linear(x, m.gate.fc1.weight, m.gate.fc1.bias)), m.gate.fc2.weight, m.gate.fc2.bias
            )
            k = k.argmax(-1) + m.k_min
        wu = None if m.fc_up is None else m.fc_up.weight
        out = masked_dense(x, k, m.fc1.weight, m.fc1.bias, m.fc2.weight, m.n_learners, m.act, wu)
        return out if m.bias2 is None else out + m.bias2


@pytest.mark.parametrize(
    ("gated", "act", "k_min"),
    [(False, "gelu", 0), (True, "silu", 0), (False, "quick_gelu", 1), (True, "gelu", 2)],
)
def test_eval_forms_agree_with_the_oracle(gated, act, k_min):
    m = _acm(gated, act, k_min)
    x = torch.randn(97, 20, dtype=torch.float64)
    want = _oracle(m, x)
    ks = m.choose(x)
    assert len(set(ks.tolist())) >= 3 and int(ks.min()) >= k_min, "the test needs a mix of choices"
    outs = {}
    with torch.no_grad():
        for form in ("reference", "bucketed", "auto"):
            m.form = form
            outs[form] = m(x)
            _close(outs[form], want, F64, form)
        assert m.pick_form(x) == "bucketed"  # auto on CPU tensors
        assert torch.equal(outs["auto"], outs["bucketed"])
        _close(m(x.reshape(1, 97, 20)).reshape(97, 13), want, F64, "3-D input")  # [B, S, d] flattened


def test_eval_forward_with_gradients_uses_the_masked_modules_form():
    m = _acm()
    x = torch.randn(31, 20, dtype=torch.float64)
    assert m.pick_form(x) == "modules"  # grad enabled and trainable weights: the autograd form
    out = m(x)
    _close(out, _oracle(m, x), F64, "modules form")
    out.sum().backward()
    assert m.fc1.weight.grad is not None and m.gate.fc1.weight.grad is None  # eval: argmax, no gate grad


@pytest.mark.parametrize(("gated", "act"), [(True, "gelu"), (False, "silu")])
def test_forced_triton_form_is_refused_for_modules_the_kernel_cannot_run(gated, act, kernel_device):
    m = _acm(gated, act, dtype=torch.float32)
    x = torch.randn(59, 20)
    want = _oracle(copy.deepcopy(m).double(), x.double())
    m, x = m.to(kernel_device), x.to(kernel_device)
    m.form = "triton"
    with torch.no_grad(), pytest.raises(ValueError, match="plain GELU learners only"):
        m(x)
    m.form = "auto"  # the automatic choice runs it exactly (bucketed)
    with torch.no_grad():
        _close(m(x).cpu().double(), want, 1e-4, "auto form")


def test_triton_form_in_the_module_matches_the_oracle(kernel_device):
    m = _acm(dtype=torch.float32).to(kernel_device)
    x = torch.randn(97, 20, device=kernel_device)
    m.form = "triton"
    with torch.no_grad():
        got = m(x).cpu()
    m64 = copy.deepcopy(m).double().cpu()
    oracle, at_fp32 = _oracle(m64, x.double().cpu()), _oracle(copy.deepcopy(m).cpu(), x.cpu())
    assert_within_torch_error(got, oracle, at_fp32, "module triton form")


class _RoundedLinear(nn.Linear):
    """A quantizer-like wrapper: the weight rounded to a 1/8 grid in forward (not a plain nn.Linear)."""

    def forward(self, x):
        return F.linear(x, torch.round(self.weight * 8) / 8, self.bias)


def _rounded(lin: nn.Linear) -> _RoundedLinear:
    out = _RoundedLinear(lin.in_features, lin.out_features, bias=lin.bias is not None).to(lin.weight.dtype)
    out.load_state_dict(lin.state_dict())
    return out


def test_wrapped_learners_run_the_masked_form_through_their_modules():
    """Oracle: masked_dense with the wrapper's rounded weights (the raw weights would differ by ~0.1)."""
    m = _acm()
    x = torch.randn(59, 20, dtype=torch.float64)
    k = m.choose(x)
    plain = _oracle(m, x, k)
    m.fc1, m.fc2 = _rounded(m.fc1), _rounded(m.fc2)
    m.form = "bucketed"  # asked for, but the wrapped learners must see the call
    r1, r2 = (torch.round(w * 8) / 8 for w in (m.fc1.weight.detach(), m.fc2.weight.detach()))
    want = masked_dense(x, k, r1, m.fc1.bias.detach(), r2, N) + m.bias2.detach()
    with torch.no_grad():
        assert m.pick_form(x) == "modules"
        got = m(x)
    _close(got, want, F64, "wrapped")
    assert (got - plain).abs().max() > 1e-3  # the rounding is visible: the test can fail


def test_a_hook_on_fc1_sees_every_call_and_its_effect_is_in_the_output():
    m = _acm(gated=True, act="silu")
    x = torch.randn(59, 20, dtype=torch.float64)
    k = m.choose(x)
    seen = []

    def halve(mod, args, out):
        seen.append(tuple(args[0].shape))
        return out * 0.5

    handle = m.fc1.register_forward_hook(halve)
    m.form = "bucketed"
    try:
        with torch.no_grad():
            assert m.pick_form(x) == "modules"
            got = m(x)
    finally:
        handle.remove()
    assert seen == [(59, 20)]  # one call, every token
    w1, b1 = m.fc1.weight.detach() * 0.5, m.fc1.bias.detach() * 0.5  # act(0.5 (x W1ᵀ + b1))
    want = masked_dense(x, k, w1, b1, m.fc2.weight.detach(), N, "silu", m.fc_up.weight.detach()) + m.bias2
    _close(got, want.detach(), F64, "hooked")
    with torch.no_grad():
        assert m.pick_form(x) == "bucketed"  # hook removed: the fast form again


@pytest.mark.parametrize("fixed", [0, 2, N])
def test_fixed_k_overrides_the_gate_in_eval_and_training(fixed):
    m = _acm(gated=True, act="silu")
    m.fixed_k = fixed
    x = torch.randn(59, 20, dtype=torch.float64)
    want = _oracle(m, x, torch.full((59,), fixed))
    assert torch.equal(m.choose(x), torch.full((59,), fixed))
    with torch.no_grad():
        _close(m(x), want, F64, "eval")
    m.train()
    a, b = m(x), m(x)  # no Gumbel sampling with fixed_k: deterministic, the same value
    assert torch.equal(a, b) and m.last_choice is None
    _close(a.detach(), want, F64, "train")
    rebuilt = ACMMLP.from_swap(None, m.swap_config())
    assert rebuilt.fixed_k == fixed


def test_outside_phase_three_training_mode_keeps_the_gates_decisions():
    """A later training pass (ASP, STEP, ...) trains the learners under the gates' argmax choices:
    deterministic, equal to eval, the gate gets no gradient, and nothing of the graph stays on the
    module (it must deep-copy). Oracle: the eval output (same weights), float64 tolerance."""
    m = _acm()
    m.use_gate = False  # the default of a restored or finished ACM
    x = torch.randn(59, 20, dtype=torch.float64)
    with torch.no_grad():
        want = m(x)
    m.train()
    a = m(x)
    _close(a.detach(), want, F64, "train mode without the sampled gate")
    a.sum().backward()
    assert m.last_choice is None and m.gate.fc1.weight.grad is None and m.fc1.weight.grad is not None
    copy.deepcopy(m)
    assert ACMMLP.from_swap(None, m.swap_config()).use_gate is False


@pytest.mark.parametrize(("gated", "out_bias"), [(False, True), (True, False)])
def test_prefix_outputs_equal_execute_at_every_k(gated, out_bias):
    m = _acm(gated, "gelu_tanh", out_bias=out_bias)
    x = torch.randn(59, 20, dtype=torch.float64)
    with torch.no_grad():
        pre = m.prefix_outputs(x)
        assert pre.shape == (59, N + 1, 13)
        for n in range(N + 1):
            want = m.execute(x, torch.full((59,), n))
            want = want if m.bias2 is None else want + m.bias2
            _close(pre[:, n], want, F64, f"k={n}")
        bias = torch.zeros(13, dtype=x.dtype) if m.bias2 is None else m.bias2
        assert torch.equal(pre[:, 0], bias.expand(59, 13))  # k = 0: the shared bias only


# ---- the training forward: hard Gumbel straight-through ---------------------------------------------


@pytest.mark.parametrize(("gated", "k_min"), [(False, 0), (True, 1)])
def test_training_forward_is_the_prefix_at_the_sampled_choice(gated, k_min):
    m = _acm(gated, "silu" if gated else "gelu", k_min).train()
    x = torch.randn(97, 20, dtype=torch.float64)
    torch.manual_seed(11)
    out = m(x)
    y = m.last_choice
    assert y.shape == (97, N + 1 - k_min)
    assert torch.allclose(y.detach(), F.one_hot(y.argmax(-1), y.shape[1]).float(), atol=1e-6)  # one-hot
    k = y.argmax(-1) + k_min
    assert len(set(k.tolist())) >= 2  # the samples differ: the check is not at one k
    with torch.no_grad():
        want = m.prefix_outputs(x)[torch.arange(97), k]
    # the straight-through one-hot is y_hard − y_soft.detach() + y_soft in float32: 1 ulp off 0/1
    _close(out.detach(), want, 1e-6, "training value")


@pytest.mark.parametrize("gated", [False, True])
def test_straight_through_gradients_reach_gate_and_learners_as_in_the_paper(gated):
    """Gradients of the task loss reach the gate and every learner weight; they equal those of the
    paper's ``Σ_c y_c h(z, c)`` with the same Gumbel noise (oracle; float32 one-hot: 1e-5 relative)."""
    m = _acm(gated, "silu" if gated else "gelu").train()
    x = torch.randn(61, 20, dtype=torch.float64)
    target = torch.randn(61, 13, dtype=torch.float64)
    torch.manual_seed(5)
    ((m(x) - target) ** 2).mean().backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    torch.manual_seed(5)  # the same noise: gate(x) then gumbel_softmax, nothing drawn in between
    y = F.gumbel_softmax(m.gate(x).float(), tau=1.0, hard=True)
    pre = m.prefix_outputs(x)  # [T, L+1, d_out], bias2 included (Σ_c y_c = 1)
    paper = (y.double()[:, :, None] * pre).sum(1)
    ((paper - target) ** 2).mean().backward()
    learners = ["fc1.weight", "fc1.bias", "fc2.weight", "bias2"] + (["fc_up.weight"] if gated else [])
    for name in ["gate.fc1.weight", "gate.fc1.bias", "gate.fc2.weight", "gate.fc2.bias", *learners]:
        g = got[name]
        assert torch.isfinite(g).all() and g.abs().max() > 0, f"{name}: no gradient"
        ref = dict(m.named_parameters())[name].grad
        scale = ref.abs().max().item()
        _close(g, ref, 1e-5 * scale, f"{name} vs the paper's form")


def test_budget_term_alone_drives_the_gate_to_the_budget():
    """25 Adam steps on the budget loss alone through the straight-through one-hot: the argmax
    fraction ends within 0.1 of β for β = 1, 0.5, 0.05, from 0.225 at initialisation (oracle: the
    objective's minimum; 400 tokens, so one token is 0.0006 of the fraction)."""
    x = torch.randn(400, 20, generator=torch.Generator().manual_seed(1))

    def fraction_after(beta=None):
        m = _acm(seed=7).float().train()
        opt = torch.optim.Adam(m.gate.parameters(), lr=0.05)
        torch.manual_seed(0)
        for _ in range(25 if beta is not None else 0):
            m(x)
            loss = L.budget_loss([L.fraction(m.last_choice, m.k_min, N)], [1.0], beta)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return (m.choose(x).float().mean() / N).item()

    start = fraction_after()
    for beta in (1.0, 0.5, 0.05):
        got = fraction_after(beta)
        assert abs(got - beta) <= 0.1, f"budget {beta}: fraction {got:.3f} (start {start:.3f})"


# ---- losses -----------------------------------------------------------------------------------------


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
