"""The ``seer_attention`` pass on real model classes (tiny configs built in code, and demo:minilm).

Oracles and tolerances:

* the base model itself at density 1.0 (every block kept: the core runs dense SDPA): float32, 1e-5
  of the output scale;
* block causality of a decoder's choices and the gates' copy of the model's RoPE table: exact;
* save → restore: bit-identical outputs (same weights, same forms);
* training lowers the held-out KL(truth ‖ gate) on demo:minilm's real attention (margin at the test);
* ``uniform_ptq`` after the pass: q/k/v quantized around the sparse core, the softmax not (the core
  fuses it), embedding cosine to the float SeerAttention model ≥ 0.99 (W8A8 of MiniLM keeps ≥ 0.998);
* bad recipes: one ``edgecompress: error:`` line, exit code 2, no output folder (as tests/test_cli.py).
"""

from __future__ import annotations

import copy

import pytest
import torch

from edgecompress.calib import make_context
from edgecompress.cli import main
from edgecompress.models.attention import adapters
from edgecompress.models.loading import load_model, restore
from edgecompress.pipeline import run
from edgecompress.quantize.modules import UniformQuantizer
from edgecompress.recipe import recipe_from_dict
from edgecompress.sparsity.seer import SeerAttentionCore
from edgecompress.structure import save
from edgecompress.train import TrainConfig
from tests.conftest import save_tiny_llama


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _text_batches(n_batches=2, batch=4, seq=97, vocab=100, seed=0):
    """Random token ids, the last 9 tokens of every other row padding (attention_mask 0)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[1::2, seq - 9 :] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _run(loaded, batches, steps=2, **fields):
    ctx = make_context(
        batches,
        loaded.call,
        torch.device("cpu"),
        kind=loaded.kind,
        train=TrainConfig(steps=steps, batch_size=4),
    )
    passes = recipe_from_dict({"passes": [{"pass": "seer_attention", "block": 16, **fields}]}).passes
    torch.manual_seed(0)
    return run(copy.deepcopy(loaded.model), passes, ctx)


def _cores(model):
    return {n.rpartition(".ec_attn")[0]: a.core for n, a in adapters(model)}


def _restores(model, records, loaded, batch, tmp_path):
    out = save(model, tmp_path / "out", {"report.json": {"passes": records}})
    back = restore(out)
    with torch.no_grad():
        want = loaded.call(model.eval(), batch)
        assert torch.isfinite(want).all()
        assert torch.equal(loaded.call(back.eval(), batch), want)


@pytest.fixture(scope="module")
def tiny_bert(tiny_bert_dir):
    return load_model(f"hf:{tiny_bert_dir}")


def test_pass_on_a_tiny_bert_with_padding(tiny_bert, tmp_path):
    batches = _text_batches()
    model, records = _run(tiny_bert, batches)
    cores = _cores(model)
    assert set(cores) == {f"encoder.layer.{i}.attention.self" for i in range(2)}
    assert all(
        isinstance(c, SeerAttentionCore) and not c.causal and c.gate.kv_heads == 4 for c in cores.values()
    )
    info = records[0]["info"]
    assert info["training"]["steps"] == 2 and info["training"]["final_loss"] >= 0
    for name, layer in info["seer"]["layers"].items():  # 97 tokens: 7 blocks of 16
        assert len(layer["heads"]) == 4 and 0.5 <= layer["density"] < 1.0, (name, layer)
    heat = info["seer"]["heatmap"]
    assert len(heat["gate"]) == len(heat["truth"]) == 7
    _restores(model, records, tiny_bert, batches[0], tmp_path)


def test_density_one_is_the_base_model(tiny_bert):
    batches = _text_batches(seed=1)
    model, _ = _run(tiny_bert, batches, density=1.0)
    with torch.no_grad():
        for b in batches:
            want, got = tiny_bert.call(tiny_bert.model, b), tiny_bert.call(model.eval(), b)
            assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_pass_on_a_tiny_llama_with_gqa_rope_and_causal_masks(tmp_path):
    folder = save_tiny_llama(tmp_path / "llama", vocab_size=100, hidden_size=32, intermediate_size=64)
    loaded = load_model(f"hf:{folder}")
    batches = _text_batches()
    model, records = _run(loaded, batches, density=0.3)
    cores = _cores(model)
    assert set(cores) == {f"model.layers.{i}.self_attn" for i in range(2)}
    rotary = model.model.rotary_emb.inv_freq
    for core in cores.values():
        assert core.causal and (core.gate.heads, core.gate.kv_heads, core.gate.head_dim) == (4, 2, 8)
        assert torch.equal(core.gate.inv_freq, rotary)
    captured = {}
    hook = cores["model.layers.1.self_attn"].register_forward_pre_hook(
        lambda m, a, kw: captured.update(kw=kw, a=a), with_kwargs=True
    )
    with torch.no_grad():
        loaded.call(model.eval(), batches[0])
    hook.remove()
    q, k = captured["a"][:2]
    assert captured["kw"]["positions"] is not None  # the decoder's position_ids reached the gate
    keep, allowed = cores["model.layers.1.self_attn"].choose(q, k, None, captured["kw"]["positions"])
    assert (
        not keep.triu(1).any()
        and keep.diagonal(dim1=-2, dim2=-1).all()
        and keep[:, :, -2:].sum() == 4 * 4 * 13
    )
    assert 0.3 <= records[0]["info"]["seer"]["density"] < 1.0
    _restores(model, records, loaded, batches[0], tmp_path)
    dense, _ = _run(loaded, batches, density=1.0)
    with torch.no_grad():
        want, got = loaded.call(loaded.model, batches[1]), loaded.call(dense.eval(), batches[1])
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_training_lowers_the_held_out_kl_on_minilm():
    """demo:minilm (pretrained: real attention patterns), 24 training texts, 8 steps at the paper's lr
    1e-3: the held-out KL on 8 test texts falls by more than a third (measured: 2.03 → 1.02)."""
    from edgecompress.data.specs import load_samples

    loaded = load_model("demo:minilm")
    sets = {
        "train": load_samples("text", loaded, "train", 24, 8),
        "eval": load_samples("text", loaded, "test", 8, 8),
    }
    ctx = make_context(
        [sets["eval"].batch(slice(0, 2))], loaded.call, torch.device("cpu"), kind="encoder",
        data=lambda s: sets[s], train=TrainConfig(steps=8, batch_size=8),
    )  # fmt: skip
    passes = recipe_from_dict({"passes": [{"pass": "seer_attention", "block": 16}]}).passes
    torch.manual_seed(0)
    _, records = run(loaded.model, passes, ctx)
    kl = records[0]["info"]["seer"]["kl_held_out"]
    assert kl["after"] < 0.67 * kl["before"], kl


def test_uniform_ptq_after_seer_quantizes_around_the_sparse_core(tiny_bert, tmp_path):
    batches = _text_batches(seed=2)
    ctx = make_context(
        batches, tiny_bert.call, torch.device("cpu"), kind="encoder", train=TrainConfig(steps=2, batch_size=4)
    )
    entries = [{"pass": "seer_attention", "block": 16}, {"pass": "uniform_ptq"}]
    torch.manual_seed(0)
    model, records = run(copy.deepcopy(tiny_bert.model), recipe_from_dict({"passes": entries}).passes, ctx)
    torch.manual_seed(0)
    float_seer, _ = run(copy.deepcopy(tiny_bert.model), recipe_from_dict({"passes": entries[:1]}).passes, ctx)
    for name, adapter in adapters(model):
        assert isinstance(adapter.core, SeerAttentionCore)
        for slot in ("q", "k", "v"):
            assert isinstance(adapter.get_submodule(slot)[0], UniformQuantizer), f"{name}.{slot}"
        assert len(adapter.probs) == 0
    assert any("probs: not quantized (SeerAttentionCore fuses the softmax)" in n for n in records[1]["notes"])
    with torch.no_grad():
        for b in batches:
            q, f = tiny_bert.call(model.eval(), b), tiny_bert.call(float_seer.eval(), b)
            cos = torch.nn.functional.cosine_similarity(q.flatten(1), f.flatten(1))
            assert cos.min() >= 0.99, cos
    _restores(model, records, tiny_bert, batches[0], tmp_path)


def _recipe(tmp_path, text: str) -> str:
    p = tmp_path / f"r{abs(hash(text))}.yaml"
    p.write_text(text)
    return str(p)


BAD = {
    "density 0": ("passes: [{pass: seer_attention, density: 0}]", "passes[0]: density must be in (0, 1] or null, got 0"),
    "density 1.5": ("passes: [{pass: seer_attention, density: 1.5}]", "density must be in (0, 1] or null, got 1.5"),
    "block 48": ("passes: [{pass: seer_attention, block: 48}]", "block must be one of (16, 32, 64, 128), got 48"),
    "rule": ("passes: [{pass: seer_attention, rule: cover}]", "rule must be one of ('topk', 'threshold'), got 'cover'"),
    "both rules": (
        "passes: [{pass: seer_attention, threshold: 0.002}]",
        "set exactly one of density and threshold (got density=0.5, threshold=0.002; density: null selects",
    ),
    "threshold 1": ("passes: [{pass: seer_attention, density: null, threshold: 1}]", "threshold must be in [0, 1)"),
    "form": ("passes: [{pass: seer_attention, form: cuda}]", "form must be one of ('auto', 'reference', 'gathered', 'tiled', 'cpp', 'flex', 'triton')"),
    "dropped": ("passes: [{pass: seer_attention, dropped: zero}]", "dropped must be one of ('skip', 'mean'), got 'zero'"),
    "unknown field": ("passes: [{pass: seer_attention, blocks: 64}]", "passes[0].blocks: unknown field of pass 'seer_attention'"),
    "quantize before": (
        "passes: [{pass: uniform_ptq}, {pass: seer_attention}]",
        "passes[1] 'seer_attention' cannot follow passes[0] 'uniform_ptq': the gates would train on quantized",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_seer_recipes_exit_2_with_one_line(case, tmp_path, capsys):
    text, message = BAD[case]
    out = tmp_path / "out"
    args = ["compress", "--model", "demo:vit-digits", "--recipe", _recipe(tmp_path, text), "--out", str(out)]
    code = main([*args, "--no-export"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("edgecompress: error:") and message in err[0], err
    assert not out.exists()
