"""``dropped: mean`` — each dropped key block estimated from its mean key and value (sparsity/seer/dropped.py).

Oracles and tolerances (float32 inputs, outputs of magnitude ~1):

* every form (masked-dense reference, tiled, the C++ kernel, gathered) against an independent float64
  formulation: the keys and values extended by one mean key/value per block, with an additive mask
  that gives a row its kept keys and, per dropped block (for a decoder: only blocks wholly before the
  row), that block's mean key with weight log(real-key count) — one plain softmax: 2e-5 absolute;
  odd lengths 59 and 130 (partial last blocks), causal and not, GQA, padding;
* the estimate is exact when every block's keys (and values) are equal: the result then equals
  dense attention (PyTorch SDPA): 2e-5;
* each form's log-sum-exp over the kept blocks equals the reference's: 2e-5;
* the field is validated (one-line error) and the exported graph verifies in ONNX Runtime (in
  tests/sparsity/test_seer_pass.py's export test, parametrised over ``dropped``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgecompress.kernels.ops import HAS_TRITON
from edgecompress.sparsity.seer import cpp as CPP
from edgecompress.sparsity.seer.core import SeerAttentionCore
from edgecompress.sparsity.seer.dropped import dropped_part
from edgecompress.sparsity.seer.execute import masked_dense

H, HKV, D = 4, 2, 16


def _core(block, causal, form, density=0.4):
    core = SeerAttentionCore(H, HKV, D, D, block, causal, density=density, form=form, dropped="mean")
    torch.manual_seed(1)
    with torch.no_grad():
        core.gate.q_weight.normal_()
        core.gate.k_weight.normal_()
    return core.eval()


def _inputs(n, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, D, generator=g) for h in (H, HKV, HKV))


def _padding_bias(n, valid, causal):
    ok = valid[:, None, None, :].expand(-1, 1, n, n)
    if causal:
        ok = ok & torch.ones(n, n, dtype=torch.bool).tril()
    return torch.zeros(ok.shape).masked_fill(~ok, torch.finfo(torch.float32).min)


def _oracle(q, k, v, keep, causal, scale, block, valid):
    """Float64: extended keys/values and one softmax (see the module docstring)."""
    b, h, n, d = q.shape
    g = h // k.shape[1]
    k, v = (t.double().repeat_interleave(g, dim=1) for t in (k, v))
    q = q.double()
    nb = keep.shape[-1]
    real = torch.ones(b, n, dtype=torch.bool) if valid is None else valid
    kbar, vbar = torch.zeros(b, h, nb, d, dtype=torch.float64), torch.zeros(b, h, nb, d, dtype=torch.float64)
    count = torch.zeros(b, nb, dtype=torch.float64)
    for j in range(nb):
        sl = slice(j * block, min(n, (j + 1) * block))
        w = real[:, sl].double()
        count[:, j] = w.sum(1)
        den = w.sum(1).clamp(min=1)[:, None, None]
        kbar[:, :, j] = (k[:, :, sl] * w[:, None, :, None]).sum(2) / den
        vbar[:, :, j] = (v[:, :, sl] * w[:, None, :, None]).sum(2) / den
    row_blk = torch.arange(n) // block
    key_blk = torch.arange(n) // block
    kept_el = keep[:, :, row_blk][:, :, :, key_blk] & real[:, None, None, :]  # [B, H, N, N]
    if causal:
        kept_el = kept_el & torch.ones(n, n, dtype=torch.bool).tril()
    est = ~keep[:, :, row_blk]  # [B, H, N, nb]
    if causal:
        est = est & (torch.arange(nb)[None, :] < row_blk[:, None])
    est = est & (count > 0)[:, None, None, :]
    logw = count.clamp(min=1).log()[:, None, None, :].expand(b, h, n, nb)
    mask = torch.cat([torch.where(kept_el, 0.0, -torch.inf), torch.where(est, logw, -torch.inf)], -1)
    s = torch.cat([q @ k.transpose(-1, -2), q @ kbar.transpose(-1, -2)], -1) * scale + mask
    p = s.softmax(-1).nan_to_num(nan=0.0)
    return p @ torch.cat([v, vbar], 2)


FORMS = ["reference", "tiled", "cpp", "gathered"]


@pytest.fixture(scope="module", autouse=True)
def _cpp_kernel_runs():
    """The C++ kernel must really build here (a silent fallback to ``tiled`` would hide its rows)."""
    q, k, v = _inputs(40)
    assert CPP.attend(q, k, v, torch.ones(2, H, 3, 3, dtype=torch.bool), False, 1.0, 16) is not None, (
        CPP._STATE
    )


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,block,padded", [(59, 16, False), (130, 32, True)])
def test_forms_match_the_extended_softmax(form, causal, n, block, padded):
    q, k, v = _inputs(n)
    valid = None
    bias = None
    if padded:
        valid = torch.ones(2, n, dtype=torch.bool)
        valid[1, n - 45 :] = False  # the last key block and part of the one before are padding
        bias = _padding_bias(n, valid, causal)
    core = _core(block, causal, form)
    with torch.no_grad():
        out = core(q, k, v, bias, D**-0.5, None)
        keep = core.choose(q, k, valid)[0]
    want = _oracle(q, k, v, keep, causal, D**-0.5, block, valid)
    rows = slice(None) if valid is None else valid[:, None, :, None]
    err = ((out.double() - want) * (rows if valid is not None else 1)).abs().max()
    assert err < 2e-5, (form, float(err))
    assert not bool(keep.all())  # something was dropped, so the estimate was exercised


@pytest.mark.parametrize("causal", [False, True])
def test_estimate_is_exact_for_constant_blocks(causal):
    """Keys and values constant inside every block: the mean key IS every key, so the result is dense."""
    n, block = 96, 16
    q, k, v = _inputs(n)
    k = k.view(2, HKV, n // block, block, D)[:, :, :, :1].expand(-1, -1, -1, block, -1).reshape(2, HKV, n, D)
    v = v.view(2, HKV, n // block, block, D)[:, :, :, :1].expand(-1, -1, -1, block, -1).reshape(2, HKV, n, D)
    core = _core(block, causal, "cpp", density=0.3)
    with torch.no_grad():
        out = core(q, k, v, None, D**-0.5, None)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=D**-0.5, enable_gqa=True)
    assert (out - dense).abs().max() < 2e-5
    core.dropped = "skip"
    with torch.no_grad():
        skipped = core(q, k, v, None, D**-0.5, None)
    assert (skipped - dense).abs().max() > 1e-2  # without the estimate the dropped blocks are missing


@pytest.mark.parametrize("form", ["tiled", "cpp", "gathered"])
@pytest.mark.parametrize("causal", [False, True])
def test_log_sum_exp_matches_the_reference(form, causal):
    n, block = 97, 16
    q, k, v = _inputs(n, seed=3)
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[0, 80:] = False
    core = _core(block, causal, form)
    with torch.no_grad():
        keep = core.choose(q, k, valid)[0]
        _, ref = masked_dense(q, k, v, keep, None, causal, D**-0.5, block, valid, lse=True)
        _, got = core.execute(q, k, v, keep, None, D**-0.5, valid, lse=True)
    fin = ref.isfinite()
    assert torch.equal(fin, got.isfinite())
    assert (got[fin] - ref[fin]).abs().max() < 2e-5


def test_dropped_part_sees_no_future_blocks():
    """A decoder's first query block estimates nothing (no block wholly before it): out 0, lse -inf."""
    n, block = 64, 16
    q, k, v = _inputs(n)
    keep = torch.zeros(2, H, 4, 4, dtype=torch.bool)
    out, lse = dropped_part(q, k, v, keep, True, D**-0.5, block)
    assert bool(torch.isneginf(lse[:, :, :block]).all()) and float(out[:, :, :block].abs().max()) == 0.0
    assert bool(lse[:, :, block:].isfinite().all())


