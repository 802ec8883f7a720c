"""The forms of SeerAttention's block-sparse attention and its training target.

Oracles and tolerances (float32 inputs, outputs of magnitude ~1):

* the CPU forms (gathered; tiled; the C++ kernel; FlexAttention compiled by Inductor) against the
  masked-dense reference: 2e-6 absolute (same math, another summation order); odd lengths 59, 97,
  130 (partial last blocks), a sequence shorter than a block, causal and not, GQA, padding (all
  four), ragged rows from a ``threshold`` and a decoder without its diagonal (tiled, C++), and a
  real-valued bias (the gathered form; the others hand it to the gathered form); without a working
  C++ compiler FlexAttention and the C++ kernel warn and the core's result is the tiled form's;
* the masked-dense reference against the project's kernel twin
  :func:`edgecompress.kernels.reference.block_sparse_attention` (no bias): 1e-6;
* padding: the real rows of a padded sample equal the same sample without its padding: 2e-6;
* every block kept: PyTorch SDPA (dense): 2e-6; the class token's row (encoders) is dense;
* the Triton kernel (``TRITON_INTERPRET=1`` on CPU; CUDA in CI with a GPU) against the reference: 2e-6;
* the target against the kernel :func:`edgecompress.kernels.attention_with_pooled_probs`
  (row-normalised): 1e-6."""

from __future__ import annotations

import warnings

import pytest
import torch

from edgecompress.kernels import attention_with_pooled_probs
from edgecompress.kernels import reference as R
from edgecompress.kernels.ops import HAS_TRITON
from edgecompress.sparsity.seer import cpp as CPP
from edgecompress.sparsity.seer import execute as X
from edgecompress.sparsity.seer import flex as FX
from edgecompress.sparsity.seer import tiled as T
from edgecompress.sparsity.seer.core import SeerAttentionCore

H, HKV, D = 4, 2, 16
MIN = torch.finfo(torch.float32).min


def _inputs(n: int, b: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, D, generator=g) for h in (H, HKV, HKV))


def _keep(q, k, block, causal, density=0.4, valid=None):
    core = SeerAttentionCore(H, HKV, D, D, block, causal, density=density)
    torch.manual_seed(1)
    with torch.no_grad():
        core.gate.q_weight.normal_()
        core.gate.k_weight.normal_()
    return core.choose(q, k, valid)[0]


def _padding_bias(n: int, valid: torch.Tensor, causal: bool) -> torch.Tensor:
    ok = valid[:, None, None, :].expand(-1, 1, n, n)
    if causal:
        ok = ok & torch.ones(n, n, dtype=torch.bool).tril()
    return torch.zeros(ok.shape).masked_fill(~ok, MIN)


def _cpp(q, k, v, keep, causal, block, valid=None):
    got = CPP.attend(q, k, v, keep, causal, D**-0.5, block, valid)
    assert got is not None, "the C++ kernel did not build (see the warning)"
    return got


