"""The ``prune_structured`` pass: allocation, budgets, granularities and bad recipes.

Oracles and tolerances:

* the layer-adaptive DP against the uniform allocation on the *same* measured curves: its summed
  distortion is never larger (exact optimum, float tolerance 1e-12), and the budget is met;
* every budget measure against its definition: the kept cost ≤ (1 − budget) × the total, the FLOPs
  count against a hand count of a tiny ViT's multiply-adds (exact);
* ``recovery: lstsq`` against ``torch.linalg.lstsq`` on the rows the pruned model really computes
  (row-weighted by ``1 / σ`` of the dense stream with ``norm_weighted``; a group kept whole with
  ``refit_kept``): the error at the minimum to 1e-6 (1e-4 weighted / whole, float32 products);
* a removed branch against the unpruned model with that branch's units zeroed (float64, 1e-10) —
  via the pass, and restore bit-identical (torch.equal);
* bad recipes: one ``edgecompress: error:`` line, exit code 2, no output folder (as tests/test_cli.py).
"""

from __future__ import annotations

import copy

import pytest
import torch

from edgecompress.calib import make_context
from edgecompress.errors import UserError
from edgecompress.export.inputs import as_batch, synthetic
from edgecompress.models.loading import load_model, restore
from edgecompress.pipeline import run
from edgecompress.prune import ConstantBranch, PruneStructured
from edgecompress.prune.plan import allocate_widths
from edgecompress.structure import save
from tests.conftest import assert_recipe_exits_2, tiny_timm


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ctx(loaded, n=2, batch=5):
    batches = [as_batch(loaded, synthetic(loaded, batch, seed=30 + i)) for i in range(n)]
    return batches, make_context(batches, loaded.call, torch.device("cpu"), kind=loaded.kind)


def _run(loaded, n=2, **fields):
    batches, ctx = _ctx(loaded, n)
    model, records = run(copy.deepcopy(loaded.model), [PruneStructured(**fields)], ctx)
    return model, records[0]["info"]["prune"], batches


@pytest.mark.parametrize("importance", ["magnitude", "taylor", "activation", "distortion", "obs"])
def test_layer_adaptive_dp_beats_uniform_on_its_own_curves(importance, one_thread):
    loaded = tiny_timm("vit_tiny_patch16_224", depth=3, mlp_ratio=2.0)
    model, info, _ = _run(loaded, importance=importance, budget={"params": 0.45}, curve_points=4, round_to=4)
    rows = {r["name"]: r for r in info["groups"]}
    curves = {n: {int(k): v for k, v in r["curve"].items()} for n, r in rows.items()}
    assert info["removed"] >= 0.45 and info["cost_after"] <= 0.55 * info["cost_total"] + 1e-9
    dp_sum = info["additivity"]["sum_of_single"]
    assert dp_sum == pytest.approx(sum(_interp(curves[n], r["kept"]) for n, r in rows.items()), rel=1e-9)
    assert info["additivity"]["joint"] > 0
    # the uniform allocation on the same curves is feasible and no better
    from edgecompress.prune.plan import Table

    opts = {n: sorted(_options(r, 4)) for n, r in rows.items()}
    table = Table(
        opts, {n: [k * rows[n]["cost_dense"] / rows[n]["units"] for k in o] for n, o in opts.items()}
    )
    uni = allocate_widths(table, 0.45, None)
    assert sum(_interp(curves[n], k) for n, k in uni.items()) >= dp_sum - 1e-12


def _options(row, round_to):
    width = 12 if row["kind"] == "heads" else 1  # head_dim of the tiny ViT (48 / 4)
    return [k for k in range(1, row["units"]) if k * width % round_to == 0] + [row["units"]]


def _interp(curve: dict[int, float], k: int) -> float:
    import numpy as np

    xs = sorted(curve)
    return float(np.interp(k, xs, [curve[x] for x in xs]))


def test_scale_recovery_only_rescales_kept_units_and_lowers_every_layer_error(one_thread):
    """``recovery: scale`` (Kwon et al.'s mask tuning) against the same pruning without recovery: every
    kept unit's output-projection columns are that unit's columns times one number, the biases are
    unchanged, and each layer's error on the calibration data is no larger after its refit."""
    loaded = tiny_timm("vit_tiny_patch16_224", depth=3, mlp_ratio=2.0)
    fields = {"allocation": "uniform", "budget": {"params": 0.4}, "round_to": 4}
    plain, _, _ = _run(loaded, recovery="none", **fields)
    scaled, info, _ = _run(loaded, recovery="scale", ridge=0.0, **fields)
    layers = info["recovery"]["layers"]
    assert len(layers) == 6 and all(v["after"] <= v["before"] * (1 + 1e-9) for v in layers.values())
    assert sum(v["after"] for v in layers.values()) < 0.999 * sum(v["before"] for v in layers.values())
    for name, width in (("attn.proj", 12), ("mlp.fc2", 1)):
        for i in range(3):
            a, b = plain.get_submodule(f"blocks.{i}.{name}"), scaled.get_submodule(f"blocks.{i}.{name}")
            assert torch.equal(a.bias, b.bias)
            wa = a.weight.double().reshape(a.out_features, -1, width).transpose(0, 1).flatten(1)
            wb = b.weight.double().reshape(b.out_features, -1, width).transpose(0, 1).flatten(1)
            s = (wa * wb).sum(1) / wa.pow(2).sum(1)  # the least-squares ratio per unit
            assert torch.allclose(wb, s[:, None] * wa, rtol=1e-5, atol=1e-6)
            assert (s - 1).abs().max() > 1e-4  # really rescaled


