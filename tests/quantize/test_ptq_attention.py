"""``uniform_ptq``'s attention fields: a subset of the attention inputs (``attention_inputs``) and
symmetric q/k/v (``symmetric_attention``), the form OpenVINO needs to run q·kᵀ in INT8."""

from __future__ import annotations

import pytest
import torch

from edgecompress.calib import make_context
from edgecompress.errors import UserError
from edgecompress.export.deploy import export_verified
from edgecompress.models.attention import adapters
from edgecompress.models.loading import LoadedModel
from edgecompress.models.slots import QUANTIZER, SlotLinear
from edgecompress.pipeline import run
from edgecompress.quantize.ptq import UniformPTQ
from tests.conftest import tiny_timm


def _qk_model():
    loaded = tiny_timm()  # 16 patches + cls: 17 tokens
    batches = [torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    ctx = make_context(batches, loaded.call, torch.device("cpu"))
    passes = [UniformPTQ(symmetric_weights=True, attention_inputs=("q", "k"), symmetric_attention=True)]
    model, _ = run(loaded.model, passes, ctx)
    return loaded, model, batches


def test_attention_inputs_are_checked():
    with pytest.raises(UserError, match="attention_inputs"):
        UniformPTQ(attention_inputs=("q", "query"))
    with pytest.raises(UserError, match="attention_inputs"):
        UniformPTQ(attention_inputs=())


def test_qk_only_symmetric_quantizes_q_and_k_at_their_absmax():
    loaded, model, batches = _qk_model()
    seen: dict[str, float] = {}
    hooks = []
    for name, adapter in adapters(model):
        assert adapter.v.find(QUANTIZER) is None and adapter.probs.find(QUANTIZER) is None
        for slot in ("q", "k"):
            chain = getattr(adapter, slot)

            def grab(_m, args, key=f"{name}.{slot}"):
                seen[key] = max(seen.get(key, 0.0), float(args[0].abs().max()))

            hooks.append(chain.register_forward_pre_hook(grab))
    with torch.no_grad():
        for b in batches:
            loaded.call(model, b)
    for h in hooks:
        h.remove()
    assert len(seen) == 2 * 2  # q and k of 2 blocks
    for key, amax in seen.items():
        q = model.get_submodule(key).find(QUANTIZER)
        assert q.symmetric and float(q.zero_point.flatten()[0]) == 128.0
        # oracle: max|x| / 127 of the calibration data; 3 %: upstream Linear inputs are 8-bit
        # quantized here and were not when the statistics were taken
        assert float(q.scale.flatten()[0]) * 127 == pytest.approx(amax, rel=0.03)
    inputs = [m.input_chain.find(QUANTIZER) for m in model.modules() if isinstance(m, SlotLinear)]
    assert len(inputs) == 2 * 4 + 1 and not any(q.symmetric for q in inputs)  # keep their zero-point


def test_qk_only_export_verifies(tmp_path):
    loaded, model, _ = _qk_model()
    q = LoadedModel(
        model.eval(), loaded.spec, loaded.kind, loaded.base, loaded.data_cfg, loaded.tokenizer_dir
    )
    rec = export_verified(q, tmp_path / "qk.onnx", "onnx", batch=3, samples=12)
    assert rec["verification"]["passed"], rec["verification"]["failures"]
