"""The bf16 scoring path of the ViT PTQ searches (``scoring: bf16``) against the fp32 reference.

Oracles: the fp32 reference scores and searches (:mod:`edgecompress.quantize.vit_ptq.reference`),
the element-by-element self-MSE, and the exact quantizers. Tolerances are stated per test; the
acceptance rule for a whole search is the issue's: the same parameters, or an fp32 objective
within 0.5 % of the fp32 search's.
"""

from __future__ import annotations

import pytest
import torch

from edgecompress.quantize.reparam import GELU_SHIFT
from edgecompress.quantize.search import fpcs, percentile_ranges
from edgecompress.quantize.vit_ptq import attn as va
from edgecompress.quantize.vit_ptq import objectives as vo
from edgecompress.quantize.vit_ptq import ranks
from edgecompress.quantize.vit_ptq.fastq import AdaLogCandidates, UniformCandidates, fq_uniform
from edgecompress.quantize.vit_ptq.reference import tensor_mse_score
from edgecompress.quantize.vit_ptq.scoring import exact_of
from edgecompress.quantize.vit_ptq.selfmse import sorted_mse_score

BF16 = torch.bfloat16
OBJECTIVE_RTOL = 0.005  # the acceptance: fp32 objective within 0.5 % of the fp32 search's


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layer(t: int, k: int, o: int, seed: int, gelu: bool = False):
    g = _gen(seed)
    x = torch.randn(t, k, generator=g)
    x[:, 3] *= 8  # an outlier channel, as after LayerNorm
    if gelu:
        x = torch.nn.functional.gelu(x * 1.5)
    return x, torch.randn(o, k, generator=g) / k**0.5


def _fp32_mse(x, w, p, bits) -> float:
    y_hat = vo.act_quantize(x, p.act, bits) @ fq_uniform(w, p.w_scale[:, None], p.w_zp[:, None], bits).T
    return float((y_hat - x @ w.T).pow(2).mean())


@pytest.mark.parametrize(
    "t,k,o,shift",
    [(597, 59, 130, None), (301, 130, 59, None), (597, 97, 59, GELU_SHIFT)],
    ids=["gram", "direct", "adalog"],
)
def test_bf16_search_linear_objective_within_half_percent(t, k, o, shift):
    """Oracle: search_linear in fp32 on the same seeded layer; the bf16-scored search's parameters,
    evaluated in fp32, must be identical or within 0.5 % of its output MSE (measured: ≤ 1.3e-4)."""
    x, w = _layer(t, k, o, seed=t + k, gelu=shift is not None)
    ref = vo.search_linear(x, w, 4, 4, rounds=2, post_gelu_shift=shift)
    got = vo.search_linear(x, w, 4, 4, rounds=2, post_gelu_shift=shift, dtype=BF16)
    ref_mse, got_mse = _fp32_mse(x, w, ref, 4), _fp32_mse(x, w, got, 4)
    assert got.mse == pytest.approx(got_mse, rel=1e-5)  # the reported error is the fp32 one
    same = torch.equal(ref.w_scale, got.w_scale) and all(torch.equal(ref.act[n], got.act[n]) for n in ref.act)
    assert same or got_mse <= ref_mse * (1 + OBJECTIVE_RTOL), (got_mse, ref_mse)


@pytest.mark.parametrize("kind", ["adalog", "tanq", "uniform"])
def test_bf16_attention_searches_within_half_percent(kind):
    # oracle: the fp32 search on the same operands; fp32 output MSE within 0.5 % (measured ≤ 2e-4)
    g = _gen(5)
    q, k, v = (torch.randn(3, 2, 23, 16, generator=g) for _ in range(3))
    a = (q @ k.transpose(-2, -1) / 2).softmax(-1)
    for search, args in ((va.search_qk, (q, k, 4, 2)), (va.search_probs_v, (a, v, 4, 4, kind, 2))):
        ref, got = search(*args), search(*args, dtype=BF16)
        assert got.mse <= ref.mse * (1 + OBJECTIVE_RTOL), (search.__name__, got.mse, ref.mse)


