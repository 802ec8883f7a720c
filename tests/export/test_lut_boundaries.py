"""The code tables of an exported model, run in ONNX Runtime, at every code boundary (issue 11, defect 5).

A model the rest of the suite does not use (timm DeiT-III: LayerScale, no distillation token),
AdaLog W4A4 as the shipped recipe calibrates it. Each code-table subgraph is cut out of the
exported file (from the tensor entering the quantizer to the one leaving it) and fed every float32
within 30,000 ulps of each code boundary. Oracle: the PyTorch quantizer module on the same floats,
exactly (a flipped code is a whole step: 5.7e-3 here). Before the exact-code forms (49298eb) ORT's
``Log`` put one of these floats into the neighbouring code of the softmax quantizer (measured on the
Xeon with ONNX Runtime 1.32: 1 of 900,015), so this test failed there; now none does.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch

from edgecompress.export.compare import _module_path
from edgecompress.export.onnx import export_onnx
from edgecompress.export.runtime import ort_session
from edgecompress.quantize.log_modules import AdaLogQuantizer
from tests.conftest import tiny_timm
from tests.export.models import compressed

ULPS = 30_000


def _around(points: torch.Tensor, n: int) -> torch.Tensor:
    """Every float32 within ``n`` ulps of each (positive) point."""
    keys = points.view(torch.int32).long()[:, None] + torch.arange(-n, n + 1)
    return keys.clamp(min=1).to(torch.int32).view(torch.float32).flatten()


def _code_table_graph(path, module: str, out):
    """The quantizer ``module``'s subgraph of the exported file, saved to ``out``; its input shape."""
    proto = onnx.load(str(path))
    nodes = [n for n in proto.graph.node if _module_path(n) == module]
    assert nodes and not any(n.op_type == "QuantizeLinear" for n in nodes)  # a code table, not Q/DQ
    onnx.utils.extract_model(str(path), str(out), [nodes[0].input[0]], [nodes[-1].output[0]])
    return [d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim]


def _ort(sub, shape: list[int], x: torch.Tensor) -> torch.Tensor:
    """The subgraph on ``x`` (a flat tensor), in chunks of its static input shape."""
    sess = ort_session(sub, 1, integer_kernels=False)
    n = int(np.prod(shape))
    chunks = torch.cat([x, x[: (-len(x)) % n]]).reshape(-1, *shape)
    name = sess.get_inputs()[0].name
    out = [torch.from_numpy(sess.run(None, {name: c.numpy()})[0]).flatten() for c in chunks]
    return torch.cat(out)[: len(x)]


def test_adalog_code_tables_give_pytorchs_codes_at_every_boundary_in_onnxruntime(tmp_path):
    loaded = tiny_timm("deit3_small_patch16_224", embed_dim=48, depth=1, num_heads=4)
    model = compressed(loaded, "adalog_w4a4", ("passes.0.search_rounds=1", "passes.0.max_tokens=256"))
    path = export_onnx(model, tmp_path / "deit3.onnx", batch=2).path
    quantizers = {n: m for n, m in model.model.named_modules() if isinstance(m, AdaLogQuantizer)}
    assert set(quantizers) == {"blocks.0.attn.ec_attn.probs.0", "blocks.0.mlp.fc2.input_chain.0"}
    for name, q in quantizers.items():
        shape = _code_table_graph(path, name, tmp_path / f"{name}.onnx")
        values = (q.scale.float() * q.code_table()).double().unique()  # the quantizer's output levels
        between = (values[:-1] * values[1:]).sqrt()  # log grid: the boundaries in u = x + shift
        x = _around(between[between > 0].float(), ULPS) - float(q.shift)
        with torch.no_grad():
            want = q(x)
        got = _ort(tmp_path / f"{name}.onnx", shape, x)
        flipped = (got - want).abs() > 1e-6 * float(values.abs().max())
        assert int(flipped.sum()) == 0, (name, x[flipped][:5].tolist())