def _rows(model, batches, module: str, output: bool) -> torch.Tensor:
    """Every token row of ``module``'s input (or output) over ``batches``."""
    rows = []
    hook = (lambda _m, _a, o: rows.append(o)) if output else (lambda _m, a: rows.append(a[0]))
    h = (
        model.get_submodule(module).register_forward_hook
        if output
        else model.get_submodule(module).register_forward_pre_hook
    )(hook)
    try:
        with torch.no_grad():
            for b in batches:
                model(b)
    finally:
        h.remove()
    return torch.cat([r.reshape(-1, r.shape[-1]) for r in rows]).double()


def _stream_target(dense, pruned, batches, layer: str):
    """(rows of ``layer``'s pruned input with a constant column, Kwon et al.'s target: the dense output
    plus the dense residual stream minus the pruned one, the dense stream itself) — timm pre-norm blocks."""
    block, norm = layer.split(".")[:2], "norm1" if "attn" in layer else "norm2"
    stream = f"{block[0]}.{block[1]}.{norm}"
    dense_stream = _rows(dense, batches, layer, True) + _rows(dense, batches, stream, False)
    x = _rows(pruned, batches, layer, False)
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    return xa, dense_stream - _rows(pruned, batches, stream, False), dense_stream


def _assert_least_squares(
    got: torch.nn.Linear, xa, target, weights=None, rel: float = 1e-6, wtol=5e-3
) -> None:
    """``got`` (weight and bias) is the (row-weighted) least-squares fit of ``target`` on ``xa``: its
    error within ``rel`` of the minimum, which the unweighted fit misses where ``weights`` are given."""
    w = torch.ones(len(xa), 1, dtype=xa.dtype) if weights is None else weights[:, None]
    want = torch.linalg.lstsq(w * xa, w * target).solution.T
    fit = torch.cat([got.weight.detach().double(), got.bias.detach().double()[:, None]], 1)
    err_got, err_want = (float((w * (xa @ v.T - target)).pow(2).sum()) for v in (fit, want))
    # the minimum to float32 accuracy (measured 1.4e-7 relative for a pruned projection, up to 2.2e-5
    # for a whole one and for weighted rows); the weights themselves only to ``wtol``: the attention
    # inputs of a random tiny ViT leave flat directions
    assert err_want <= err_got <= err_want * (1 + rel)
    if wtol is not None:  # measured 1.1e-3 unweighted, 4e-2 for the whole attn.proj and weighted rows
        assert (fit - want).abs().max() <= wtol * want.abs().max()
    if weights is not None:
        plain = torch.linalg.lstsq(xa, target).solution.T
        assert float((w * (xa @ plain.T - target)).pow(2).sum()) > err_want * (1 + 100 * rel)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("layer", ["blocks.1.attn.proj", "blocks.2.mlp.fc2"])
def test_lstsq_recovery_is_the_least_squares_fit_on_the_pruned_inputs(layer, weighted, one_thread):
    """Kwon et al.'s mask-tuning problem, solved directly: a layer after pruned ones is refit to the
    least-squares solution (no ridge) of its pruned input (with a constant column) against the dense
    output plus the dense residual stream minus the pruned one — what the pruned model computes up to
    it is fixed once the layers before it are refit. ``norm_weighted``: each token row weighted by
    ``1 / σ`` of its dense stream row (the next LayerNorm's divisor)."""
    loaded = tiny_timm("vit_tiny_patch16_224", depth=3, mlp_ratio=2.0)
    model, info, batches = _run(
        loaded, allocation="uniform", budget={"params": 0.4}, round_to=4, ridge=0.0, ridge_folds=1,
        norm_weighted=weighted,
    )  # fmt: skip
    xa, target, stream = _stream_target(loaded.model, model, batches, layer)
    weights = 1.0 / stream.var(1, unbiased=False).sqrt() if weighted else None
    if weighted:
        assert float(weights.max() / weights.min()) > 1.5  # the rows' scales really differ
    _assert_least_squares(
        model.get_submodule(layer), xa, target, weights, *((1e-4, None) if weighted else (1e-6, 5e-3))
    )
    name = layer.rpartition(".")[0]
    assert info["recovery"]["layers"][name]["after"] < info["recovery"]["layers"][name]["before"]