@pytest.mark.parametrize("o", [37, 130])  # K = 59: direct (O < K) and whitened Gram (O > K) forms
def test_bf16_act_score_tracks_fp32(o):
    """Oracle: the fp32 reference score of the same candidates; the bf16 score (whitened form, bf16
    products, fp32 sums) within 1e-3 relative (measured ~1e-4), and its fp32 twin equal to it."""
    x, w = _layer(211, 59, o, seed=o)
    w_hat = fq_uniform(w, w.abs().amax(1, keepdim=True) / 7, torch.full((o, 1), 8.0), 4)
    s, z = torch.tensor([0.3, 0.45, 0.7]), torch.tensor([7.0, 8.0, 6.0])
    for quant in (UniformCandidates(4), AdaLogCandidates(4, GELU_SHIFT)):
        params = (s, z) if isinstance(quant, UniformCandidates) else (s * 4, torch.tensor([20.0, 37.0, 90.0]))
        fast = vo.act_output_score(x, w_hat, w, quant, BF16)
        ref = vo.act_output_score(x, w_hat, w, quant)
        torch.testing.assert_close(fast(*params), ref(*params), rtol=1e-3, atol=0)
        torch.testing.assert_close(exact_of(fast)(*params), ref(*params), rtol=0, atol=0)


@pytest.mark.parametrize("t", [41, 301])  # T ≤ K: direct; T > K: Hessian form
def test_bf16_weight_score_tracks_fp32(t):
    """Oracle: the fp32 reference weight score; per output channel within 1e-2 relative: each
    output error is rounded to bf16 (2⁻⁹) and a channel's MSE averages only T of them (measured
    4.7e-3 at T = 41, 1.5e-3 at T = 301)."""
    x, w = _layer(t, 97, 59, seed=t)
    x_hat = fq_uniform(x, torch.tensor(0.4), torch.tensor(8.0), 4)
    g = _gen(9)
    s = torch.rand(5, 59, generator=g) * 0.1 + 0.02
    z = torch.randint(5, 11, (5, 59), generator=g).float()
    fast = vo.weight_output_score(x_hat, x, w, 4, BF16)
    torch.testing.assert_close(fast(s, z), vo.weight_output_score(x_hat, x, w, 4)(s, z), rtol=1e-2, atol=0)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_sorted_self_mse_equals_elementwise(bits):
    """Oracle: the element-by-element self-MSE in fp32; the sorted-moment form (float64) within
    1e-5 relative, free zero-points outside [0, 2^b - 1] included."""
    g = _gen(bits)
    x = torch.randn(5, 997, generator=g) * torch.rand(5, 1, generator=g) + 3 * torch.rand(5, 1, generator=g)
    s = torch.rand(7, 5, generator=g) * 0.3 + 0.01
    z = torch.randint(-3, 2**bits + 3, (7, 5), generator=g).float()
    torch.testing.assert_close(
        sorted_mse_score(x, bits)(s, z), tensor_mse_score(x, bits)(s, z), rtol=1e-5, atol=0
    )


def test_fast_deltas_equal_exact_quantizers():
    """Oracle: ``quant(x) − x`` with the exact quantizers. Uniform: bit-identical in fp32. AdaLog
    with scale 1 (the softmax): bit-identical except below 1e-15; with a searched scale: codes may
    differ where ``log2 x − log2 s`` and ``log2(x/s)`` round apart (measured: none here)."""
    g = _gen(3)
    x = torch.cat([torch.rand(4, 97, generator=g) ** 4, torch.zeros(1, 97)])
    s = torch.tensor([0.25, 0.5, 1.0]).reshape(3, 1, 1)
    z = torch.tensor([0.0, 3.0, 9.0]).reshape(3, 1, 1)
    q = torch.tensor([11.0, 37.0, 137.0]).reshape(3, 1, 1)
    uni = UniformCandidates(4)
    assert torch.equal(uni.delta(x, (), s, z, dtype=torch.float32), uni(x, s, z) - x)
    soft = AdaLogCandidates(4, scale=1.0)
    assert torch.equal(soft.delta(x, soft.prepare(x), q, dtype=torch.float32), soft(x, q) - x)
    post = AdaLogCandidates(4, GELU_SHIFT)
    got = post.delta(x, post.prepare(x), s * 2, q, dtype=torch.float32)
    torch.testing.assert_close(got, post(x, s * 2, q) - x, rtol=0, atol=1e-6)


def test_rescoring_returns_the_exact_best_of_the_survivors():
    """Oracle: the exact score itself. With a fast score that is the exact one plus noise, FPCS with
    ``exact`` returns a candidate whose reported error is its exact error, no worse than the
    exact score of the noisy search's own pick."""
    x = torch.randn(3, 501, generator=_gen(4))
    exact = tensor_mse_score(x, 4)
    noise = _gen(7)

    def noisy(s, z):
        return exact(s, z) * (1 + 1e-3 * torch.randn(s.shape, generator=noise))

    plain_s, plain_z, _ = fpcs(noisy, percentile_ranges(x), 4)
    s, z, mse = fpcs(noisy, percentile_ranges(x), 4, exact=exact)
    torch.testing.assert_close(mse, exact(s[None], z[None])[0], rtol=0, atol=0)
    assert (mse <= exact(plain_s[None], plain_z[None])[0]).all()


