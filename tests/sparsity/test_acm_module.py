"""The ACM module (arXiv 2312.10193): its eval forms against the masked-dense oracle, the training
forward and its straight-through gradients, fixed k, the gate outside phase III, hooks and wrapped
learners, the budget term (the math of the forms and the losses: test_acm_math.py).

Oracles and tolerances: module forwards against :func:`execute.masked_dense` with the gate's
``argmax`` recomputed here (float64: ≤ 1e-12 absolute, outputs ~1); the training forward against
``prefix_outputs`` at the sampled one-hot (float32 straight-through one-hot: 1e-6) and its gradients
against the paper's ``Σ_c y_c h(z, c)`` with the same Gumbel noise (1e-5 rel).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgecompress.sparsity.acm import ACMMLP
from edgecompress.sparsity.acm import losses as L
from edgecompress.sparsity.acm.execute import masked_dense
from tests.kernels.oracle import assert_within_torch_error
from tests.sparsity.test_acm_math import F64, N, _close


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