def test_pass_saves_restores_and_exports_with_estimates(tiny_bert_dir, tmp_path):
    """The pass with ``dropped: mean`` on a tiny BERT with padding: the estimate changes the output,
    save/restore is bit-identical, and the exported graph (gate, mask and estimate in it) verifies in
    ONNX Runtime (the export module's bounds)."""
    import copy

    from edgecompress.calib import make_context
    from edgecompress.export.deploy import export_verified
    from edgecompress.models.loading import LoadedModel, load_model, restore
    from edgecompress.pipeline import run
    from edgecompress.recipe import recipe_from_dict
    from edgecompress.structure import save
    from edgecompress.train import TrainConfig
    from tests.sparsity.test_seer_pass import _text_batches

    loaded = load_model(f"hf:{tiny_bert_dir}")
    batches = _text_batches(seq=97)
    ctx = make_context(batches, loaded.call, torch.device("cpu"), kind=loaded.kind,
                       train=TrainConfig(steps=1, batch_size=4))  # fmt: skip
    fields = {"pass": "seer_attention", "block": 16, "density": 0.3, "dropped": "mean"}
    torch.manual_seed(0)
    model, records = run(copy.deepcopy(loaded.model), recipe_from_dict({"passes": [fields]}).passes, ctx)
    model.eval()
    with torch.no_grad():
        got = loaded.call(model, batches[0])
        for _, m in model.named_modules():
            if isinstance(m, SeerAttentionCore):
                m.dropped = "skip"
        skipped = loaded.call(model, batches[0])
        for _, m in model.named_modules():
            if isinstance(m, SeerAttentionCore):
                m.dropped = "mean"
    assert torch.isfinite(got).all() and (got - skipped).abs().max() > 1e-4
    back = restore(save(model, tmp_path / "out", {"report.json": {"passes": records}}))
    with torch.no_grad():
        assert torch.equal(loaded.call(back.eval(), batches[0]), got)
    compressed = LoadedModel(
        model, loaded.spec, loaded.kind, loaded.base, loaded.data_cfg, loaded.tokenizer_dir
    )
    record = export_verified(compressed, tmp_path / "m.onnx", samples=16, batch=4)
    assert record["verification"]["passed"], record["verification"]["failures"]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("causal", [False, True])