def test_results_round_trip_json_exactly():
    # oracle: the LinearParams / MatmulParams put in; every tensor bit-identical, floats exact
    p = vo.LinearParams(
        torch.rand(7) / 3, torch.arange(7.0), {"scale": torch.tensor(0.1234567), "q": torch.tensor(37.0), "shift": GELU_SHIFT},
        0.1 / 3, 2.0 / 7, 2, {"weight": 1.5},
    )  # fmt: skip
    m = va.MatmulParams(
        {"param": torch.tensor(19.0)}, {"scale": torch.rand(3), "zero_point": torch.ones(3)}, 1e-7, 3.0
    )
    types = {"linear": vo.LinearParams, "av": va.MatmulParams}
    back = ranks.from_json(ranks.to_json({4: {"linear": p, "av": m}}), types, torch.device("cpu"))[4]
    q, n = back["linear"], back["av"]
    assert torch.equal(q.w_scale, p.w_scale) and torch.equal(q.act["scale"], p.act["scale"])
    assert q.act["shift"] == GELU_SHIFT and q.mse == p.mse and q.seconds == p.seconds
    assert torch.equal(n.right["scale"], m.right["scale"]) and n.mse == m.mse


def test_assigner_balances_by_estimate():
    # oracle: hand-worked greedy assignment (least-loaded rank first, ties → lowest rank)
    a = ranks.Assigner(2)
    assert [a.owner(c) for c in (5.0, 3.0, 1.0, 1.0, 4.0)] == [0, 1, 1, 1, 0]


def test_bf16_pass_end_to_end_matches_fp32(monkeypatch):
    """Oracle: the same pass with ``scoring: fp32`` (the reference path). With the size threshold
    at 0 every unit is scored in bf16 (the report says so), and each quantizer's layer SQNR (its
    searched objective, on float inputs) is within 0.15 dB of the fp32 path's (measured on two blocks: 15 of 17
    identical, one 0.11 dB lower — block 0's fc2, whose AdaLog objective on 68 tokens is rough
    enough that a 1e-7 scale change moves it 2 %; at ≥ 272 tokens seeded layers agree within 1e-4,
    and so do larger models, which are the only ones scored in bf16 by default). The output SQNR of
    a random W4A4 model is chaotic under any change of parameters (10.0 vs 11.8 dB), so no oracle."""
    from edgecompress.calib import make_context
    from edgecompress.pipeline import run
    from edgecompress.quantize.vit_ptq import AdaLogPTQ, scoring
    from tests.conftest import tiny_timm

    monkeypatch.setattr(scoring, "BF16_MIN_FLOPS", 0)
    torch.manual_seed(3)
    batches = [torch.randn(4, 3, 32, 32)]
    layer_db, records = {}, {}
    for mode in ("fp32", "bf16"):
        loaded = tiny_timm("deit_tiny_patch16_224", depth=1)
        ctx = make_context(batches, loaded.call, torch.device("cpu"))
        _, records[mode] = run(loaded.model, [AdaLogPTQ(search_rounds=1, scoring=mode)], ctx)
        rows = records[mode][0]["layers"]
        layer_db[mode] = {r["name"]: r["layer_sqnr_db"] for r in rows if "layer_sqnr_db" in r}
    assert layer_db["bf16"].keys() == layer_db["fp32"].keys() and len(layer_db["fp32"]) == 9
    worse = {
        n: (db, layer_db["fp32"][n]) for n, db in layer_db["bf16"].items() if db < layer_db["fp32"][n] - 0.15
    }
    assert not worse, worse
    units = records["bf16"][0]["info"]["profile"]["units"]
    assert units and all(u["scoring"] == "bfloat16" for u in units)


