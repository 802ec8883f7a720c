"""The reconstruction's held-out ridge (``ridge_folds``), input-side drift correction (``recover_inputs``), ``curve_samples``.

Oracles and tolerances:

* :func:`choose_ridge` against K-fold cross-validation written out on the explicit rows (float64
  ridge normal equations per fold): the same ridge and the same held-out errors (1e-8 relative);
* the folds hold out whole samples: every real token of a text lands in its sample's fold (exact);
* ``curve_samples``: the curves' reference holds the first whole batches reaching N samples, the
  statistics count every calibration token (exact counts);
* ``recover_inputs``: every input-side Linear of the pruned model (q / k / v of a fused qkv, fc1) is
  the least-squares fit (no ridge) of its pruned-model input (with a constant column) against the dense
  model's output of its kept rows on the same tokens; the kept rows' dense weights are read from the
  same pass without ``recover_inputs`` (same plan). The error is at the minimum to 1e-6 of the
  target's energy (float32 products) and within 5 % of the gap to the rows left as they were.
"""

from __future__ import annotations

import copy

import pytest
import torch

from edgecompress.pipeline import run
from edgecompress.prune import PruneStructured
from edgecompress.prune.reconstruct import _row_folds, _Sums, choose_ridge
from tests.conftest import tiny_timm
from tests.prune.test_prune_pass import _ctx, _rows


def _cv_oracle(x, y, folds, prior, ridge, bias_index):
    """Σ_f ‖X_f V_{−f}ᵀ − Y_f‖², V_{−f} the ridge fit (towards ``prior``, bias not penalised) on the other folds."""
    total = 0.0
    for f in range(int(folds.max()) + 1):
        xt, yt, xh, yh = x[folds != f], y[folds != f], x[folds == f], y[folds == f]
        g = xt.T @ xt
        pen = torch.ones(x.shape[1], dtype=x.dtype)
        pen[bias_index] = 0
        lam = ridge * float(g.diagonal()[pen > 0].mean())
        v = torch.linalg.solve(g + torch.diag(lam * pen), xt.T @ yt + (lam * pen)[:, None] * prior.T).T
        total += float((xh @ v.T - yh).pow(2).sum())
    return total


@pytest.mark.parametrize("mapped", [False, True])
def test_choose_ridge_is_k_fold_cross_validation(mapped):
    gen = torch.Generator().manual_seed(5)
    n, k, d = 97, 7, 3
    x = torch.cat(
        [torch.randn(n, k, generator=gen, dtype=torch.float64), torch.ones(n, 1, dtype=torch.float64)], 1
    )
    y = x[:, :k] @ torch.randn(k, d, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(n, d, generator=gen, dtype=torch.float64)  # fmt: skip
    folds = torch.arange(n) % 3
    sums = _Sums(k + 1, d, 3)
    sums.add(x, y, folds)
    map_ = torch.randn(5, d, generator=gen, dtype=torch.float64) if mapped else None
    target = y @ map_.T if mapped else y
    prior = torch.randn(target.shape[1], k + 1, generator=gen, dtype=torch.float64)
    grid = (0.0001, 0.01, 0.3, 3.0)
    best, errs = choose_ridge(sums, prior, k, grid, map_)
    want = {r: _cv_oracle(x, target, folds, prior, r, k) for r in grid}
    for r in grid:
        assert errs[r] == pytest.approx(want[r], rel=1e-8)
    assert best == min(want, key=want.get)
    assert len({round(e, 6) for e in errs.values()}) == len(grid)  # the grid really differs


def test_row_folds_hold_out_whole_samples():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])
    x = torch.zeros(3, 4, 5)
    assert _row_folds(x, mask, 4, 3).tolist() == [1, 1, 1, 2, 0, 0]  # samples 4, 5, 6 → folds 1, 2, 0
    assert _row_folds(torch.zeros(2, 3, 5), None, 0, 2).tolist() == [0, 0, 0, 1, 1, 1]


@pytest.fixture(scope="module")
def pruned_pair():
    torch.set_num_threads(1)
    loaded = tiny_timm("vit_tiny_patch16_224", depth=3, mlp_ratio=2.0)
    batches, ctx = _ctx(loaded)
    fields = {
        "allocation": "uniform",
        "budget": {"params": 0.4},
        "round_to": 4,
        "ridge": 0.0,
        "ridge_folds": 1,
    }
    runs = [run(copy.deepcopy(loaded.model), [PruneStructured(recover_inputs=r, **fields)], ctx) for r in (False, True)]  # fmt: skip
    return loaded, batches, [m for m, _ in runs], runs[1][1][0]["info"]["prune"]["recovery"]


@pytest.mark.parametrize("layer", ["blocks.1.attn.qkv", "blocks.2.mlp.fc1"])
def test_recover_inputs_is_the_least_squares_fit_to_the_dense_pre_activations(layer, pruned_pair):
    loaded, batches, (plain, drift), info = pruned_pair
    before = plain.get_submodule(layer)  # the kept rows as they were (same plan, inputs not refit)
    x = _rows(drift, batches, layer, False)  # [T, d] float64, the same tokens in the same order
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    target = (
        _rows(loaded.model, batches, layer, False) @ before.weight.detach().double().T
        + before.bias.detach().double()
    )
    want = torch.linalg.lstsq(x, target).solution.T
    got = drift.get_submodule(layer)
    fit = torch.cat([got.weight.detach().double(), got.bias.detach().double()[:, None]], 1)
    plain_fit = torch.cat([before.weight.detach().double(), before.bias.detach().double()[:, None]], 1)
    err_got, err_want, err_plain = (float((x @ v.T - target).pow(2).sum()) for v in (fit, want, plain_fit))
    # at the minimum up to float32 products (measured 2e-5 above it, 7e-8 of the target's energy), and
    # the rows left as they were are clearly not (measured 1.2e-3 / 4e-3 above it)
    assert err_want <= err_got <= err_want + 1e-6 * float(target.pow(2).sum())
    assert err_got - err_want < 0.05 * (err_plain - err_want)
    report = info["layers"][layer.rsplit(".", 1)[0]]["inputs"][layer]
    assert report["after"] < report["before"]  # the layers before drifted the input; the refit corrects it


def test_curve_samples_measures_curves_on_the_first_batches_and_fits_on_all():
    loaded = tiny_timm("vit_tiny_patch16_224", depth=2, mlp_ratio=2.0)
    batches, ctx = _ctx(loaded, n=3, batch=5)
    prep = PruneStructured(curve_samples=7, curve_points=3, round_to=4).prepare(loaded.model, ctx)
    assert len(prep.ref.batches) == 2  # whole batches until 7 samples are reached: 5 + 5
    rows = sum(b.shape[0] for b in batches) * 17  # every token of the 3 batches (32×32 / patch 8 + cls)
    assert all(float(st.gram[-1, -1]) == rows for st in prep.stats.values())
