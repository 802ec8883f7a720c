"""INT8 export fidelity: padding-aware observers, exact quantized products, embedding quantization,
the layer-by-layer comparison, verification data and the deployable latency row of ``compress``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from edgecompress.calib import make_context, observe, real_tokens
from edgecompress.cli import main
from edgecompress.export.compare import compare_layers
from edgecompress.export.deploy import export_verified, saved_eval_data
from edgecompress.export.inputs import sample_batches
from edgecompress.export.onnx import export_onnx
from edgecompress.models.embedding import SlotEmbedding
from edgecompress.models.loading import load_model
from edgecompress.models.slots import SlotLinear
from edgecompress.pipeline import run
from edgecompress.quantize.modules import UniformQuantizer
from edgecompress.quantize.ptq import UniformPTQ
from edgecompress.quantize.uniform import fake_quant_uniform, weight_params
from edgecompress.structure import save

pytest.importorskip("onnxruntime")


def _bert(tiny_bert_dir):
    return load_model(f"hf:{tiny_bert_dir}")


def _text_ctx(loaded, n=16):
    from edgecompress.data.specs import load_data

    got = load_data("text", loaded, "train", n, 8)
    return make_context(got.batches, loaded.call, torch.device("cpu"), kind=loaded.kind)


@pytest.fixture(scope="module")
def bert_w8a8(tiny_bert_dir):
    loaded = _bert(tiny_bert_dir)
    loaded.model, records = run(loaded.model, [UniformPTQ(embedding_bits=8)], _text_ctx(loaded))
    return loaded, records


# ---- padding-aware statistics ------------------------------------------------------------------


def test_real_tokens_drops_padding_rows_and_columns():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    tok = torch.arange(2 * 3 * 4.0).reshape(2, 3, 4)
    assert torch.equal(real_tokens(tok, mask), torch.cat([tok[0, :2].flatten(), tok[1, :1].flatten()]))
    probs = torch.rand(2, 2, 3, 3)  # [b, H, N, N]: real query rows × real key columns
    want = torch.cat([probs[0, :, :2, :2].flatten(), probs[1, :, :1, :1].flatten()])
    assert torch.equal(real_tokens(probs, mask), want)
    heads = torch.rand(2, 2, 3, 5)  # [b, H, N, D]
    assert real_tokens(heads, mask).numel() == (2 + 1) * 2 * 5
    assert torch.equal(real_tokens(tok, None), tok.flatten())


class _PadSpike(nn.Module):
    """Token embeddings, with the padding positions' activations at ±1000."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 4)
        self.fc = nn.Linear(4, 4)

    def forward(self, input_ids, attention_mask):
        x = self.emb(input_ids)
        x = torch.where(attention_mask.bool().unsqueeze(-1), x, torch.full_like(x, 1000.0))
        return self.fc(x)