def test_refit_kept_refits_the_groups_the_allocation_kept_whole(one_thread):
    """``refit_kept`` (Kwon et al.'s code tunes every layer): a group the layer-adaptive allocation kept
    whole, after a pruned one, is the least-squares fit of its target like a pruned one; without it
    that group is the dense one, bit for bit."""
    loaded = tiny_timm("vit_tiny_patch16_224", depth=3, mlp_ratio=2.0)
    fields = {
        "budget": {"params": 0.15},
        "round_to": 4,
        "ridge": 0.0,
        "ridge_folds": 1,
        "norm_weighted": False,
    }
    # 4 batches: 340 token rows for the 193 columns of a whole projection (2 would leave it underdetermined)
    runs = [_run(loaded, 4, refit_kept=k, **fields) for k in (True, False)]
    (model, info, batches), (plain, plain_info, _) = runs
    first_cut = next(i for i, g in enumerate(info["groups"]) if g["kept"] < g["units"])
    name = next(g["name"] for g in info["groups"][first_cut:] if g["kept"] == g["units"])  # needed here
    layer = f"{name}.{'proj' if name.endswith('attn') else 'fc2'}"
    assert name in info["recovery"]["layers"] and name not in plain_info["recovery"]["layers"]
    dense = loaded.model.get_submodule(layer)
    assert torch.equal(plain.get_submodule(layer).weight, dense.weight)
    xa, target, _ = _stream_target(loaded.model, model, batches, layer)
    assert float(torch.linalg.matrix_rank(xa)) == xa.shape[1]  # a unique fit
    _assert_least_squares(model.get_submodule(layer), xa, target, rel=1e-4, wtol=None)  # ill-conditioned
    best = torch.linalg.lstsq(xa, target).solution.T
    as_dense = torch.cat([dense.weight.detach().double(), dense.bias.detach().double()[:, None]], 1)
    err_dense, err_best = (float((xa @ v.T - target).pow(2).sum()) for v in (as_dense, best))
    assert err_dense > err_best * 1.01  # the dense weights are far from the fit: 1e-4 tells them apart


def test_flops_budget_counts_multiply_adds(one_thread):
    loaded = tiny_timm("vit_tiny_patch16_224", mlp_ratio=2.0)  # 32×32, patch 8: 16 patches + cls = 17 tokens
    _, info, _ = _run(loaded, allocation="uniform", budget={"flops": 0.3}, recovery="none", round_to=4)
    n, d, hd, hidden = 17, 48, 12, 96
    head = (
        n * (3 * hd * d + 3 * hd + d * hd) + 2 * n * n * hd
    )  # q, k, v rows (+ biases), proj columns; qkᵀ and pv
    channel = n * (d + 1 + d)  # an fc1 row (+ bias) and an fc2 column
    assert info["cost_total"] == pytest.approx(2 * (4 * head + hidden * channel), rel=1e-12)
    assert info["cost_after"] <= 0.7 * info["cost_total"] + 1e-6


def test_latency_budget_uses_a_measured_table(one_thread):
    loaded = tiny_timm("vit_tiny_patch16_224", mlp_ratio=2.0)
    _, info, _ = _run(
        loaded,
        budget={"latency": 0.3},
        latency_seconds=0.05,
        latency_points=4,
        curve_points=3,
        latency_rounds=0,
    )
    assert info["cost_after"] <= 0.7 * info["cost_total"] + 1e-9
    for r in info["groups"]:
        assert r["latency_measured_widths"][-1] == r["units"] and len(r["latency_measured_widths"]) <= 4
        assert r["cost_dense"] > 0


def test_blocks_remove_whole_branches_exactly(one_thread, tmp_path):
    loaded = tiny_timm("vit_tiny_patch16_224", mlp_ratio=2.0)
    with pytest.raises(UserError, match="would delete every head or channel of a layer"):
        _run(loaded, granularity=("heads",), budget={"params": 0.9}, round_to=4)
    model, info, batches = _run(loaded, granularity=("blocks",), budget={"params": 0.5}, recovery="none")
    removed = [r["name"] for r in info["groups"] if r["kept"] == 0]
    assert removed and all(r["kept"] in (0, r["units"]) for r in info["groups"])
    assert sum(isinstance(m, ConstantBranch) for m in model.modules()) == len(removed)
    zeroed = copy.deepcopy(loaded.model).double()
    for name in removed:  # the oracle: every unit of the removed branches zeroed in the unpruned model
        out = zeroed.get_submodule(name + (".proj" if name.endswith("attn") else ".fc2"))
        out.weight.data.zero_()
    x = batches[0].double()
    with torch.no_grad():
        want, got = zeroed(x), copy.deepcopy(model).double()(x)
    assert (want - got).abs().max() <= 1e-10 * want.abs().max()
    back = restore(save(model, tmp_path / "out", {}))
    with torch.no_grad():
        assert torch.equal(back(batches[0]), model(batches[0]))


