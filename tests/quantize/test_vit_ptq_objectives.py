"""Search-time kernels and layer objectives of the ViT PTQ passes.

Oracles: the reference quantizers (bit equality), the direct layer products (float tolerance),
and the quantizers' own error without search (the searched error must not be larger).
"""

from __future__ import annotations

import pytest
import torch

from edgecompress.quantize.log import (
    dequantize_adalog,
    dequantize_log2,
    dequantize_logsqrt2,
    quantize_adalog,
    quantize_log2,
    quantize_logsqrt2,
)
from edgecompress.quantize.reparam import GELU_SHIFT
from edgecompress.quantize.tan import dequantize_tanq, quantize_tanq
from edgecompress.quantize.uniform import dequantize_uniform, quantize_uniform
from edgecompress.quantize.vit_ptq import attn as va
from edgecompress.quantize.vit_ptq import objectives as vo
from edgecompress.quantize.vit_ptq.fastq import fq_adalog, fq_log, fq_tanq, fq_uniform


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_fast_kernels_equal_reference(bits):
    """Oracle: dequantize(quantize(x)) of the reference quantizers; tolerance 0 (bit equality)."""
    g = _gen(bits)
    x = torch.rand(7, 59, generator=g) ** 3  # [0, 1): softmax-like
    xs = torch.cat([x, torch.zeros(1, 59), torch.full((1, 59), -0.1)])
    s = torch.tensor([0.7, 1.0, 0.25]).reshape(3, 1, 1)
    q = torch.tensor([10.0, 37.0, 137.0]).reshape(3, 1, 1)
    alpha = torch.tensor([0.2, 0.9, 0.999]).reshape(3, 1, 1)
    z = torch.tensor([0.0, 3.0, 5.0]).reshape(3, 1, 1)
    one = torch.tensor(1.0)  # a 0-d scale against a candidate batch of q / α
    cases = [
        (fq_uniform(xs, s, z, bits), dequantize_uniform(quantize_uniform(xs, s, z, bits), s, z)),
        (fq_adalog(xs, s, q, bits), dequantize_adalog(quantize_adalog(xs, s, q, bits), s, q, bits)),
        (fq_adalog(xs, one, q, bits), dequantize_adalog(quantize_adalog(xs, one, q, bits), one, q, bits)),
        (fq_log(xs, s, bits, 1.0), dequantize_log2(quantize_log2(xs, s, bits), s, bits)),
        (fq_log(xs, s, bits, 2.0), dequantize_logsqrt2(quantize_logsqrt2(xs, s, bits), s, bits)),
        (fq_tanq(xs, s, alpha, bits), dequantize_tanq(quantize_tanq(xs, s, alpha, bits), s, alpha, bits)),
        (
            fq_tanq(xs, one, alpha, bits),
            dequantize_tanq(quantize_tanq(xs, one, alpha, bits), one, alpha, bits),
        ),
    ]
    for got, ref in cases:
        assert got.shape == ref.shape and torch.equal(got, ref)