def test_observe_ignores_padding_tokens():
    torch.manual_seed(0)
    model = _PadSpike().eval()
    ids = torch.randint(0, 50, (3, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    stats = observe(model, ["fc"], lambda m: m(input_ids=ids, attention_mask=mask))["fc"]
    real = model.emb(ids).detach()[mask.bool()]
    assert stats.hi == pytest.approx(float(real.max()), abs=1e-6)  # not 1000
    assert stats.lo == pytest.approx(float(real.min()), abs=1e-6)
    assert stats.count == real.numel()


# ---- the PyTorch simulation computes what integer kernels compute ------------------------------


def test_fake_quant_without_gradient_is_the_dequantized_value():
    x = torch.randn(1000) * 3
    s, z = torch.tensor(0.05), torch.tensor(128.0)
    xq = (torch.clamp(torch.round(x / s) + z, 0, 255) - z) * s
    with torch.no_grad():
        assert torch.equal(fake_quant_uniform(x, s, z, 8), xq)  # exactly, not x + (xq - x)
    xg = x.clone().requires_grad_()
    fake_quant_uniform(xg, s, z, 8).sum().backward()
    assert torch.equal(xg.grad, torch.ones_like(x))  # straight-through


def test_quantized_linear_product_is_exact():
    torch.manual_seed(0)
    lin = SlotLinear.adopt(nn.Linear(1536, 64))
    wq = UniformQuantizer(8, False, "channel", "weight")
    wq.set_params(*weight_params(lin.weight.detach(), 8))
    aq = UniformQuantizer(8, False, "tensor", "linear_in").set_params(torch.tensor(0.02), torch.tensor(128.0))
    lin.weight_chain.append(wq)
    lin.input_chain.append(aq)
    x = torch.randn(32, 1536)
    with torch.no_grad():
        y = lin(x)
        exact = (aq(x).double() @ wq(lin.weight).double().t()).float() + lin.bias  # the integer kernel's sum
    assert torch.equal(y, exact)


# ---- embedding quantization ---------------------------------------------------------------------


def test_embedding_tables_quantized_per_row(bert_w8a8):
    loaded, records = bert_w8a8
    embs = {n: m for n, m in loaded.model.named_modules() if isinstance(m, SlotEmbedding)}
    assert set(embs) == {f"embeddings.{k}_embeddings" for k in ("word", "position", "token_type")}
    emb = embs["embeddings.word_embeddings"]
    q = emb.weight_quantizer()
    assert q.bits == 8 and q.scale.shape == (emb.num_embeddings, 1)
    ids = torch.randint(0, emb.num_embeddings, (4, 9))
    with torch.no_grad():
        assert torch.equal(emb(ids), q(emb.weight)[ids])  # row-wise = quantizing the whole table


def test_embedding_codes_on_disk_restore_bit_identically(bert_w8a8, tmp_path):
    from safetensors import safe_open

    loaded, _ = bert_w8a8
    out = save(loaded.model, tmp_path / "run", {})
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        codes = f.get_tensor("embeddings.word_embeddings.weight_codes")
        assert codes.dtype == torch.uint8 and "embeddings.word_embeddings.weight" not in f.keys()
    back = load_model(str(out))
    batch = {"input_ids": torch.randint(0, 1000, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    with torch.no_grad():
        assert torch.equal(loaded.call(loaded.model, batch), back.call(back.model, batch))


def test_tied_embedding_is_left_float(tmp_path):
    import shutil

    from edgecompress.job import TOKENIZER_FILES
    from tests.conftest import minilm_tokenizer_dir, save_tiny_llama

    src = minilm_tokenizer_dir()
    if src is None:
        pytest.skip("needs the MiniLM tokenizer files")
    folder = save_tiny_llama(tmp_path / "llama", tie_word_embeddings=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, folder / name)
    loaded = load_model(f"hf:{folder}")
    ctx = _text_ctx(loaded, 8)
    loaded.model, records = run(loaded.model, [UniformPTQ(embedding_bits=8)], ctx)
    assert not any(isinstance(m, SlotEmbedding) for m in loaded.model.modules())
    assert any("embed_tokens: not quantized (weight tied to lm_head)" in n for n in records[0]["notes"])


def test_embedding_bits_is_checked():
    with pytest.raises(ValueError, match="embedding_bits"):
        UniformPTQ(embedding_bits=12)


# ---- export: the graph computes the same function, segment by segment ---------------------------


def test_export_with_int8_embeddings_verifies(bert_w8a8, tmp_path):
    import onnx

    loaded, _ = bert_w8a8
    rec = export_verified(loaded, tmp_path / "m.onnx", batch=8, samples=32)
    assert rec["verification"]["passed"], rec["verification"]["failures"]
    m = onnx.load(str(tmp_path / "m.onnx"))
    int8_tables = [i for i in m.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2
                   and i.dims[0] == loaded.model.config.vocab_size]  # fmt: skip
    gathered = {n.input[0] for n in m.graph.node if n.op_type == "Gather"}
    assert int8_tables and all(t.name in gathered for t in int8_tables)


def _scoped_dq_scale(model, scope: str):
    """The scale initializer of the weight DequantizeLinear exported for module ``scope``."""
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        if node.op_type == "DequantizeLinear" and f"'model.{scope}'" in meta.get("pkg.torch.onnx.name_scopes", ""):
            if node.input[0] in inits and node.input[1] in inits:
                return inits[node.input[1]]
    raise AssertionError(f"no weight DequantizeLinear for {scope}")


def test_compare_finds_no_departure_then_the_tampered_layer(bert_w8a8, tmp_path):
    import onnx
    from onnx import numpy_helper

    loaded, _ = bert_w8a8
    path = tmp_path / "m.onnx"
    export_onnx(loaded, path, batch=4)
    batches, _ = sample_batches(loaded, 8, 4)
    clean = compare_layers(loaded, path, batches)
    assert clean["first_departure"] is None and clean["compared"] >= 10
    assert max(r["segment_rel_err"] for r in clean["layers"]) < 1e-5  # float rounding only
    model = onnx.load(str(path))
    init = _scoped_dq_scale(model, "encoder.layer.0.intermediate.dense")
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.3), init.name))
    onnx.save(model, str(path))
    bad = compare_layers(loaded, path, batches)
    assert bad["first_departure"]["module"] == "encoder.layer.0.output.dense.input_chain.0"
    rows = {r["module"]: r for r in bad["layers"]}
    assert rows["encoder.layer.0.intermediate.dense.input_chain.0"]["segment_rel_err"] < 1e-5  # upstream agrees


# ---- verification data and the deployable latency of compress ----------------------------------


def test_export_verifies_on_the_folders_eval_data(tmp_path, capsys):
    text = tmp_path / "texts.txt"
    lines = [f"Observation {i}: the sample was heated to {300 + 7 * i} kelvin and its resistance fell." for i in range(24)]
    text.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    args = ["--model", "demo:vit-digits", "--out", str(out), "--no-export", "--set", "calibration.samples=16"]
    assert main(["compress", *args, "--eval", "digits"]) == 0
    assert saved_eval_data(str(out)) == "digits"
    assert main(["export", str(out), "--samples", "16"]) == 0
    v = json.loads((out / "model.verification.json").read_text())["verification"]
    assert v["data"] == "digits" and "recipe.yaml" in v["data_source"]
    assert saved_eval_data(str(tmp_path)) is None


def test_compress_times_the_int8_onnx_against_fp32(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        "edgecompress.job.LATENCY_TIMING", {"min_seconds": 0.1, "min_iters": 2, "warmup_s": 0.05, "max_seconds": 5.0}
    )
    out = tmp_path / "run"
    args = ["--model", "demo:vit-digits", "--out", str(out), "--set", "calibration.samples=16", "--set", "eval.samples=64"]
    assert main(["compress", *args]) == 0
    table = capsys.readouterr().out
    r = json.loads((out / "report.json").read_text())
    assert (out / "model.onnx").is_file() and r["deploy"]["export"]["verification"]["passed"]
    b = r["deploy"]["bench"]
    med = {x["target"]: x["latency"]["median_ms"] for x in b["results"]}
    assert b["speedup"] == pytest.approx(med["baseline"] / med["compressed"], rel=1e-2)
    word = "faster" if b["speedup"] >= 1 else "slower: not faster than the float model"
    assert "latency onnxruntime b8 (ms, median)" in table and word in table
    assert "PyTorch simulation b" in table and "latency CPU" not in table
    assert r["deploy_sections"]["implicit"] is True
