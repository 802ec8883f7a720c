"""uniform_ptq on several architectures, save → restore round trip (oracle: outputs right after compression, exact)."""

from __future__ import annotations

import json

import pytest
import torch

from edgecompress.calib import make_context
from edgecompress.errors import UserError
from edgecompress.models.loading import load_model, restore
from edgecompress.models.slots import SlotLinear
from edgecompress.pipeline import run
from edgecompress.quantize.modules import UniformQuantizer
from edgecompress.quantize.ptq import UniformPTQ
from edgecompress.structure import save
from tests.conftest import tiny_timm

# W8A8 on random-weight tiny models: the output SQNR floor we require against the float model.
W8A8_MIN_SQNR_DB = 20.0


def _sqnr(ref, out):
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))


def _compress_and_reload(loaded, batches, tmp_path, p=None):
    p = p or UniformPTQ()
    with torch.no_grad():
        ref = loaded.call(loaded.model, batches[0]).clone()
    ctx = make_context(batches, loaded.call, torch.device("cpu"))
    model, records = run(loaded.model, [p], ctx)
    with torch.no_grad():
        out = loaded.call(model, batches[0])
    save(model, tmp_path / "out", {"report.json": {"passes": records}})
    back = restore(tmp_path / "out")
    with torch.no_grad():
        again = loaded.call(back, batches[0])
    return ref, out, again, model, records


@pytest.mark.parametrize(
    "arch", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "swin_tiny_patch4_window7_224"]
)
def test_timm_w8a8_compress_and_reload(arch, tmp_path):
    loaded = tiny_timm(arch)
    torch.manual_seed(3)
    batches = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    ref, out, again, model, records = _compress_and_reload(loaded, batches, tmp_path)
    assert _sqnr(ref, out) >= W8A8_MIN_SQNR_DB
    assert torch.equal(out, again)
    quantizers = [m for m in model.modules() if isinstance(m, UniformQuantizer)]
    roles = {q.role for q in quantizers}
    assert {"weight", "linear_in", "attn_q", "attn_k", "attn_probs", "attn_v"} <= roles
    assert all(
        isinstance(m, SlotLinear) for n, m in model.named_modules() if n.endswith(("qkv", "fc1", "fc2"))
    )
    assert records[0]["layers"] and all("name" in r for r in records[0]["layers"])


def _text_batches(loaded):
    from edgecompress.data.specs import load_data

    return load_data("text", loaded, "train", samples=8, batch_size=4).batches


def test_hf_bert_w8a8_compress_and_reload(tiny_bert_dir, tmp_path):
    loaded = load_model(f"hf:{tiny_bert_dir}")
    ref, out, again, _, _ = _compress_and_reload(loaded, _text_batches(loaded), tmp_path)
    assert _sqnr(ref, out) >= W8A8_MIN_SQNR_DB
    assert torch.equal(out, again)


def test_hf_vit_w8a8_compress_and_reload(tiny_hf_vit_dir, tmp_path):
    loaded = load_model(f"hf:{tiny_hf_vit_dir}")
    torch.manual_seed(4)
    ref, out, again, _, _ = _compress_and_reload(loaded, [torch.randn(4, 3, 32, 32)], tmp_path)
    assert _sqnr(ref, out) >= W8A8_MIN_SQNR_DB
    assert torch.equal(out, again)


def test_hf_llama_w8a8_compress_and_reload(tiny_llama_dir, tmp_path):
    loaded = load_model(f"hf:{tiny_llama_dir}")
    assert loaded.kind == "causal_lm"
    ref, out, again, _, _ = _compress_and_reload(loaded, _text_batches(loaded), tmp_path)
    assert _sqnr(ref, out) >= W8A8_MIN_SQNR_DB
    assert torch.equal(out, again)


def test_lower_bits_lose_more(tmp_path):
    torch.manual_seed(5)
    batches = [torch.randn(4, 3, 32, 32)]
    sq = {}
    for bits in (8, 4):
        loaded = tiny_timm("vit_tiny_patch16_224")
        ref, out, *_ = _compress_and_reload(
            loaded, batches, tmp_path / str(bits), UniformPTQ(w_bits=bits, a_bits=bits)
        )
        sq[bits] = _sqnr(ref, out)
    assert sq[8] > sq[4] + 10  # ~6 dB per bit


def test_restore_rejects_corrupt_structure(tmp_path):
    loaded = tiny_timm()
    _compress_and_reload(loaded, [torch.randn(2, 3, 32, 32)], tmp_path)
    st = json.loads((tmp_path / "out" / "structure.json").read_text())
    st["ops"][1]["cls"] = "edgecompress.models.slots.NoSuchModule"
    (tmp_path / "out" / "structure.json").write_text(json.dumps(st))
    with pytest.raises(UserError, match="unknown module class 'edgecompress.models.slots.NoSuchModule'"):
        restore(tmp_path / "out")


def test_save_refuses_existing_folder_and_leaves_nothing(tmp_path):
    loaded = tiny_timm()
    (tmp_path / "exists").mkdir()
    with pytest.raises(UserError, match="already exists"):
        save(loaded.model, tmp_path / "exists", {})
    with pytest.raises(FileNotFoundError):
        save(loaded.model, tmp_path / "new", {"missing_dir/report.json": "x"})  # fails mid-write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_calibration_data_checks():
    call = lambda m, b: m(b)  # noqa: E731
    with pytest.raises(UserError, match="calibration data is empty"):
        make_context([], call, torch.device("cpu"))
    with pytest.raises(UserError, match="NaN"):
        make_context([torch.tensor([[float("nan")]])], call, torch.device("cpu"))