def test_fused_kernels_equal_eager(monkeypatch):
    """Oracle: the eager bf16 path of the same candidates (``fused`` off). The compiled one-pass
    kernels quantize identically (same ops; the AdaLog table lookup as a chain of selects) and
    add ``B`` in fp32 where the eager path adds it in bf16: per-row errors within 1e-2 relative,
    totals within 1e-4 (measured 1.3e-3 and 2e-5). Compiles two kernels (~15 s on 2 idle cores)."""
    from edgecompress.quantize.vit_ptq import fused
    from edgecompress.quantize.vit_ptq.scoring import candidate_error

    g = _gen(12)
    x = torch.nn.functional.gelu(torch.randn(301, 259, generator=g) * 2)  # ≥ FUSE_MIN elements
    p = (torch.randn(259, 97, generator=g) / 16).to(BF16)
    b = (torch.randn(301, 97, generator=g) / 4).to(BF16)
    s, z, q = (torch.tensor(v).reshape(2, 1, 1) for v in ([0.37, 0.21], [7.0, 3.0], [20.0, 37.0]))
    post, soft = AdaLogCandidates(4, GELU_SHIFT), AdaLogCandidates(4, scale=1.0)
    cases = [
        (UniformCandidates(4), (), (s, z)),
        (post, post.prepare(x), (s * 8, q)),
        (soft, soft.prepare(x), (q,)),
    ]
    for quant, prep, params in cases:
        got = candidate_error(quant, x, prep, params, p, b, BF16)
        monkeypatch.setitem(fused._state, "on", False)
        ref = candidate_error(quant, x, prep, params, p, b, BF16)
        monkeypatch.setitem(fused._state, "on", True)
        assert fused._state["on"], "the compiled kernels failed and switched themselves off"
        torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-6)
        torch.testing.assert_close(got.sum(1), ref.sum(1), rtol=1e-4, atol=0)


def _sweep_case(family: str):
    """A seeded layer (T·K ≥ FUSE_MIN, odd sizes) and one family's candidates: per group (zero-point,
    q) a run of nearby scales (incremental), a jump (a new anchor) and a lone candidate (dense)."""
    g = _gen(21)
    x = torch.nn.functional.gelu(torch.randn(301, 259, generator=g) * 2)
    x[:, 5] *= 6
    w = torch.randn(97, 259, generator=g) / 259**0.5
    w_hat = fq_uniform(w, w.abs().amax(1, keepdim=True) / 7, torch.full((97, 1), 8.0), 4)
    near = torch.tensor([1.0, 1.0005, 1.001, 1.003, 1.01, 1.03, 1.3, 1.302])
    if family == "uniform":
        quant, group = UniformCandidates(4), torch.tensor([3.0] * 8 + [5.0] * 8 + [7.0])
        scale = torch.cat([near * 0.09, near * 0.07, torch.tensor([0.2])])
    else:
        quant, group = AdaLogCandidates(4, GELU_SHIFT), torch.tensor([13.0] * 8 + [29.0] * 8 + [60.0])
        scale = torch.cat([near * 1.5, near * 2.2, torch.tensor([3.0])])
    perm = torch.randperm(17, generator=g)  # the scorer sorts its batch itself
    return x, w_hat, w, quant, (scale[perm], group[perm])


@pytest.mark.parametrize("family", ["uniform", "adalog"])
@pytest.mark.parametrize("csr_max", [0.0, 1.0], ids=["scatter", "csr"])
def test_sweep_scores_equal_dense_bf16(family, csr_max, monkeypatch):
    """Oracle: the dense bf16 score of the same candidates (``sweep`` off) and the fp32 reference.
    The incremental scores (both update paths: scattered ``ΔV`` with a bf16 product, fp32 CSR)
    within 1e-3 relative of the dense bf16 ones (measured ≤ 3e-4: the anchors' bf16 rounding,
    carried by ``a/a_anchor``) and within 2e-3 of the fp32 reference (measured ≤ 6.3e-4; the dense
    bf16 score itself: 7e-4 on this layer); the same batch scored again (from the state the first
    call left) within 1e-4."""
    from edgecompress.quantize.vit_ptq import sweep

    x, w_hat, w, quant, params = _sweep_case(family)
    monkeypatch.setattr(sweep, "CSR_MAX", csr_max)
    monkeypatch.setattr(sweep, "SWEEP_MIN_MACS", {"adalog": 0, "uniform": 0})  # a small layer
    fast = vo.act_output_score(x, w_hat, w, quant, BF16)
    got, again = fast(*params), fast(*params)
    assert fast.counts["sparse"] >= 16 and fast.counts["anchor"] >= 4 and fast.counts["dense"] >= 2, (
        fast.counts
    )
    assert sweep.applies(quant, x, w_hat.T, BF16)
    monkeypatch.setattr(sweep, "applies", lambda *a: False)
    dense = vo.act_output_score(x, w_hat, w, quant, BF16)(*params)
    ref = vo.act_output_score(x, w_hat, w, quant)(*params)
    torch.testing.assert_close(got, dense, rtol=1e-3, atol=0)
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=0)
    torch.testing.assert_close(again, got, rtol=1e-4, atol=0)