def test_cross_fitted_curves_equal_in_sample_ones_on_identical_folds(one_thread):
    """The oracle of ``curve_folds``: when every fold holds the same batch, fitting on one and measuring
    on the other is the in-sample measurement (float32 forward, 1e-6); on different batches it is not."""
    loaded = tiny_timm("vit_tiny_patch16_224", depth=2, mlp_ratio=2.0)
    b = as_batch(loaded, synthetic(loaded, 7, seed=3))
    other = as_batch(loaded, synthetic(loaded, 7, seed=4))

    def curves(batches, folds):
        ctx = make_context(batches, loaded.call, torch.device("cpu"), kind=loaded.kind)
        p = PruneStructured(curve_folds=folds, curve_points=3, round_to=4)
        prep = p.prepare(loaded.model, ctx)
        return [v for c in prep.curves.values() for v in c.values()]

    same = curves([b, b], 1)
    assert curves([b, b], 2) == pytest.approx(same, rel=1e-6, abs=1e-12) and max(same) > 0
    assert curves([b, other], 2) != pytest.approx(curves([b, other], 1), rel=1e-3)


BAD = {
    "budget above 1": ("passes: [{pass: prune_structured, budget: {params: 1.2}}]",
                       "passes[0]: budget params must be a fraction in (0, 1) to remove, got 1.2"),
    "budget 0": ("passes: [{pass: prune_structured, budget: {flops: 0}}]", "budget flops must be a fraction in (0, 1)"),
    "unknown measure": ("passes: [{pass: prune_structured, budget: {speed: 0.5}}]", "budget must be one of"),
    "unknown granularity": ("passes: [{pass: prune_structured, granularity: [neurons]}]",
                            "granularity must be a non-empty list of heads | mlp | blocks, got ('neurons',)"),
    "unknown importance": ("passes: [{pass: prune_structured, importance: fisher}]",
                           "importance must be magnitude | taylor | activation | distortion"),
    "after quantization": ("passes: [{pass: uniform_ptq}, {pass: prune_structured}]",
                           "passes[1] 'prune_structured' cannot follow passes[0] 'uniform_ptq'"),
    "after n:m": ("passes: [{pass: nm_oneshot}, {pass: prune_structured}]",
                  "passes[1] 'prune_structured' cannot follow passes[0] 'nm_oneshot'"),
    "curve_folds 0": ("passes: [{pass: prune_structured, curve_folds: 0}]", "curve_folds must be an integer >= 1"),
    "ridge_folds 0": ("passes: [{pass: prune_structured, ridge_folds: 0}]", "ridge_folds must be an integer >= 1"),
    "recover_inputs yes": ("passes: [{pass: prune_structured, recover_inputs: maybe}]",
                           "passes[0].recover_inputs: expected bool"),
    "latency_rounds -1": ("passes: [{pass: prune_structured, latency_rounds: -1}]",
                          "latency_rounds must be an integer >= 0"),
    "every head of a layer": ("calibration: {samples: 8}\neval: {samples: 8}\n"
                              "passes: [{pass: prune_structured, granularity: [heads], budget: {params: 0.9}}]",
                              "budget params=0.9 would delete every head or channel of a layer"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_prune_recipes_exit_2_with_one_line(case, tmp_path, capsys, one_thread):
    assert_recipe_exits_2(*BAD[case], tmp_path, capsys)


def test_hf_bert_heads_prune_unevenly_and_restore(tiny_bert_dir, tmp_path, one_thread):
    loaded = load_model(f"hf:{tiny_bert_dir}")
    from edgecompress.data.specs import load_data

    batches = load_data("text", loaded, "train", samples=8, batch_size=4).batches
    ctx = make_context(batches, loaded.call, torch.device("cpu"), kind=loaded.kind)
    p = PruneStructured(granularity=("heads",), budget={"params": 0.4}, round_to=4, curve_points=4)
    model, records = run(copy.deepcopy(loaded.model), [p], ctx)
    heads = [r["kept"] for r in records[0]["info"]["prune"]["groups"]]
    assert min(heads) >= 1 and sum(heads) <= 0.6 * 2 * 4 + 1e-9
    sizes = [
        model.get_submodule(r["name"]).num_attention_heads for r in records[0]["info"]["prune"]["groups"]
    ]
    assert sizes == heads
    back = restore(save(model, tmp_path / "out", {}))
    with torch.no_grad():
        assert torch.equal(loaded.call(back, batches[0]), loaded.call(model, batches[0]))
