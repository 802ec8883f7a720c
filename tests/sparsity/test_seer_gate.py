"""SeerAttention's AttnGate and block selection as pure functions (no model).

Oracles: loop-by-loop re-computations of the pooling and the per-head scores (float64, tolerance
1e-12), transformers' own ``apply_rotary_pos_emb`` for RoPE (float32, 1e-6), block causality as an
exact property (rows before a change keep identical logits), the selection rules as properties
(exact counts)."""

from __future__ import annotations

import math

import pytest
import torch

from edgecompress.sparsity.seer.gate import AttnGate, allowed_blocks, block_valid, pool_blocks, rope
from edgecompress.sparsity.seer.masks import forced_blocks, row_budget, select_blocks

B, H, HKV, D, BS = 2, 4, 2, 8, 16


def _qk(n: int, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, n, D, generator=g, dtype=dtype), torch.randn(
        B, HKV, n, D, generator=g, dtype=dtype
    )


def _gate(seed: int = 1, rope_dims: int = 0) -> AttnGate:
    gate = AttnGate(H, HKV, D, D, BS, rope_dims).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random projections, so a head or group mix-up shows
        gate.q_weight.copy_(torch.randn(gate.q_weight.shape, generator=g, dtype=torch.float64))
        gate.k_weight.copy_(torch.randn(gate.k_weight.shape, generator=g, dtype=torch.float64))
    return gate


@pytest.mark.parametrize("n", [59, 97, 130, 7])
def test_pooling_uses_only_the_real_tokens_of_each_block(n):
    x = _qk(n)[0]
    valid = torch.ones(B, n, dtype=torch.bool)
    valid[1, n - 5 :] = False  # padding at the end of sample 1
    got = pool_blocks(x, BS, valid, ("max", "min", "avg"))
    nb = math.ceil(n / BS)
    assert got.shape == (B, H, nb, 3 * D)
    for b in range(B):
        for i in range(nb):
            toks = [t for t in range(i * BS, min((i + 1) * BS, n)) if valid[b, t]]
            if not toks:
                assert got[b, :, i].abs().max() == 0
                continue
            xs = x[b, :, toks]  # [H, T, D]
            want = torch.cat([xs.amax(1), xs.amin(1), xs.mean(1)], dim=-1)
            torch.testing.assert_close(got[b, :, i], want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_gate_scores_per_head_with_k_shared_per_group(causal):
    n = 97
    q, k = _qk(n)
    gate = _gate()
    logits, allowed = gate(q, k, causal=causal)
    nb = math.ceil(n / BS)
    assert logits.shape == (B, H, nb, nb) and allowed.shape == (1, 1, nb, nb)
    group = H // HKV
    qp = pool_blocks(q, BS, None, ("avg",))
    kp = pool_blocks(k, BS, None, ("max", "min", "avg"))
    for h in range(H):  # head h uses its own Q projection and the K projection of K/V head h // group
        want = (qp[:, h] @ gate.q_weight[h]) @ (kp[:, h // group] @ gate.k_weight[h // group]).transpose(
            -1, -2
        )
        want = want / math.sqrt(D)
        if causal:
            want = want.masked_fill(~torch.ones(nb, nb, dtype=torch.bool).tril(), torch.finfo(want.dtype).min)
        torch.testing.assert_close(logits[:, h], want, rtol=0, atol=1e-12)


def test_gate_is_block_causal():
    """Changing the tokens of the last block changes no earlier row of a decoder's gate."""
    n = 130
    q, k = _qk(n)
    gate = _gate()
    before = gate(q, k, causal=True)[0]
    q2, k2 = q.clone(), k.clone()
    q2[:, :, 128:] += 3.0
    k2[:, :, 128:] -= 2.0
    after = gate(q2, k2, causal=True)[0]
    assert torch.equal(before[:, :, :-1], after[:, :, :-1])
    assert not torch.equal(before[:, :, -1], after[:, :, -1])
    probs = before.softmax(-1)
    assert probs.triu(1).abs().max() == 0  # no weight on a later key block


def test_padding_keys_are_invisible_to_the_gate():
    n = 97
    q, k = _qk(n)
    valid = torch.ones(B, n, dtype=torch.bool)
    valid[0, 90:] = False  # sample 0: block 5 (tokens 80-95) is part padding, block 6 (token 96) all
    valid[1, 80:] = False  # blocks 5 and 6 of sample 1 hold no real token
    gate = _gate()
    logits, allowed = gate(q, k, valid)
    k2 = k.clone()
    k2[~valid[:, None, :].expand(B, HKV, n)] = 7.0
    torch.testing.assert_close(gate(q, k2, valid)[0], logits, rtol=0, atol=0)
    assert allowed[1, 0, :, 5:].sum() == 0 and allowed[1, 0, :, :5].all()
    assert allowed[0, 0, :, :6].all() and not allowed[0, 0, :, 6].any()
    assert torch.equal(block_valid(valid, n, BS)[1], torch.tensor([True] * 5 + [False] * 2))


def test_rope_matches_transformers_and_inverts():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=512)
    emb = LlamaRotaryEmbedding(cfg)
    x = torch.randn(2, 4, 59, 16)
    pos = torch.arange(3, 62).expand(2, 59)
    cos, sin = emb(x, pos)
    want, _ = apply_rotary_pos_emb(x, x, cos, sin)
    got = rope(x, pos, emb.inv_freq, emb.attention_scaling)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    back = rope(got, pos, emb.inv_freq, emb.attention_scaling, inverse=True)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-5)