@pytest.mark.parametrize("shift", [None, GELU_SHIFT], ids=["uniform", "adalog"])
def test_sweep_search_linear_matches_fp32(shift, monkeypatch):
    """Oracle: search_linear in fp32 on the same seeded layer (T·K = 70,871 ≥ FUSE_MIN and K ≥ 2·O,
    so with the size rule off the bf16 input searches are incremental); its parameters identical or the fp32 output MSE
    within 0.5 %."""
    from edgecompress.quantize.vit_ptq import sweep

    made = []

    class Spy(sweep.SweepScore):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(sweep, "SweepScore", Spy)
    monkeypatch.setattr(sweep, "SWEEP_MIN_MACS", {"adalog": 0, "uniform": 0})  # a small layer
    x, w = _layer(541, 131, 59, seed=17, gelu=shift is not None)
    ref = vo.search_linear(x, w, 4, 4, rounds=1, post_gelu_shift=shift)
    got = vo.search_linear(x, w, 4, 4, rounds=1, post_gelu_shift=shift, dtype=BF16)
    assert made and made[0].counts["sparse"] > 100, [m.counts for m in made]
    ref_mse, got_mse = _fp32_mse(x, w, ref, 4), _fp32_mse(x, w, got, 4)
    same = torch.equal(ref.w_scale, got.w_scale) and all(torch.equal(ref.act[n], got.act[n]) for n in ref.act)
    assert same or got_mse <= ref_mse * (1 + OBJECTIVE_RTOL), (got_mse, ref_mse)


@pytest.mark.parametrize(
    "t,k,r,family,on",
    [
        (544, 288, 96, "adalog", False),  # vit-digits' FC2: the dense path (pre-sweep code)
        (544, 288, 96, "uniform", False),
        (1431, 1536, 384, "adalog", True),  # MiniLM's FC2 (1,431 calibration tokens)
        (1431, 1536, 384, "uniform", True),
        (6304, 1536, 384, "adalog", True),  # DeiT-S's FC2
        (6304, 1536, 384, "uniform", True),
        (697, 1536, 384, "uniform", False),  # 411M: below uniform's rule, above AdaLog's
        (697, 1536, 384, "adalog", True),
    ],
)
def test_sweep_size_rule(t, k, r, family, on):
    """Oracle: the measured rule (``sweep.SWEEP_MIN_MACS``, benchmarks/ptq_sweep_size.py) on the
    real models' FC2 input shapes."""
    from edgecompress.quantize.vit_ptq import sweep

    quant = UniformCandidates(4) if family == "uniform" else AdaLogCandidates(4, GELU_SHIFT)
    assert sweep.applies(quant, torch.empty(t, k), torch.empty(k, r, dtype=BF16), BF16) is on


@pytest.mark.parametrize(
    "per_head,m", [(True, 131), (False, 59)], ids=["per-head-whitened", "per-tensor-direct"]
)
def test_stacked_attention_scores_equal_per_candidate(per_head, m, monkeypatch):
    """Oracle: the per-candidate fused bf16 score of the same candidates (``scoring.stacks`` off)
    and the fp32 reference. Stacking 13 candidates (not a multiple of STACK) along the rows of one
    product changes only the fp32 summation order: within 1e-6 relative (measured 0 here, ≤ 3e-7 at
    DeiT-S's shapes); the fp32 reference within 2e-3 (the bf16 rounding of Δ, P and B)."""
    from edgecompress.quantize.vit_ptq import scoring

    g = _gen(59)
    x, y = torch.randn(3, 5, 59, 97, generator=g), torch.randn(3, 5, m, 97, generator=g)
    ref = x @ y.transpose(-2, -1) + 0.05 * torch.randn(3, 5, 59, m, generator=g)
    quant, groups = UniformCandidates(4), 5 if per_head else 1
    params = (
        (torch.rand(13, groups, generator=g) + 0.5) * 0.3,
        torch.randint(4, 12, (13, groups), generator=g).float(),
    )
    calls = []
    monkeypatch.setattr(
        UniformCandidates, "stacked_error", lambda self, *a: calls.append(1) or fused_stacked(*a)
    )
    got = va.left_operand_score(x, y, ref, quant, per_head, BF16)(*params)
    assert calls, "the stacked kernel did not run"
    monkeypatch.setattr(scoring, "stacks", lambda *a: False)
    one = va.left_operand_score(x, y, ref, quant, per_head, BF16)(*params)
    exact = va.left_operand_score(x, y, ref, quant, per_head)(*params)
    torch.testing.assert_close(got, one, rtol=1e-6, atol=0)
    torch.testing.assert_close(got, exact, rtol=2e-3, atol=0)


def fused_stacked(x, prep, scale, zp, p, b):
    from edgecompress.quantize.vit_ptq import fused

    return fused.uniform_stacked_error(x, scale, -zp, 15 - zp, p, b)
