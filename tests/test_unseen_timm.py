"""PTQ on timm attention forms the rest of the suite does not use (EVA02: RoPE, SwiGLU, q/v biases
in ``F.linear``; BEiT: relative position bias): every layer the report calls quantized really runs
with its quantizer, and the export verifies (oracles: forward hooks; the export gates of
:mod:`edgecompress.export.verify`)."""

from __future__ import annotations

import copy

import pytest
import torch

from edgecompress.models.attention import adapters
from edgecompress.models.loading import LoadedModel
from edgecompress.models.slots import SlotLinear, called
from tests.conftest import tiny_timm
from tests.models.test_attention import SMALL
from tests.test_composition import _batches, _pass, _works


@pytest.mark.parametrize("arch", ["eva02_tiny_patch14_224", "beit_base_patch16_224"])
def test_every_quantized_layer_runs_and_exports(arch, tmp_path):
    from edgecompress.calib import make_context
    from edgecompress.pipeline import run

    loaded = tiny_timm(arch, **SMALL)
    model = copy.deepcopy(loaded.model)
    batches = _batches(loaded)
    ctx = make_context(batches, loaded.call, torch.device("cpu"), kind="image")
    model, records = run(model, [_pass("uniform_ptq")], ctx)
    quantized = [n for n, m in model.named_modules() if isinstance(m, SlotLinear) and m.weight_quantizer()]
    assert {f"blocks.{i}.attn.qkv" for i in range(SMALL["depth"])} <= set(quantized)
    assert called(model, quantized, lambda m: loaded.call(m, batches[0])) == set(quantized)
    assert not [n for n in records[0]["notes"] if "not quantized" in n]
    # the four attention slots of every block carry a quantizer
    for _, adapter in adapters(model):
        assert all(len(getattr(adapter, s)) == 1 for s in ("q", "k", "v", "probs"))
    reported = {r["name"] for r in records[0]["layers"] if r.get("w_bits")}
    assert reported == set(quantized)
    _works(
        LoadedModel(loaded.model, loaded.spec, loaded.kind, loaded.base, loaded.data_cfg),
        [_pass("uniform_ptq")],
        tmp_path,
    )