def test_triton_kernel_returns_the_log_sum_exp(causal):
    """The Triton kernel (``TRITON_INTERPRET=1`` on CPU) with ``return_lse``: out and lse as the reference."""
    from edgecompress.kernels import block_sparse_attention
    from edgecompress.kernels.inputs import block_mask_to_index

    n, block = 97, 32
    q, k, v = _inputs(n, seed=5)
    core = _core(block, causal, "reference")
    with torch.no_grad():
        keep = core.choose(q, k)[0]
        want, want_lse = masked_dense(q, k, v, keep, None, causal, D**-0.5, block, lse=True)
        got, got_lse = block_sparse_attention(
            q, k, v, block_mask_to_index(keep, causal), causal, D**-0.5, block=block, return_lse=True
        )
    assert (got - want).abs().max() < 2e-5
    fin = want_lse.isfinite()
    assert torch.equal(fin, got_lse.isfinite()) and (got_lse[fin] - want_lse[fin]).abs().max() < 2e-5


def test_gradients_flow_through_the_estimates():
    """Under autograd (a later pass training through the core) the reference and the estimates run:
    the gradient of q equals the float64 oracle's (1e-4 relative)."""
    n, block = 59, 16
    q, k, v = _inputs(n, seed=7)
    core = _core(block, False, "auto")
    keep = core.choose(q, k)[0]
    q1, q2 = q.clone().requires_grad_(), q.double().clone().requires_grad_()
    core(q1, k, v, None, D**-0.5, None).square().sum().backward()
    _oracle(q2, k, v, keep, False, D**-0.5, block, None).square().sum().backward()
    assert (q1.grad.double() - q2.grad).abs().max() <= 1e-4 * q2.grad.abs().max()