def _flex(q, k, v, keep, causal, block, valid=None):
    got = FX.flex(q, k, v, keep, causal, D**-0.5, block, valid)
    assert got is not None, "FlexAttention did not compile (see the warning)"
    return got


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,block", [(59, 16), (97, 16), (130, 16), (13, 16), (97, 32), (130, 32)])
def test_cpu_forms_equal_the_masked_reference(n, block, causal):
    q, k, v = _inputs(n)
    keep = _keep(q, k, block, causal)
    keep[0, 1, -1] = False  # a row that keeps nothing outputs zeros
    ref = X.masked_dense(q, k, v, keep, None, causal, D**-0.5, block)
    for budget in (X.GATHER_BYTES, 1):  # all query blocks in one chunk / one per chunk
        got = X.gathered(q, k, v, keep, None, causal, D**-0.5, block, budget=budget)
        torch.testing.assert_close(got, ref, rtol=0, atol=2e-6)
    for budget in (T.SCORE_BYTES, 1):  # pieces of several rows / of one pair
        got = T.tiled(q, k, v, keep, causal, D**-0.5, block, budget=budget)
        torch.testing.assert_close(got, ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(_cpp(q, k, v, keep, causal, block), ref, rtol=0, atol=2e-6)
    if n < block:  # one block: FlexAttention leaves it to the gathered form (no compile of its own)
        assert FX.flex(q, k, v, keep, causal, D**-0.5, block) is None
        core = SeerAttentionCore(H, HKV, D, D, block, causal, form="flex")
        torch.testing.assert_close(core.execute(q, k, v, keep, None, D**-0.5), ref, rtol=0, atol=2e-6)
    elif block == 16:  # FlexAttention compiles per block size: one size keeps CI short
        torch.testing.assert_close(_flex(q, k, v, keep, causal, block), ref, rtol=0, atol=2e-6)
    if block >= 32:  # the kernels' block sizes
        twin = R.block_sparse_attention(q, k, v, keep, causal, D**-0.5, block=block)
        torch.testing.assert_close(ref, twin, rtol=0, atol=1e-6)


def test_flex_falls_back_to_the_gathered_form_without_a_compiler(monkeypatch):
    monkeypatch.setattr(FX, "_FAILED", {})  # this process's record of failed variants, restored after
    n, block = 97, 16
    q, k, v = (t.half() for t in _inputs(n, b=1))  # float16: a variant no other test compiles
    core = SeerAttentionCore(H, HKV, D, D, block, True, density=0.4, form="flex")
    keep = core.choose(q.float(), k.float())[0]
    cfg = {"cpp.cxx": ("no-such-compiler",), "fx_graph_cache": False}
    with (
        torch._inductor.config.patch(cfg),
        torch._dynamo.config.patch(recompile_limit=64),  # other tests' variants may have used up the 8
        pytest.warns(UserWarning, match="InvalidCxxCompiler"),
    ):
        got = core.execute(q, k, v, keep, None, D**-0.5)
    assert list(FX._FAILED) == [(torch.float16, True, block)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second try, no second warning
        assert FX.flex(q, k, v, keep, True, D**-0.5, block) is None
    torch.testing.assert_close(got, T.tiled(q, k, v, keep, True, D**-0.5, block), rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_tiled_ragged_rows_and_a_decoder_without_its_diagonal(causal):
    """A ``threshold`` keeps a different number of blocks per head and row (ragged pieces), padding keys
    are masked in the gathered slots, and rows that drop their diagonal block take the general path."""
    n, block = 97, 16
    q, k, v = _inputs(n)
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[0, 90:] = False
    core = SeerAttentionCore(H, HKV, D, D, block, causal, density=None, threshold=0.12, keep_diagonal=False)
    torch.manual_seed(2)
    with torch.no_grad():
        core.gate.q_weight.normal_()
        core.gate.k_weight.normal_()
    keep = core.choose(q, k, valid)[0]
    counts = keep.sum(-1)
    assert (counts != counts[:, :1]).any()  # ragged: heads of a row keep different numbers of blocks
    assert not keep.diagonal(dim1=-2, dim2=-1).all()
    ref = X.masked_dense(q, k, v, keep, None, causal, D**-0.5, block, valid)
    for budget in (T.SCORE_BYTES, 1):
        got = T.tiled(q, k, v, keep, causal, D**-0.5, block, valid, budget=budget)
        torch.testing.assert_close(got, ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(_cpp(q, k, v, keep, causal, block, valid), ref, rtol=0, atol=2e-6)


def test_cpp_kernel_falls_back_to_the_tiled_form_without_a_compiler(monkeypatch):
    monkeypatch.setattr(CPP, "_STATE", {})  # this process's loaded kernel, restored after

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: no-such-compiler")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    n, block = 97, 16
    q, k, v = _inputs(n, b=1)
    core = SeerAttentionCore(H, HKV, D, D, block, True, density=0.4)
    keep = core.choose(q, k)[0]
    with pytest.warns(UserWarning, match="no-such-compiler"):
        got = core.execute(q, k, v, keep, None, D**-0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second try, no second warning
        assert CPP.attend(q, k, v, keep, True, D**-0.5, block) is None
    torch.testing.assert_close(got, T.tiled(q, k, v, keep, True, D**-0.5, block), rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_a_bias_is_applied_inside_the_kept_blocks(causal):
    n, block = 97, 16
    q, k, v = _inputs(n)
    keep = _keep(q, k, block, causal)
    bias = torch.randn(
        1, H, n, n, generator=torch.Generator().manual_seed(4)
    )  # e.g. a relative position bias
    ref = X.masked_dense(q, k, v, keep, bias, causal, D**-0.5, block)
    got = X.gathered(q, k, v, keep, bias, causal, D**-0.5, block)
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-6)
    plain = X.masked_dense(q, k, v, keep, None, causal, D**-0.5, block)
    assert (ref - plain).abs().max() > 1e-2  # the bias mattered


@pytest.mark.parametrize("causal", [False, True])
def test_padding_rows_equal_the_unpadded_sample(causal):
    """Sample 1 has 11 padding tokens; its real rows must equal the same sample cut to its real length."""
    n, block, real = 97, 16, 86
    q, k, v = _inputs(n)
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, real:] = False
    full = _padding_bias(n, valid, causal)
    bias, simple_valid = X.simplify_bias(full, causal, n)
    assert bias is None and torch.equal(simple_valid, valid)  # a padding mask is all in ``valid``
    keep = _keep(q, k, block, causal, valid=valid)
    got = X.gathered(q, k, v, keep, None, causal, D**-0.5, block, valid)
    ref = X.masked_dense(q, k, v, keep, None, causal, D**-0.5, block, valid)
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(_flex(q, k, v, keep, causal, block, valid), ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(T.tiled(q, k, v, keep, causal, D**-0.5, block, valid), ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(_cpp(q, k, v, keep, causal, block, valid), ref, rtol=0, atol=2e-6)
    as_bias = X.gathered(q, k, v, keep, full, causal, D**-0.5, block)  # the same mask as a general bias
    torch.testing.assert_close(as_bias, ref, rtol=0, atol=2e-6)
    nb_real = -(-real // block)
    cut = X.masked_dense(
        q[1:, :, :real],
        k[1:, :, :real],
        v[1:, :, :real],
        keep[1:, :, :nb_real, :nb_real],
        None,
        causal,
        D**-0.5,
        block,
    )
    torch.testing.assert_close(got[1:, :, :real], cut, rtol=0, atol=2e-6)


def test_every_block_kept_is_dense_attention_and_the_class_row_is_dense():
    n, block = 130, 32
    q, k, v = _inputs(n)
    full = torch.ones(2, H, 5, 5, dtype=torch.bool)
    dense = X.dense(q, k, v, None, False, D**-0.5)
    for got in (
        X.gathered(q, k, v, full, None, False, D**-0.5, block),
        T.tiled(q, k, v, full, False, D**-0.5, block),
        _cpp(q, k, v, full, False, block),
    ):
        torch.testing.assert_close(got, dense, rtol=0, atol=2e-6)
    keep = _keep(q, k, block, False, density=0.2)
    assert keep[:, :, 0].all() and keep[:, :, :, 0].all()  # the first block's row and column
    got = X.gathered(q, k, v, keep, None, False, D**-0.5, block)
    torch.testing.assert_close(got[:, :, :block], dense[:, :, :block], rtol=0, atol=2e-6)  # cls row dense
    v2 = v.clone()
    v2[:, :, 0] += 10.0  # every query still attends to the class token
    moved = (X.gathered(q, k, v2, keep, None, False, D**-0.5, block) - got).abs().amax(-1)
    assert (moved > 0).all()


def test_core_runs_dense_below_min_seq_len_and_at_full_density():
    n = 130  # 9 blocks: rows 2-6 of a decoder keep fewer than all their blocks at density 0.1
    q, k, v = _inputs(n)
    dense = X.dense(q, k, v, None, True, D**-0.5)
    short = SeerAttentionCore(H, HKV, D, D, 16, True, density=0.1, min_seq_len=131)
    full = SeerAttentionCore(H, HKV, D, D, 16, True, density=1.0)
    sparse = SeerAttentionCore(H, HKV, D, D, 16, True, density=0.1)
    with torch.no_grad():
        assert torch.equal(short(q, k, v, None, D**-0.5, None), dense)
        assert torch.equal(full(q, k, v, None, D**-0.5, None), dense)
        assert (sparse(q, k, v, None, D**-0.5, None) - dense).abs().max() > 1e-3
    assert sparse.pick_form(q, None, None) == "cpp"  # CPU, no bias: the C++ kernel (tiled where it fails)
    assert sparse.pick_form(q, torch.zeros(n, n), None) == "gathered"  # a model bias


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("causal", [False, True])
def test_triton_kernel_equals_the_reference(causal):
    """The CUDA form, run by Triton's interpreter on CPU (TRITON_INTERPRET=1, as in CI)."""
    from edgecompress.kernels.ops import INTERPRET

    if not (INTERPRET or torch.cuda.is_available()):
        pytest.skip("needs TRITON_INTERPRET=1 or a GPU")
    dev = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
    n, block = 97, 32
    q, k, v = (t.to(dev) for t in _inputs(n, b=1))
    keep = _keep(q.cpu(), k.cpu(), block, causal).to(dev)
    got = X.triton(q, k, v, keep, causal, D**-0.5, block)
    ref = X.masked_dense(q, k, v, keep, None, causal, D**-0.5, block)
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_target_is_the_kernels_pooled_probabilities_row_normalised(causal):
    n, block = 97, 32
    q, k, v = _inputs(n, b=1)
    out, truth = X.pooled_truth(q, k, v, None, causal, D**-0.5, block)
    k_out, pooled = attention_with_pooled_probs(q, k, v, block, causal, D**-0.5)
    torch.testing.assert_close(out, k_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(truth, pooled / pooled.sum(-1, keepdim=True), rtol=0, atol=1e-6)
    assert torch.allclose(truth.sum(-1), torch.ones(1, H, 4))
    if causal:
        assert truth.triu(1).abs().max() == 0
