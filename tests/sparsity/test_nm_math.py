"""N:M math (oracles: brute force over every group, exact; hand-computed optimizer steps, fp64 ≤ 1e-12)."""

from __future__ import annotations

import pytest
import torch

from edgecompress.sparsity.nm.masks import index_bits, nm_mask, pack, unpack
from edgecompress.sparsity.nm.modules import NMMask
from edgecompress.sparsity.nm.step import StepAdamW

RATIOS = [(2, 4), (1, 4), (2, 8), (1, 8), (4, 8), (3, 5)]


@pytest.mark.parametrize("n,m", RATIOS)
@pytest.mark.parametrize("out", [1, 59, 97])
def test_mask_keeps_exactly_the_n_largest_of_every_group(n, m, out):
    w = torch.randn(out, 8 * m * 3, generator=torch.Generator().manual_seed(out))
    mask = nm_mask(w, n, m)
    groups, keep = w.abs().reshape(out, -1, m), mask.reshape(out, -1, m)
    assert bool((keep.sum(-1) == n).all())  # property: exactly n of every m
    kept_min = torch.where(keep, groups, torch.inf).amin(-1)
    dropped_max = torch.where(keep, -torch.inf, groups).amax(-1)
    assert bool((kept_min >= dropped_max).all())  # brute force: no dropped weight beats a kept one


def test_mask_by_score_and_ties():
    w = torch.ones(2, 8)
    assert nm_mask(w, 2, 4).tolist()[0] == [True, True, False, False] * 2  # ties: lower index wins
    scores = torch.arange(16.0).reshape(2, 8)
    assert nm_mask(w, 1, 4, scores).tolist()[1] == [False, False, False, True] * 2


@pytest.mark.parametrize("n,m", RATIOS)
def test_pack_unpack_is_exact(n, m):
    w = torch.randn(59, 6 * m, generator=torch.Generator().manual_seed(m))
    mask = nm_mask(w, n, m)
    values, packed = pack(w * mask, mask, n, m)
    assert values.shape == (59, 6 * n) and packed.dtype == torch.uint8
    assert packed.numel() == -(-59 * 6 * n // (8 // index_bits(m)))  # positions, several per byte
    dense, back = unpack(values, packed, n, m, 6 * m)
    assert torch.equal(dense, w * mask) and torch.equal(back, mask)


def test_pack_refuses_a_mask_that_is_not_nm():
    w = torch.randn(3, 8)
    with pytest.raises(ValueError, match="not 2:4"):
        pack(w, torch.ones(3, 8, dtype=torch.bool), 2, 4)
    with pytest.raises(ValueError, match="0 < n < m"):
        nm_mask(w, 4, 4)
    with pytest.raises(ValueError, match="divisible by 4"):
        nm_mask(torch.randn(3, 7), 2, 4)


def test_sr_ste_gradient_by_hand():
    """One step of SGD(lr=1) on loss = Σ c ⊙ W̃ through an STE mask with decay λ: the gradient is
    c + λ·(1 − mask) ⊙ w (SR-STE, eq. 4), including the dropped weights."""
    w = torch.nn.Parameter(torch.tensor([[0.5, -0.1, 0.3, 0.05, -2.0, 1.0, 0.2, -0.4]]))
    c = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])
    el = NMMask(2, 4, 1, 8, mode="ste", decay=0.01)
    (el(w) * c).sum().backward()
    mask = torch.tensor([[1.0, 0, 1, 0, 1, 1, 0, 0]])
    assert torch.equal(el.mask.float(), mask)
    torch.testing.assert_close(w.grad, c + 0.01 * (1 - mask) * w.detach(), rtol=0, atol=1e-7)


def test_step_frozen_variance_update_by_hand():
    """Two phase-1 steps (AdamW), a forced switch at t_max = 2, then one phase-2 step with v frozen:
    p ← p − lr·(m/(1−β1^t))/(√v̂_frozen + ε). fp64, hand-computed."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    b1, b2, lr, eps = 0.9, 0.99, 0.1, 1e-8
    opt = StepAdamW([p], [p], lr, (b1, b2), eps, 0.0, t_min=0, t_max=2, switch_tol=1e-9)  # t_max decides
    grads = [torch.tensor([0.5, 1.0]), torch.tensor([-1.0, 2.0]), torch.tensor([3.0, -1.0])]
    m = v = torch.zeros(2, dtype=torch.float64)
    ref = p.detach().clone()
    for t, g in enumerate(grads, start=1):
        g = g.double()
        p.grad = g.clone()
        opt.step()
        m = b1 * m + (1 - b1) * g
        if t <= 2:
            v = b2 * v + (1 - b2) * g * g
            v_frozen = v / (1 - b2**t)
        ref = ref - lr * (m / (1 - b1**t)) / (v_frozen.sqrt() + eps)
        torch.testing.assert_close(p.detach(), ref, rtol=0, atol=1e-12)
    assert opt.switch_step == 2 and opt.phase == 2


def test_autoswitch_follows_the_variance_and_t_max_forces_it():
    """Gradients whose scale settles: the relative variance change falls to the stationary rate and
    AutoSwitch fires after t_min with a full window (β2 = 0.99: 100 steps), before t_max; with a
    tolerance nothing can meet, it fires exactly at t_max."""

    def run(tol, t_max=400):
        gen = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.zeros(64))
        opt = StepAdamW([p], [p], 1e-3, (0.9, 0.99), 1e-8, 0.0, t_min=20, t_max=t_max, switch_tol=tol)
        for t in range(1, t_max + 1):
            p.grad = torch.randn(64, generator=gen) * (1 + 50 * 0.97**t)  # large early, then steady
            opt.step()
            if opt.phase == 2:
                return opt.switch_step
        return None

    early = run(2.0)
    assert early is not None and 100 <= early < 400, early  # not before a full window
    assert run(1e-6) == 400
