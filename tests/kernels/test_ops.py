"""Op registration (schema, fake impls, compile/export), dispatch and fallback, input validation."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import edgecompress.kernels as ek
from edgecompress.kernels import block_mask_to_index, ops, reference
from tests.kernels.oracle import qkv, random_block_mask


def _attention_args(device, n=40, block=32):
    q, k, v = qkv(1, 2, 1, n, 32, torch.float32, device)
    index = block_mask_to_index(random_block_mask(1, 2, n, block, 0.5, device), True)
    return q, k, v, index


def _acm_args(device, t=23):
    x = torch.randn(t, 16, device=device)
    k = torch.randint(0, 3, (t,), device=device)
    return (
        x,
        k,
        torch.randn(16, 32, device=device),
        torch.randn(32, device=device),
        torch.randn(32, 16, device=device),
    )


def test_opcheck_all_ops(device):
    """torch.library.opcheck: schema, fake impl vs real outputs, dispatch under aot_autograd."""
    q, k, v, index = _attention_args(device)
    for lse in (False, True):
        torch.library.opcheck(
            torch.ops.edgecompress.block_sparse_attention.default,
            (q, k, v, index.indices, index.counts, True, 0.2, 32, lse),
        )
    torch.library.opcheck(
        torch.ops.edgecompress.attention_with_pooled_probs.default, (q, k, v, 32, False, 0.2)
    )
    torch.library.opcheck(torch.ops.edgecompress.acm_mlp.default, (*_acm_args(device), 2))


def test_fake_impls_give_output_shapes():
    with FakeTensorMode():
        q, k, v = torch.empty(2, 4, 130, 64), torch.empty(2, 2, 130, 64), torch.empty(2, 2, 130, 64)
        mask = torch.ones(2, 4, 3, 3, dtype=torch.bool)
        assert ek.block_sparse_attention(q, k, v, mask).shape == (2, 4, 130, 64)
        out, lse = ek.block_sparse_attention(q, k, v, mask, return_lse=True)
        assert out.shape == (2, 4, 130, 64) and lse.shape == (2, 4, 130) and lse.dtype == torch.float32
        out, pooled = ek.attention_with_pooled_probs(q.half(), k.half(), v.half(), 32)
        assert out.shape == (2, 4, 130, 64) and out.dtype == torch.float16
        assert pooled.shape == (2, 4, 5, 5) and pooled.dtype == torch.float32
        x = torch.empty(97, 48)
        y = ek.acm_mlp(
            x, torch.empty(97, dtype=torch.long), torch.empty(48, 64), torch.empty(64), torch.empty(64, 40), 4
        )
        assert y.shape == (97, 40)


def test_torch_compile_fullgraph_and_export(device):
    """The ops trace without graph breaks (aot_eager backend) and appear in an exported graph."""
    q, k, v = qkv(1, 2, 1, 40, 32, torch.float32, device)
    mask = random_block_mask(1, 2, 40, 32, 0.5, device)

    def fn(q, k, v, mask):
        return ek.block_sparse_attention(q, k, v, mask, True, block=32)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(q, k, v, mask), fn(q, k, v, mask))

    class Block(torch.nn.Module):
        def forward(self, x, kk, w1, b1, w2):
            return ek.acm_mlp(x, kk, w1, b1, w2, 2)

    exported = torch.export.export(Block(), _acm_args(device))
    targets = {str(node.target) for node in exported.graph.nodes}
    assert "edgecompress.acm_mlp.default" in targets


def test_dispatch_uses_triton_when_interpreting(device, monkeypatch):
    calls = []
    monkeypatch.setattr(
        ops._acm_triton, "acm_mlp_fwd", lambda *a: calls.append("triton") or reference.acm_mlp(*a)
    )
    ek.acm_mlp(*_acm_args(device), 2)
    assert calls == ["triton"]


def test_fallback_to_reference_on_cpu_without_interpreter(monkeypatch):
    """CPU tensors with interpretation off go to the reference twin; the kernels are not launched."""
    monkeypatch.setattr(ops, "INTERPRET", False)
    launched = []
    if ops.HAS_TRITON:
        for mod, name in [
            (ops._bsa_triton, "block_sparse_attention_fwd"),
            (ops._pooled_triton, "attention_with_pooled_probs_fwd"),
            (ops._acm_triton, "acm_mlp_fwd"),
        ]:
            monkeypatch.setattr(mod, name, lambda *a, name=name: launched.append(name))
    q, k, v, index = _attention_args("cpu")
    out = ek.block_sparse_attention(q, k, v, index, True, block=32)
    assert torch.equal(out, reference.block_sparse_attention(q, k, v, index, True, block=32))
    pooled = ek.attention_with_pooled_probs(q, k, v, 32)[1]
    assert torch.equal(pooled, reference.attention_with_pooled_probs(q, k, v, 32)[1])
    args = _acm_args("cpu")
    assert torch.equal(ek.acm_mlp(*args, 2), reference.acm_mlp(*args, 2))
    assert launched == []


def test_import_without_triton():
    """`import edgecompress.kernels` works when triton cannot be imported, and the ops still run."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` fail
        import torch
        import edgecompress.kernels as ek
        from edgecompress.kernels import ops
        assert not ops.HAS_TRITON
        assert not any(m.startswith("edgecompress.kernels.triton.") for m in sys.modules)
        q = torch.randn(1, 2, 50, 16)
        out = ek.block_sparse_attention(q, q, q, torch.ones(1, 2, 1, 1, dtype=torch.bool))
        ref = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        assert (out - ref).abs().max() < 1e-5
        print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=".", timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def _bad_attention_inputs():
    q, k, v = qkv(1, 4, 2, 70, 32, torch.float32, "cpu")
    ok_mask = torch.ones(1, 4, 3, 3, dtype=torch.bool)
    return [
        ((q[0], k, v, ok_mask), "4-D"),
        ((q, k[..., :16], v[..., :16], ok_mask), "head dims differ"),
        (
            (q, k[:, :1].expand(1, 3, 70, 32), v[:, :1].expand(1, 3, 70, 32), ok_mask),
            "multiple of key/value heads",
        ),
        ((q, k, v[:, :, :60], ok_mask), "same shape"),
        ((q, k, v, torch.ones(1, 4, 2, 3, dtype=torch.bool)), "block_mask must be"),
        ((q, k, v, ok_mask.int()), "bool"),
        ((q, k.half(), v, ok_mask), "one dtype"),
        ((q.double(), k.double(), v.double(), ok_mask), "dtype must be one of"),
        (
            (q, k, v, ek.BlockIndex(torch.zeros(1, 4, 2, 3, dtype=torch.int32), torch.zeros(1, 4, 3))),
            "BlockIndex",
        ),
    ]


