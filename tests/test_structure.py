"""The structure log, save and restore (oracles: the model right after the change, exact; the
one-line refusals named in :mod:`edgecompress.structure`)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from edgecompress.calib import make_context
from edgecompress.errors import UserError
from edgecompress.models.loading import restore
from edgecompress.models.slots import SlotLinear
from edgecompress.pipeline import run
from edgecompress.quantize.ptq import UniformPTQ
from edgecompress.structure import resize_module, save, structure_of, unwrap
from tests.conftest import tiny_timm


def _compressed(tmp_path, name="out"):
    loaded = tiny_timm()
    torch.manual_seed(1)
    batches = [torch.randn(3, 3, 32, 32)]
    model, records = run(
        loaded.model, [UniformPTQ()], make_context(batches, loaded.call, torch.device("cpu"))
    )
    out = save(model, tmp_path / name, {"report.json": {"passes": records}})
    return loaded, model, batches[0], out


def _edit(folder, fn):
    st = json.loads((folder / "structure.json").read_text())
    fn(st)
    (folder / "structure.json").write_text(json.dumps(st))


def test_structure_records_format_passes_and_tensor_shapes(tmp_path):
    _, model, _, out = _compressed(tmp_path)
    st = json.loads((out / "structure.json").read_text())
    assert st["format"] == 2 and [p["pass"] for p in st["passes"]] == ["uniform_ptq"]
    assert st["passes"][0]["version"] == UniformPTQ.VERSION
    # an 8-bit weight is stored as its integer codes (one byte each) + the quantizer's scale/zero-point
    assert st["tensors"]["blocks.0.attn.qkv.weight_codes"] == {"shape": [144 * 48], "dtype": "uint8"}
    assert "blocks.0.attn.qkv.weight" not in st["tensors"]
    assert st["tensors"]["blocks.0.attn.qkv.weight_chain.0.scale"]["shape"] == [144, 1]
    assert all(op["module"].startswith("edgecompress.") for op in st["ops"])
    assert set(st["tensors"]) == set(model.state_dict())


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda st: st.update(format=1), "structure format 1"),
        (lambda st: st["passes"][0].update(version=99), "uniform_ptq version 99"),
        (lambda st: st["passes"][0].update({"pass": "nope"}), "pass 'nope'"),
        (lambda st: st["ops"][1].update(version=7), "saved at version 7"),
        (lambda st: st["ops"][1].update(cls="os.system"), "refusing to import 'os'"),
        (
            lambda st: st["ops"].append({"op": "teleport", "module": "edgecompress.structure"}),
            "unknown op 'teleport'",
        ),
        (lambda st: st["ops"][1].update(name="blocks.9.attn.qkv"), "no module 'blocks.9.attn.qkv'"),
        (lambda st: st["tensors"]["norm.weight"].update(shape=[3, 3]), "norm.weight has shape"),
        (lambda st: st.pop("base"), "missing or corrupt"),
    ],
    ids=[
        "format",
        "pass-version",
        "pass-name",
        "class-version",
        "untrusted",
        "op",
        "module",
        "shape",
        "base",
    ],
)
def test_restore_refuses_in_one_line(edit, message, tmp_path):
    _, _, _, out = _compressed(tmp_path)
    _edit(out, edit)
    with pytest.raises(UserError, match=message) as e:
        restore(out)
    assert "\n" not in str(e.value)


def test_restore_is_bit_identical_and_resaves_the_same_log(tmp_path):
    loaded, model, x, out = _compressed(tmp_path)
    back = restore(out)
    with torch.no_grad():
        assert torch.equal(loaded.call(model, x), loaded.call(back, x))
    again = save(back, tmp_path / "again", {})
    first, second = (json.loads((p / "structure.json").read_text()) for p in (out, again))
    assert first == second


def test_log_survives_wrapping():
    loaded = tiny_timm()
    structure_of(loaded.model)["ops"].append({"op": "marker"})
    compiled = torch.compile(loaded.model)  # a wrapper module; nothing is compiled until called
    assert unwrap(compiled) is loaded.model
    assert structure_of(compiled)["ops"][-1] == {"op": "marker"}
    assert structure_of(nn.DataParallel(loaded.model)) is structure_of(loaded.model)


def test_resize_op_replays_pruned_shapes(tmp_path):
    """Oracle: the unpruned model with the pruned MLP channels zeroed (equal outputs), and the
    restored model equal to the pruned one, bit for bit."""
    loaded = tiny_timm()
    x = torch.randn(2, 3, 32, 32)
    keep = [i for i in range(loaded.model.blocks[0].mlp.fc1.out_features) if i % 3]
    mlp = loaded.model.blocks[0].mlp
    zeroed = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    drop = torch.tensor([i for i in range(mlp.fc1.out_features) if i % 3 == 0])
    zeroed["blocks.0.mlp.fc2.weight"][:, drop] = 0
    ref_model = tiny_timm().model
    ref_model.load_state_dict(zeroed)
    resize_module(
        loaded.model,
        "blocks.0.mlp.fc1",
        {"weight": {0: keep}, "bias": {0: keep}},
        {"out_features": len(keep)},
    )
    resize_module(loaded.model, "blocks.0.mlp.fc2", {"weight": {1: keep}}, {"in_features": len(keep)})
    with torch.no_grad():
        out = loaded.model(x)
        torch.testing.assert_close(out, ref_model(x), rtol=1e-5, atol=1e-5)  # summation order only
    folder = save(loaded.model, tmp_path / "pruned", {})
    back = restore(folder)
    assert back.blocks[0].mlp.fc1.weight.shape == (len(keep), 48)
    with torch.no_grad():
        assert torch.equal(back(x), out)


def test_slot_linear_adopts_without_drawing_random_numbers():
    lin = nn.Linear(59, 97)
    state = torch.get_rng_state()
    slot = SlotLinear.adopt(lin)
    assert torch.equal(torch.get_rng_state(), state)  # replays do not move the global RNG
    assert slot.weight is lin.weight and slot.bias is lin.bias


def _tensor_bytes(path) -> int:
    """Bytes of the tensors in a safetensors file (its size less the 8-byte length and the header)."""
    raw = path.read_bytes()
    return len(raw) - 8 - int.from_bytes(raw[:8], "little")


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_quantized_weights_are_stored_at_their_bit_width(bits, tmp_path):
    """model.safetensors holds what the report's size counts: integer codes at the bit width
    (two per byte up to 4 bits) + scales/zero-points; plus one 4-byte SQNR per coded layer."""
    from edgecompress.quantize.modules import deployed_size_bytes

    loaded = tiny_timm()
    batches = [torch.randn(3, 3, 32, 32)]
    ctx = make_context(batches, loaded.call, torch.device("cpu"))
    model, records = run(loaded.model, [UniformPTQ(w_bits=bits, a_bits=8)], ctx)
    out = save(model, tmp_path / "q", {})
    coded = [n for n, m in model.named_modules() if isinstance(m, SlotLinear) and m.weight_quantizer()]
    width = 8 if bits > 4 else 4  # 3-bit codes take a nibble
    saved = _tensor_bytes(out / "model.safetensors")
    layers = [model.get_submodule(n) for n in coded]
    assert all(m.weight.numel() % 2 == 0 for m in layers)
    expected = deployed_size_bytes(model) + 4 * len(coded)
    expected -= sum(m.weight.numel() * (bits - width) // 8 for m in layers)  # report: 3 bits; file: 4
    assert saved == expected
    back = restore(out)
    with torch.no_grad():
        assert torch.equal(loaded.call(model, batches[0]), loaded.call(back, batches[0]))
    first = model.get_submodule(coded[0]).describe()["weight_sqnr_db"]
    assert back.get_submodule(coded[0]).describe()["weight_sqnr_db"] == first  # the saved figure


@pytest.mark.parametrize("w_bits", [None, 8])
def test_nm_weights_are_stored_at_the_size_the_report_counts(w_bits, tmp_path):
    """2:4 (and 2:4 + INT8): the file's tensor bytes equal the reported size (N:M masks are rebuilt
    from the stored positions, not stored), plus one 4-byte SQNR per coded layer."""
    from edgecompress.quantize.modules import deployed_size_bytes
    from edgecompress.recipe import recipe_from_dict

    loaded = tiny_timm()
    batches = [torch.randn(3, 3, 32, 32)]
    entries = [{"pass": "nm_oneshot"}] + ([{"pass": "uniform_ptq", "w_bits": w_bits}] if w_bits else [])
    passes = recipe_from_dict({"passes": entries}).passes
    model, _ = run(loaded.model, passes, make_context(batches, loaded.call, torch.device("cpu")))
    out = save(model, tmp_path / "nm", {})
    coded = (
        [m for m in model.modules() if isinstance(m, SlotLinear) and m.weight_quantizer()] if w_bits else []
    )
    assert _tensor_bytes(out / "model.safetensors") == deployed_size_bytes(model) + 4 * len(coded)
    back = restore(out)
    with torch.no_grad():
        assert torch.equal(loaded.call(model, batches[0]), loaded.call(back, batches[0]))