def test_weight_output_score_hessian_equals_direct():
    # oracle: ‖X̂ Ŵᵀ − X Wᵀ‖² per output channel computed directly; tolerance 1e-4 relative
    g = _gen(1)
    x = torch.randn(300, 23, generator=g)
    w = torch.randn(17, 23, generator=g)
    x_hat = fq_uniform(x, torch.tensor(0.2), torch.tensor(8.0), 4)
    score = vo.weight_output_score(x_hat, x, w, 4)  # T > K: the Hessian form
    s = torch.rand(5, 17, generator=g) * 0.3 + 0.05
    z = torch.randint(0, 16, (5, 17), generator=g).float()
    wq = fq_uniform(w, s[..., None], z[..., None], 4)  # [5, 17, 23]
    ref = (x_hat @ wq.transpose(1, 2) - x @ w.T).pow(2).mean(1)
    torch.testing.assert_close(score(s, z), ref, rtol=1e-4, atol=1e-6)
    direct = vo.weight_output_score(x_hat[:20], x[:20], w, 4)  # T ≤ K: the direct form
    ref20 = (x_hat[:20] @ wq.transpose(1, 2) - x[:20] @ w.T).pow(2).mean(1)
    torch.testing.assert_close(direct(s, z), ref20, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("o", [11, 97])  # K = 59: direct (O < K) and Gram (O > K) forms
def test_act_output_score_equals_direct(o):
    g = _gen(2)
    x = torch.randn(123, 59, generator=g)
    w = torch.randn(o, 59, generator=g)
    w_hat = w + 0.01 * torch.randn(o, 59, generator=g)
    score = vo.act_output_score(x, w_hat, w, vo._uniform_act(4))
    s = torch.tensor([0.2, 0.4, 0.8])
    z = torch.tensor([8.0, 7.0, 9.0])
    xq = fq_uniform(x, s[:, None, None], z[:, None, None], 4)
    ref = (xq @ w_hat.T - x @ w.T).pow(2).mean((1, 2))
    torch.testing.assert_close(score(s, z), ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("d,m", [(24, 17), (8, 33)])  # direct and Gram forms
def test_left_operand_score_equals_direct(d, m):
    g = _gen(3)
    x = torch.randn(2, 3, 13, d, generator=g)
    y = torch.randn(2, 3, m, d, generator=g)
    ref = x @ y.transpose(-2, -1)
    y_hat = y + 0.05 * torch.randn_like(y)
    quant = lambda t, s, z: fq_uniform(t, s, z, 4)  # noqa: E731
    score = va.left_operand_score(x, y_hat, ref, quant, per_head=True)
    s = torch.rand(4, 3, generator=g) * 0.5 + 0.1
    z = torch.full((4, 3), 8.0)
    xq = fq_uniform(x, s[:, None, :, None, None], z[:, None, :, None, None], 4)
    direct = (xq @ y_hat.transpose(-2, -1) - ref).pow(2).mean((1, 3, 4))  # [C, H]
    torch.testing.assert_close(score(s, z), direct, rtol=1e-4, atol=1e-7)


def _minmax_linear_mse(x, w, bits):
    """Output MSE of plain per-channel/per-tensor min/max quantization (no search)."""
    from edgecompress.quantize.uniform import params_from_range, weight_params

    ws, wz = weight_params(w, bits)
    a_s, a_z = params_from_range(x.min(), x.max(), bits)
    y_hat = fq_uniform(x, a_s, a_z, bits) @ fq_uniform(w, ws, wz, bits).T
    return float((y_hat - x @ w.T).pow(2).mean())


@pytest.mark.parametrize("bits", [4, 6])
def test_search_linear_beats_minmax(bits):
    # oracle: min/max quantization of the same layer; the searched output MSE must be lower
    g = _gen(4)
    x = torch.randn(200, 48, generator=g)
    x[:, 3] *= 8  # an outlier channel, as after LayerNorm
    w = torch.randn(97, 48, generator=g) / 7
    p = vo.search_linear(x, w, bits, bits, rounds=2)
    assert p.mse < _minmax_linear_mse(x, w, bits)
    assert p.w_scale.shape == (97,) and set(p.act) == {"scale", "zero_point"}


def test_search_linear_post_gelu_adalog():
    """Oracle: the same layer with AdaLog at the search's starting point (q = 37, the start scale)
    and min/max weights; the searched output MSE must be lower."""
    from edgecompress.quantize.uniform import weight_params

    g = _gen(5)
    x = torch.nn.functional.gelu(torch.randn(256, 96, generator=g) * 1.5)
    w = torch.randn(23, 96, generator=g) / 10
    ada = vo.search_linear(x, w, 4, 4, rounds=1, post_gelu_shift=GELU_SHIFT)
    assert 10 <= float(ada.act["q"]) <= 137 and ada.act["shift"] == GELU_SHIFT
    pos = x[x > 0]
    lo, hi = torch.quantile(pos, 0.9) + GELU_SHIFT, pos.max() + GELU_SHIFT
    start = {"scale": lo + (hi - lo) * 126 / 127, "q": torch.tensor(37.0), "shift": GELU_SHIFT}
    ws, wz = weight_params(w, 4)
    y0 = vo.act_quantize(x, start, 4) @ fq_uniform(w, ws, wz, 4).T
    assert ada.mse < float((y0 - x @ w.T).pow(2).mean())


@pytest.mark.parametrize("kind", ["adalog", "tanq", "log2", "logsqrt2", "uniform"])
def test_search_probs_v_all_kinds(kind):
    # oracle: V min/max per head and A at the quantizer's default (no search) — the search must do
    # at least as well on the A@V output MSE
    g = _gen(6)
    q, k, v = (torch.randn(2, 3, 17, 8, generator=g) for _ in range(3))
    a = (q @ k.transpose(-2, -1) * 2).softmax(-1)
    p = va.search_probs_v(a, v, 4, 4, kind, rounds=2)
    assert p.right["scale"].shape == (3,)
    default = {"adalog": {"param": torch.tensor(37.0)}, "tanq": {"param": torch.tensor(0.5)}}.get(
        kind, {"param": torch.tensor(1.0), "scale": torch.tensor(1 / 15), "zero_point": torch.tensor(0.0)}
    )
    from edgecompress.quantize.uniform import params_from_range

    lo = v.transpose(0, 1).reshape(3, -1).amin(1).reshape(1, 3, 1, 1)
    hi = v.transpose(0, 1).reshape(3, -1).amax(1).reshape(1, 3, 1, 1)
    vs, vz = params_from_range(lo, hi, 4)
    base = va.probs_quantize(a, kind, default, 4) @ fq_uniform(v, vs, vz, 4)
    assert p.mse <= float((base - a @ v).pow(2).mean())


def test_search_qk_improves_on_self_mse():
    # oracle: Q and K searched on their own MSE only (the pre-search); output-MSE rounds must not lose
    g = _gen(7)
    q = torch.randn(2, 4, 17, 8, generator=g)
    k = torch.randn(2, 4, 17, 8, generator=g) * 2
    p = va.search_qk(q, k, 4, rounds=2)
    (qs, qz), (ks, kz) = va._heads_self(q, 4), va._heads_self(k, 4)
    hv = va._head_view
    base = fq_uniform(q, hv(qs), hv(qz), 4) @ fq_uniform(k, hv(ks), hv(kz), 4).transpose(-2, -1)
    assert p.mse <= float((base - q @ k.transpose(-2, -1)).pow(2).mean())


def test_channel_act_search_free_offsets():
    # oracle: a channel far from 0 gets a window that contains it (free zero-point), error ~ step²/12
    x = torch.rand(500, 3, generator=_gen(8)) + torch.tensor([0.0, 5.0, -9.0])
    s, z = vo.channel_act_search(x, 4)
    err = (fq_uniform(x, s, z, 4) - x).pow(2).mean(0)
    assert (err < (1 / 15) ** 2 / 12 * 1.5).all()


def _unstopped_linear(x, w, bits, rounds):
    """search_linear's alternation run for every round, no fixed-point stop (the oracle)."""
    from edgecompress.quantize.search import fpcs, percentile_ranges

    s, z = vo.self_fpcs(x.reshape(1, -1), bits)
    act = {"scale": s[0], "zero_point": z[0]}
    ranges, w_ranges = percentile_ranges(x.reshape(1, -1)), percentile_ranges(w)
    for _ in range(rounds):
        ws, wz, _ = fpcs(vo.weight_output_score(vo.act_quantize(x, act, bits), x, w, bits), w_ranges, bits)
        act = vo._search_act(x, fq_uniform(w, ws[:, None], wz[:, None], bits), w, bits, act, ranges)
    return ws, wz, act


def test_fixed_point_stop_equals_all_rounds():
    """Oracle: the alternation run for all 6 rounds; the stopped search must return bit-identical
    parameters after fewer rounds (this layer reaches its fixed point in round 3)."""
    g = _gen(1)
    x = torch.randn(300, 32, generator=g)
    x[:, 5] *= 6
    w = torch.randn(40, 32, generator=g) / 6
    p = vo.search_linear(x, w, 4, 4, rounds=6)
    ws, wz, act = _unstopped_linear(x, w, 4, 6)
    assert p.rounds < 6
    assert torch.equal(p.w_scale, ws) and torch.equal(p.w_zp, wz)
    assert all(torch.equal(p.act[k], act[k]) for k in act)


def test_qk_fixed_point_stop_equals_all_rounds():
    # oracle: the Q/K alternation run for all 6 rounds without the stop; bit-identical parameters
    g = _gen(10)
    q, k = torch.randn(2, 3, 15, 8, generator=g), torch.randn(2, 3, 15, 8, generator=g) * 2
    p = va.search_qk(q, k, 4, rounds=6)
    ref = q @ k.transpose(-2, -1)
    ks, kz = va._heads_self(k, 4)
    hv = va._head_view
    for _ in range(6):
        qs, qz = va._fpcs_operand([q], [fq_uniform(k, hv(ks), hv(kz), 4)], [ref], 4)
        ks, kz = va._fpcs_operand([k], [fq_uniform(q, hv(qs), hv(qz), 4)], [ref.transpose(-2, -1)], 4)
    assert p.rounds < 6
    assert torch.equal(p.left["scale"], qs) and torch.equal(p.right["scale"], ks)
    assert torch.equal(p.left["zero_point"], qz) and torch.equal(p.right["zero_point"], kz)


def test_left_operand_score_over_groups_equals_direct():
    """Oracle: the squared output error summed over every entry of every group, divided by the
    number of entries (per head); tolerance 1e-4 relative. Groups differ in sequence length."""
    g = _gen(11)
    xs = [torch.randn(2, 3, n, 8, generator=g) for n in (5, 19)]
    ys = [torch.randn(2, 3, n, 8, generator=g) for n in (5, 19)]  # key length = query length
    refs = [x @ y.transpose(-2, -1) for x, y in zip(xs, ys)]
    y_hats = [y + 0.05 * torch.randn(y.shape, generator=g) for y in ys]
    quant = lambda t, s, z: fq_uniform(t, s, z, 4)  # noqa: E731
    s = torch.rand(4, 3, generator=g) * 0.5 + 0.1
    z = torch.full((4, 3), 7.0)
    got = va.left_operand_score(xs, y_hats, refs, quant, per_head=True)(s, z)
    sq = [
        (fq_uniform(x, s[:, None, :, None, None], z[:, None, :, None, None], 4) @ yh.transpose(-2, -1) - r)
        .pow(2)
        .sum((1, 3, 4))
        for x, yh, r in zip(xs, y_hats, refs)
    ]
    count = sum(r.numel() // 3 for r in refs)
    torch.testing.assert_close(got, (sq[0] + sq[1]) / count, rtol=1e-4, atol=1e-7)


def _padded_call(lengths, n_max, pad_value, seed=12):
    """q, k, v, softmax of a batch padded to ``n_max`` with ``pad_value`` in every padded slot."""
    g = _gen(seed)
    b, h, d = len(lengths), 2, 4
    mask = torch.zeros(b, n_max, dtype=torch.long)
    q, k, v = (torch.full((b, h, n_max, d), pad_value) for _ in range(3))
    a = torch.full((b, h, n_max, n_max), pad_value)
    for i, n in enumerate(lengths):
        mask[i, n_max - n :] = 1  # left padding, as decoder tokenizers do
        real = slice(n_max - n, n_max)
        for t in (q, k, v):
            t[i, :, real] = torch.randn(h, n, d, generator=g)
        a[i, :, real, real] = (q[i, :, real] @ k[i, :, real].transpose(-2, -1)).softmax(-1)
    return (q, k, v, a), mask


def test_attention_groups_drop_padding():
    """Oracle: two captures that differ only in the values of padded slots (0 vs 1e3) must give
    identical groups, shaped by the real lengths; the searches on them are then identical too."""
    from edgecompress.calib import Captured

    names = ["q", "k", "v", "a"]
    caps = []
    for pad in (0.0, 1e3):
        ts, mask = _padded_call([3, 6, 3], 7, pad)
        ts2, mask2 = _padded_call([5], 5, pad, seed=13)  # a second call, no padding
        caps.append(Captured({n: [t, t2] for n, t, t2 in zip(names, ts, ts2)}, [mask, mask2]))
    groups = [c.attention_groups(names) for c in caps]
    assert [tuple(gr[0].shape) for gr in groups[0]] == [(2, 2, 3, 4), (1, 2, 5, 4), (1, 2, 6, 4)]
    assert [tuple(gr[3].shape) for gr in groups[0]] == [(2, 2, 3, 3), (1, 2, 5, 5), (1, 2, 6, 6)]
    for g0, g1 in zip(*groups):
        assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    torch.testing.assert_close(groups[0][0][3].sum(-1), torch.ones(2, 2, 3))  # real rows sum to 1
    q, k = ([gr[i] for gr in groups[1]] for i in range(2))
    assert va.search_qk(q, k, 4, rounds=2).mse < 0.1  # no pad value (1e3) leaked into a range


def test_attention_groups_without_a_usable_mask_keep_every_token():
    # oracle: the call's own tensors — an extended [b, 1, 1, N] mask or none leaves them whole
    from edgecompress.calib import Captured

    ts, mask = _padded_call([2, 4], 4, 0.5)
    for m in (None, mask[:, None, None, :]):
        groups = Captured(dict(zip("qkva", ([t] for t in ts))), [m]).attention_groups(list("qkva"))
        assert len(groups) == 1 and all(torch.equal(a, b) for a, b in zip(groups[0], ts))
