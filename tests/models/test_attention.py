"""Explicit attention equals the library's fused attention (oracle: the unmodified model, fp32 ≤ 1e-5)."""

from __future__ import annotations

import pytest
import torch

from edgecompress.models.attention import AttentionAdapter, explicit_attention_
from edgecompress.models.loading import load_model
from edgecompress.models.slots import called, chains
from tests.conftest import tiny_timm

TOL = 1e-5


def _count_point_calls(model):
    calls = {"n": 0}
    hooks = [
        m.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
        for _, m in chains(model, ("attn_q", "attn_k", "attn_v", "attn_probs"))
    ]
    return calls, hooks


SMALL = {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 4}
TIMM_ARCHS = {
    "vit_tiny_patch16_224": {},
    "deit_tiny_distilled_patch16_224": {},
    "swin_tiny_patch4_window7_224": {},
    "eva02_tiny_patch14_224": SMALL,  # RoPE, SwiGLU, q/v biases added in F.linear
    "beit_base_patch16_224": SMALL,  # relative position bias, q/v biases added in F.linear
}


@pytest.mark.parametrize("arch", list(TIMM_ARCHS))
def test_timm_explicit_attention_matches(arch):
    loaded = tiny_timm(arch, **TIMM_ARCHS[arch])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = loaded.model(x)
        names = explicit_attention_(loaded.model)
        qkv = [n for n, _ in loaded.model.named_modules() if n.endswith("attn.qkv")]
        assert called(loaded.model, qkv, lambda m: m(x)) == set(qkv)  # the qkv Linears really run
        calls, hooks = _count_point_calls(loaded.model)
        out = loaded.model(x)
    n_attn = sum(isinstance(m, AttentionAdapter) for m in loaded.model.modules())
    assert names and n_attn == len(names)
    assert calls["n"] == 4 * n_attn  # the q, k, probs and v slots all ran
    torch.testing.assert_close(out, ref, atol=TOL, rtol=TOL)
    state_names = set(loaded.model.state_dict())
    assert any(n.endswith("attn.qkv.weight") for n in state_names)  # parameter names unchanged


def _hf_pair(folder):
    a = load_model(f"hf:{folder}")
    b = load_model(f"hf:{folder}")
    explicit_attention_(b.model)
    return a, b


def test_hf_bert_explicit_attention_matches_with_padding(tiny_bert_dir):
    a, b = _hf_pair(tiny_bert_dir)
    ids = torch.randint(0, 30522, (2, 13))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, 9:] = 0
    calls, _ = _count_point_calls(b.model)
    with torch.no_grad():
        ref = a.model(input_ids=ids, attention_mask=mask).last_hidden_state
        out = b.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert calls["n"] == 4 * 2
    torch.testing.assert_close(out[0], ref[0], atol=TOL, rtol=TOL)
    torch.testing.assert_close(out[1, :9], ref[1, :9], atol=TOL, rtol=TOL)


def test_hf_vit_explicit_attention_matches(tiny_hf_vit_dir):
    a, b = _hf_pair(tiny_hf_vit_dir)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            b.model(pixel_values=x).logits, a.model(pixel_values=x).logits, atol=TOL, rtol=TOL
        )


def test_hf_llama_gqa_causal_matches(tiny_llama_dir):
    a, b = _hf_pair(tiny_llama_dir)
    ids = torch.randint(0, 30522, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(
            b.model(input_ids=ids).logits, a.model(input_ids=ids).logits, atol=TOL, rtol=TOL
        )