@pytest.mark.parametrize("case", range(9))
def test_bad_attention_inputs_raise(case):
    args, message = _bad_attention_inputs()[case]
    with pytest.raises(ValueError, match=message):
        ek.block_sparse_attention(*args, block=32)


def test_bad_block_and_pooled_inputs_raise():
    q, k, v = qkv(1, 2, 2, 70, 32, torch.float32, "cpu")
    with pytest.raises(ValueError, match="block must be one of"):
        ek.block_sparse_attention(q, k, v, torch.ones(1, 2, 2, 2, dtype=torch.bool), block=48)
    with pytest.raises(ValueError, match="head dim"):
        big = torch.randn(1, 2, 8, 320)
        ek.attention_with_pooled_probs(big, big, big)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        ek.attention_with_pooled_probs(
            q, k[:, :1].expand(1, 3, 70, 32).contiguous(), v[:, :1].expand(1, 3, 70, 32)
        )


def test_bad_acm_inputs_raise():
    x, k, w1, b1, w2 = _acm_args("cpu")
    cases = [
        ((x[None], k, w1, b1, w2, 2), "x must be 2-D"),
        ((x, k[:5], w1, b1, w2, 2), "k must be 1-D"),
        ((x, k.float(), w1, b1, w2, 2), "integer"),
        ((x, k, w1, b1, w2, 3), "n_learners"),
        ((x, k, w1[:8], b1, w2, 2), "w1 must be"),
        ((x, k, w1, b1[:4], w2, 2), "b1 must be"),
        ((x, k, w1, b1, w2[:4], 2), "w2 must be"),
        ((x.half(), k, w1, b1, w2, 2), "one dtype"),
        ((x, k, w1, b1, w2, 0), "positive int"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            ek.acm_mlp(*args)
