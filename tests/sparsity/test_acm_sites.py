"""ACM sites (the MLPs of timm and HF models an ACM can replace) and the split initialisation.

Oracle: the replaced model itself; float64 outputs ≤ 1e-10 with all learners, and far from it with
one learner fewer (so the comparison can fail).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgecompress.errors import UserError
from edgecompress.pipeline import Context
from edgecompress.sparsity.acm import ACM, ACMMLP, ACMPassthrough
from edgecompress.sparsity.acm.sites import build_acm, find_sites, install
from tests.sparsity.test_acm_math import _act, _close

# ---- sites and the split initialisation ------------------------------------------------------------


class _Glus(nn.Module):
    """Two timm GLU MLPs in a row: GluMlp with the gate first and, gate last, with a GELU (the halves of
    the fused fc1 must not swap), or two bias-free SwiGLUs."""

    def __init__(self, kind: str):
        super().__init__()
        from timm.layers import GluMlp, SwiGLU

        if kind == "glumlp":
            self.a = GluMlp(12, 40, act_layer=nn.SiLU, gate_last=False)
            self.b = GluMlp(12, 40, act_layer=nn.GELU, gate_last=True)
        else:
            self.a, self.b = SwiGLU(12, 20, bias=False), SwiGLU(12, 20, act_layer=nn.GELU, bias=False)

    def forward(self, x):
        return self.b(self.a(x))


def _timm(arch, **kw):
    import timm

    base = dict(
        pretrained=False, num_classes=10, img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4
    )
    return timm.create_model(arch, **{**base, **kw})


def _models():
    """name -> (build, inputs, n_learners, expected site names, expected {(act, gated)}, has an up bias)."""
    from timm.layers import SwiGLU
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    img = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0  # padding in the second text
    text = {"input_ids": ids, "attention_mask": mask}
    blocks = [f"blocks.{i}.mlp" for i in range(2)]
    bert = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100
    )
    llama = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=100)  # fmt: skip
    layers = [f"model.layers.{i}.mlp" for i in range(2)]
    seq = torch.randn(5, 7, 12, generator=torch.Generator().manual_seed(2))
    gelu, silu, mixed = {("gelu", False)}, {("silu", True)}, {("silu", True), ("gelu", True)}
    swiglu_vit = dict(mlp_layer=SwiGLU, mlp_ratio=2.5, act_layer=nn.SiLU)
    bert_names = [f"encoder.layer.{i}.intermediate" for i in range(2)]
    rows = [  # name, build, inputs, n_learners, site names, {(act, gated)}, has an up-projection bias
        ("deit-mlp", lambda: _timm("deit_small_patch16_224", mlp_ratio=3.0), img, 3, blocks, gelu, False),
        ("swiglu-no-bias", lambda: _Glus("swiglu"), seq, 4, ["a", "b"], mixed, False),
        ("hf-bert", lambda: BertModel(bert), text, 4, bert_names, gelu, False),
        ("hf-llama-gqa", lambda: LlamaForCausalLM(LlamaConfig(**llama)), text, 4, layers, silu, False),
        ("eva02-glumlp", lambda: _timm("eva02_tiny_patch14_224"), img, 4, blocks, silu, True),
        ("vit-swiglu", lambda: _timm("vit_small_patch16_224", **swiglu_vit), img, 5, blocks, silu, True),
        ("glumlp-halves", lambda: _Glus("glumlp"), seq, 4, ["a", "b"], mixed, True),
        ("hf-llama-mlp-bias", lambda: LlamaForCausalLM(LlamaConfig(**llama, mlp_bias=True)), text, 2, layers,
         silu, True),
    ]  # fmt: skip
    return {r[0]: r[1:] for r in rows}


MODELS = _models()


def _call(model, inputs):
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    for attr in ("logits", "last_hidden_state"):
        out = getattr(out, attr, out)
    return out


def _prepared(name):
    """The model in float64 with every Linear re-drawn (weights ~1/√fan_in, biases ~N(0, 0.5)), so no
    zero-initialised bias hides a dropped term; the sites, the inputs and each site's input tokens."""
    build, inputs, n, names, kinds, _ = MODELS[name]
    torch.manual_seed(0)
    model = build().double().eval()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.normal_(0, mod.in_features**-0.5)
                if mod.bias is not None:
                    mod.bias.normal_(0, 0.5)
    inputs = inputs.double() if torch.is_tensor(inputs) else inputs
    sites = find_sites(model)
    assert [s.name for s in sites] == names and all(s.why is None for s in sites)
    assert {(s.act, s.up is not None) for s in sites} == kinds
    seen = {}

    def record(key):
        def hook(_m, args):
            seen[key] = args[0].reshape(-1, args[0].shape[-1])  # the MLP's input tokens [T, d]

        return hook

    hooks = [model.get_submodule(s.name).register_forward_pre_hook(record(s.name)) for s in sites]
    try:
        with torch.no_grad():
            want = _call(model, inputs)
    finally:
        for hk in hooks:
            hk.remove()
    return model, inputs, n, sites, seen, want