def test_rope_gate_sees_pre_rope_qk_and_rotates_blocks():
    """A RoPE gate fed rotated Q/K scores like the same gate fed the un-rotated ones plus block RoPE."""
    n = 97
    q, k = _qk(n)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    gate = _gate(rope_dims=D)
    gate.inv_freq.copy_(inv)
    pos = torch.arange(n).expand(B, n)
    logits = gate(rope(q, pos, inv), rope(k, pos, inv), causal=True)[0]
    qp, kp = gate.project(q, k, None, pos)  # pre-RoPE inputs, RoPE at positions 0, 16, 32, ...
    group = H // HKV
    want = qp @ kp.repeat_interleave(group, 1).transpose(-1, -2) / math.sqrt(D)
    tril = torch.ones(want.shape[-1], want.shape[-1], dtype=torch.bool).tril()
    torch.testing.assert_close(logits[..., tril], want[..., tril], rtol=0, atol=1e-9)


def test_untrained_gate_scores_the_block_averages():
    n = 59
    q, k = _qk(n)
    gate = AttnGate(H, HKV, D, D, BS).double()
    logits = gate(q, k)[0]
    qa = pool_blocks(q, BS, None, ("avg",))
    ka = pool_blocks(k, BS, None, ("avg",)).repeat_interleave(H // HKV, 1)
    torch.testing.assert_close(logits, qa @ ka.transpose(-1, -2) / math.sqrt(D), rtol=0, atol=1e-12)


def test_forced_blocks():
    enc = forced_blocks(5, False, True, True, 2)
    assert enc[0].all() and enc[:, 0].all() and enc.diagonal().all() and int(enc.sum()) == 5 + 4 + 4 - 0
    dec = forced_blocks(6, True, True, True, 2)
    assert dec[4:].all() and dec[:, 0].all() and dec.diagonal().all() and not dec[0, 1:].any()
    assert not forced_blocks(4, True, False, False, 0).any()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 1.0])
def test_density_keeps_ceil_of_the_allowed_blocks_per_row(causal, density):
    nb = 11
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(B, H, nb, nb, generator=g)  # no ties
    allowed = allowed_blocks(nb, causal, None, "cpu")
    none = torch.zeros(nb, nb, dtype=torch.bool)
    keep = select_blocks(logits, allowed, none, density, None)
    n_allowed = allowed.sum(-1).expand(B, H, nb)
    want = torch.ceil(n_allowed * density - 1e-6).clamp(min=1)
    assert torch.equal(keep.sum(-1), want.long())
    assert not (keep & ~allowed).any()
    # the kept blocks are the row's highest scores
    kth = logits.masked_fill(~keep, float("inf")).amin(-1)
    dropped = logits.masked_fill(keep | ~allowed, float("-inf")).amax(-1)
    assert (dropped < kth).all()
    # forced blocks count inside the budget: with the diagonal forced, rows still keep ceil(...) or the diagonal
    forced = forced_blocks(nb, causal, True, False, 0)
    keep_f = select_blocks(logits, allowed, forced, density, None)
    assert keep_f.diagonal(dim1=-2, dim2=-1).all() and torch.equal(keep_f.sum(-1), want.long())
    assert torch.equal(row_budget(allowed, density)[0, 0], want[0, 0].long())


def test_threshold_keeps_blocks_above_it_and_forced_ones():
    nb = 7
    logits = torch.randn(1, 2, nb, nb)
    allowed = allowed_blocks(nb, True, None, "cpu")
    forced = forced_blocks(nb, True, True, False, 0)
    probs = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min).softmax(-1)
    keep = select_blocks(
        logits.masked_fill(~allowed, torch.finfo(logits.dtype).min), allowed, forced, None, 0.1
    )
    assert torch.equal(keep, ((probs > 0.1) | forced) & allowed)
