"""The pure functions of structured pruning against independent oracles.

* the DP against brute force over every combination (exact: same optimum, budget met);
* the uniform allocation against its definition (largest common ratio that fits);
* each importance score against the quantity it claims to be, computed directly on tensors
  (float64, 1e-9 relative): the removal error of a unit, the gradient of a gate on its output;
* the closed-form recoveries against ``torch.linalg.lstsq`` / the definition of bias compensation
  (float64, 1e-8), and least squares never worse than plain zeroing on the fitted data.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from edgecompress.prune import allocate
from edgecompress.prune.groups import Cut, unit_view
from edgecompress.prune.importance import activation, distortion, kept, magnitude, obs, ranking, taylor_batch
from edgecompress.prune.recover import SCALE_LIMIT, refit, ridge_solve, scale_solve

TOL = 1e-9


def _brute(costs, values, cap):
    best = None
    for picks in itertools.product(*(range(len(c)) for c in costs)):
        if sum(c[i] for c, i in zip(costs, picks)) <= cap:
            v = sum(val[i] for val, i in zip(values, picks))
            best = v if best is None or v < best else best
    return best


@pytest.mark.parametrize("seed", range(6))
def test_dp_is_exact_against_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    groups = 4 + seed % 2
    costs = [
        sorted(torch.randint(0, 13, (3 + (g + seed) % 3,), generator=gen).tolist()) for g in range(groups)
    ]
    values = [sorted(torch.rand(len(c), generator=gen).tolist(), reverse=True) for c in costs]
    cap = int(sum(max(c) for c in costs) * (0.3 + 0.1 * seed))
    picks = allocate.dp(costs, values, cap)
    want = _brute(costs, values, cap)
    if want is None:
        assert picks is None
        return
    assert sum(c[i] for c, i in zip(costs, picks)) <= cap
    assert sum(v[i] for v, i in zip(values, picks)) == pytest.approx(want, abs=1e-12)


def test_dp_infeasible_and_unsorted_values():
    assert allocate.dp([[5, 9], [4, 7]], [[1.0, 0.0], [1.0, 0.0]], 8) is None
    # a non-monotone curve: the DP still finds the optimum (the cheaper option is also better here)
    picks = allocate.dp([[2, 5], [3, 6]], [[0.1, 0.5], [0.9, 0.0]], 8)
    assert picks == [0, 1]


def test_quantized_costs_always_meet_the_real_budget():
    costs = [[0.0, 3.3, 7.7, 11.1], [0.0, 1.05, 2.1], [0.0, 5.5, 9.9]]
    values = [[9.0, 4.0, 1.0, 0.0], [3.0, 1.0, 0.0], [8.0, 2.0, 0.0]]
    for cap in (5.0, 10.0, 15.0, 20.0):
        icosts, icap = allocate.quantize(costs, cap, steps=64)
        picks = allocate.dp(icosts, values, icap)
        assert sum(c[i] for c, i in zip(costs, picks)) <= cap + 1e-12


def test_uniform_is_the_largest_common_ratio_that_fits():
    options = [[1, 2, 3, 4], [8, 16, 24, 32, 40]]
    costs = [[10.0 * k for k in options[0]], [1.0 * k for k in options[1]]]
    picks = allocate.uniform(options, costs, capacity=0.5 * (40 + 40))  # keep ≤ 40 of 80
    kept_k = [o[i] for o, i in zip(options, picks)]
    assert kept_k == [2, 16]  # ratio 0.5 → 20 + 16 = 36 ≤ 40; ratio 0.6 → 20 + 24 = 44 > 40
    assert allocate.uniform([[1, 4]], [[10.0, 40.0]], capacity=5.0) is None  # would delete every head


def test_width_options_round_and_blocks():
    assert allocate.width_options(12, 32, 64, allow_zero=False) == [2, 4, 6, 8, 10, 12]
    assert allocate.width_options(97, 1, 16, allow_zero=True) == [0, 16, 32, 48, 64, 80, 96, 97]


def test_cut_indices_and_unit_view_agree():
    cut = Cut("m", "w", 0, 3, repeats=2)  # 2 blocks of 4 units × 3 rows
    t = torch.arange(24.0)[:, None].expand(24, 5)
    idx = cut.indices(4, [1, 3])
    assert idx == [3, 4, 5, 9, 10, 11, 15, 16, 17, 21, 22, 23]
    view = unit_view(t, cut, 4)  # [units, repeats·width·5]
    assert set(view[1, ::5].tolist()) == {3.0, 4.0, 5.0, 15.0, 16.0, 17.0}


def _setup(seed=0, units=5, width=3, d_out=7, rows=59):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, units * width, generator=gen, dtype=torch.float64) + 0.3
    w = torch.randn(d_out, units * width, generator=gen, dtype=torch.float64)
    b = torch.randn(d_out, generator=gen, dtype=torch.float64)
    return x, w, b


def _aug_gram(x):
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    return xa.T @ xa


def test_distortion_is_the_removal_error_of_each_unit():
    x, w, _ = _setup()
    units, width = 5, 3
    score = distortion(w, x.T @ x, units, width)
    for u in range(units):
        cols = list(range(u * width, (u + 1) * width))
        err = (x[:, cols] @ w[:, cols].T).pow(2).sum()  # the output change when unit u goes
        assert float(score[u]) == pytest.approx(float(err), rel=TOL)


def test_taylor_batch_is_the_gradient_of_a_gate_on_the_unit():
    x, w, b = _setup(1)
    units, width = 5, 3
    target = torch.randn(59, 7, dtype=torch.float64)
    gate = torch.ones(units, dtype=torch.float64, requires_grad=True)
    wg = w.clone().requires_grad_(True)
    loss = ((x * gate.repeat_interleave(width)) @ wg.T + b - target).pow(2).mean()
    g_gate, g_w = torch.autograd.grad(loss, [gate, wg])
    assert torch.allclose(taylor_batch(w, g_w, units, width), g_gate, rtol=TOL, atol=1e-12)


def test_activation_and_magnitude_formulas():
    x, w, _ = _setup(2)
    got = activation(w, x.norm(dim=0), 5, 3)
    want = torch.stack(
        [(w[:, u * 3 : u * 3 + 3].abs().sum(0) * x[:, u * 3 : u * 3 + 3].norm(dim=0)).sum() for u in range(5)]
    )
    assert torch.allclose(got, want, rtol=TOL)
    views = [torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)]
    assert torch.allclose(magnitude(views), torch.cat(views, 1).norm(dim=1), rtol=TOL)
    order = ranking(torch.tensor([0.5, 2.0, 0.5, 1.0]))
    assert order.tolist() == [1, 3, 0, 2] and kept(order, 2) == [1, 3]


def test_ridge_solve_equals_lstsq_without_ridge():
    x, w, b = _setup(3)
    y = x @ w.T + b + 0.1 * torch.randn(59, 7, dtype=torch.float64)
    xa = torch.cat([x, torch.ones(59, 1, dtype=x.dtype)], 1)
    v = ridge_solve(xa.T @ xa, xa.T @ y, ridge=0.0, bias_index=15)
    want = torch.linalg.lstsq(xa, y).solution.T
    assert torch.allclose(v, want, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("keep", [[0, 2, 4], [1], []])
def test_refit_modes_against_their_definitions(keep):
    x, w, b = _setup(4)
    gram = _aug_gram(x)
    cols = torch.tensor([u * 3 + j for u in keep for j in range(3)], dtype=torch.long)
    drop = [c for c in range(15) if c not in cols.tolist()]
    y = x @ w.T + b  # the dense output
    w0, b0, const = refit(w, b, gram, cols, "none", 0.0)
    assert torch.equal(w0[:, drop], torch.zeros(7, len(drop), dtype=torch.float64)) and torch.equal(b0, b)
    wb, bb, _ = refit(w, b, gram, cols, "bias", 0.0)
    assert torch.allclose(bb, b + w[:, drop] @ x[:, drop].mean(0), rtol=1e-10)
    assert torch.allclose((x @ wb.T + bb).mean(0), y.mean(0), rtol=1e-8, atol=1e-10)  # mean output kept
    wl, bl, const = refit(w, b, gram, cols, "lstsq", 0.0)
    xa = torch.cat([x[:, cols], torch.ones(59, 1, dtype=x.dtype)], 1)
    want = torch.linalg.lstsq(xa, y).solution.T
    assert torch.allclose(wl[:, cols], want[:, :-1], rtol=1e-7, atol=1e-8)
    assert torch.allclose(bl, want[:, -1], rtol=1e-7, atol=1e-8)
    err = {
        name: float((x @ ww.T + bb_ - y).pow(2).sum())
        for name, (ww, bb_) in {"none": (w0, b0), "bias": (wb, bb), "lstsq": (wl, bl)}.items()
    }
    assert err["lstsq"] <= err["bias"] + 1e-9 <= err["none"] + 2e-9
    assert torch.allclose(const, y.mean(0), rtol=1e-10)  # a removed branch becomes its mean output


@pytest.mark.parametrize("bias", [True, False])
def test_scale_solve_is_the_least_squares_scale_per_unit(bias):
    """Kwon et al.'s mask tuning against its definition: the least-squares scales of the units'
    output contributions (one design column per unit, built explicitly), bias held, no ridge."""
    x, w, b = _setup(5)
    units, width = 5, 3
    gen = torch.Generator().manual_seed(6)
    y = x @ (w * (1 + 0.3 * torch.randn(1, 15, generator=gen, dtype=torch.float64))).T + b
    y = y + 0.05 * torch.randn(59, 7, generator=gen, dtype=torch.float64)
    xa = torch.cat([x, torch.ones(59, 1, dtype=x.dtype)], 1) if bias else x
    cur = torch.cat([w, b[:, None]], 1) if bias else w
    v = scale_solve(cur, xa.T @ xa, xa.T @ y, width, 0.0, bias)
    design = torch.stack(
        [(x[:, u * 3 : u * 3 + 3] @ w[:, u * 3 : u * 3 + 3].T).flatten() for u in range(units)], 1
    )
    s = torch.linalg.lstsq(design, (y - (b if bias else 0.0)).flatten()[:, None]).solution[:, 0]
    assert torch.allclose(v[:, :15], w * s.repeat_interleave(width), rtol=1e-8, atol=1e-10)
    if bias:
        assert torch.equal(v[:, 15], b)  # the bias is held
    err = {n: float((xa @ m.T - y).pow(2).sum()) for n, m in {"scaled": v, "kept": cur}.items()}
    assert err["scaled"] < err["kept"]
    strong = scale_solve(cur, xa.T @ xa, xa.T @ y, width, 1e6, bias)  # a huge ridge: scales → 1
    assert torch.allclose(strong, cur, rtol=1e-4, atol=1e-5)


def test_scale_solve_rejects_out_of_range_scales():
    x, w, b = _setup(7)
    y = x @ (w * (2 * SCALE_LIMIT)).T  # every unit would need a scale of 20
    v = scale_solve(w, x.T @ x, x.T @ y, 3, 0.0, False)
    assert torch.equal(v, w)  # Kwon et al.'s guard: the layer stays as it was


def test_refit_scale_uses_the_dense_output_as_target():
    x, w, b = _setup(8)
    gram, cols = _aug_gram(x), torch.tensor([0, 1, 2, 9, 10, 11])
    ws, bs, _ = refit(w, b, gram, cols, "scale", 0.0, width=3)
    xa = torch.cat([x, torch.ones(59, 1, dtype=x.dtype)], 1)
    want = scale_solve(torch.cat([w, b[:, None]], 1)[:, [0, 1, 2, 9, 10, 11, 15]], xa[:, [0, 1, 2, 9, 10, 11, 15]].T @ xa[:, [0, 1, 2, 9, 10, 11, 15]],
                       xa[:, [0, 1, 2, 9, 10, 11, 15]].T @ (x @ w.T + b), 3, 0.0, True)  # fmt: skip
    assert torch.allclose(ws[:, cols], want[:, :6], rtol=1e-10) and torch.equal(bs, b)
    assert torch.equal(ws[:, [3, 4, 5, 6, 7, 8, 12, 13, 14]], torch.zeros(7, 9, dtype=torch.float64))


@pytest.mark.parametrize(("bias", "ridge"), [(True, 0.0), (False, 0.3), (True, 0.3)])
def test_obs_removes_greedily_the_unit_whose_refit_error_is_least(bias, ridge):
    """Every step of the structured-OBS order against brute force: among the units left, the one
    removed next is the one whose removal leaves the least ``‖X̃V − Y‖² + λ‖V_w − W‖²`` (``Y`` the
    dense output, removed columns of ``V`` zero, the kept ones and the bias refit by ``ridge_solve``
    with the same ``λ``)."""
    x, w, b = _setup(9, units=6, width=2, d_out=5)
    gram = _aug_gram(x)
    order = ranking(obs(w, b if bias else None, gram, 6, 2, ridge)).flip(0)  # first removed first
    lam = ridge * float(gram.diagonal()[:12].mean())
    wt = torch.cat([w, b[:, None]], 1) if bias else w
    xa = torch.cat([x, torch.ones(59, 1, dtype=x.dtype)], 1)[:, : wt.shape[1]]
    y = xa @ wt.T

    def error(removed):
        cols = [c for c in range(12) if c // 2 not in removed]
        sel = cols + ([12] if bias else [])
        g = gram[sel][:, sel]
        rel = lam / float(g.diagonal()[: len(cols)].mean())  # ridge_solve's λ is relative to its own Gram
        v = ridge_solve(g, g @ wt[:, sel].T + gram[sel][:, [c for c in range(12) if c not in cols]] @ wt[:, [c for c in range(12) if c not in cols]].T,
                        rel, len(cols) if bias else None, wt[:, sel])  # fmt: skip
        penalty = (v[:, : len(cols)] - w[:, cols]).pow(2).sum() + w[
            :, [c for c in range(12) if c not in cols]
        ].pow(2).sum()
        return float((xa[:, sel] @ v.T - y).pow(2).sum() + lam * penalty)

    removed: list[int] = []
    for u in order[:-1].tolist():
        errs = {c: error(removed + [c]) for c in range(6) if c not in removed}
        assert errs[u] <= min(errs.values()) * (1 + 1e-9) + 1e-9, (u, errs)
        assert (
            sorted(errs.values())[1] > min(errs.values()) * (1 + 1e-6) or len(errs) == 1
        )  # no tie: the test can fail
        removed.append(u)