@pytest.mark.parametrize("name", list(MODELS))
def test_all_learners_reproduce_the_replaced_model_exactly(name):
    """Oracle: the model before the swap (float64, ≤ 1e-10 on outputs ~1); with one learner fewer the
    output moves by far more (so the comparison can fail)."""
    model, inputs, n, sites, seen, want = _prepared(name)
    acms = [build_acm(s, n, None, 0, seen[s.name]) for s in sites]
    for s, acm in zip(sites, acms):
        acm.fixed_k = n
        install(model, s, acm)
        assert isinstance(model.get_submodule(s.name), ACMMLP)
        if s.passthrough is not None:
            assert isinstance(model.get_submodule(s.passthrough), ACMPassthrough)
    with torch.no_grad():
        _close(_call(model, inputs), want, 1e-10, f"{name}: all learners vs the original model")
        for acm in acms:
            acm.fixed_k = n - 1
        assert (_call(model, inputs) - want).abs().max() > 1e-3 * want.abs().max()


@pytest.mark.parametrize("name", list(MODELS))
def test_learners_hold_the_units_in_decreasing_importance(name):
    """The ACM's hidden units are the site's, permuted so that ``E|a_j|·‖W2[:, j]‖`` (recomputed here
    from the site's own weights on its recorded inputs) does not increase; so learner 1's importance
    sum ≥ learner 2's ≥ ... (oracle: the definition; 1e-12 relative for float64 rounding)."""
    model, inputs, n, sites, seen, _ = _prepared(name)
    for s in sites:
        acm = build_acm(s, n, None, 0, seen[s.name])
        x = seen[s.name]
        with torch.no_grad():
            a = _act(s.act, s.fc1(x)) * (1 if s.up is None else s.up(x))
            score = a.abs().mean(0) * s.fc2.weight.norm(dim=0)  # [hidden], the site's unit order
        match = (acm.fc1.weight[:, None, :] == s.fc1.weight[None]).all(-1)  # acm row i == site row j
        assert bool((match.sum(1) == 1).all()), f"{s.name}: the ACM's rows are not the site's"
        perm = match.float().argmax(1)
        assert sorted(perm.tolist()) == list(range(s.fc1.out_features))
        b1 = torch.zeros_like(acm.fc1.bias) if s.fc1.bias is None else s.fc1.bias[perm]
        assert torch.equal(acm.fc2.weight, s.fc2.weight[:, perm]) and torch.equal(acm.fc1.bias, b1)
        ordered = score[perm]
        assert bool((ordered[:-1] >= ordered[1:] - 1e-12 * ordered.max()).all()), f"{s.name}: out of order"
        per_learner = ordered.reshape(n, -1).sum(1)
        assert bool((per_learner[:-1] >= per_learner[1:]).all()), per_learner
        assert per_learner[0] > per_learner[-1]  # a real ranking, not a tie


def test_mlps_with_a_hidden_norm_are_left_dense_and_named():
    model = _timm("eva02_tiny_patch14_224", scale_mlp=True)  # SwiGLU with a LayerNorm over its hidden units
    sites = find_sites(model)
    assert [s.why for s in sites] == ["a norm over the hidden units couples the learners"] * 2
    ctx = Context(example_inputs=(), forward_loop=None, call=None, device=torch.device("cpu"))
    with pytest.raises(UserError, match="no MLP of a supported form"):
        ACM().sites(model, ctx)
    assert ctx.notes == [
        f"blocks.{i}.mlp: left dense (a norm over the hidden units couples the learners)" for i in range(2)
    ]


def test_n_learners_that_do_not_divide_the_hidden_width_are_refused():
    model = _timm("deit_small_patch16_224", mlp_ratio=3.0)  # hidden 144
    ctx = Context(example_inputs=(), forward_loop=None, call=None, device=torch.device("cpu"))
    with pytest.raises(UserError, match="n_learners=5 does not divide the hidden width 144 of blocks.0.mlp"):
        ACM(n_learners=5).sites(model, ctx)
    assert [s.name for s in ACM(n_learners=6, ignore=("blocks.1.mlp",)).sites(model, ctx)] == ["blocks.0.mlp"]


def test_module_arguments_are_checked():
    with pytest.raises(ValueError, match="act must be one of"):
        ACMMLP(8, 8, 2, 4, 16, act="tanh")
    with pytest.raises(ValueError, match="k_min must be in"):
        ACMMLP(8, 8, 2, 4, 16, k_min=3)
