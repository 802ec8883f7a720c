"""Per-group latency tables measured in ONNX Runtime on this CPU (the ``latency`` budget's costs).

For each distinct group shape, a small ONNX graph of the group at each kept width is built directly
(``onnx.helper``: the attention group as its q/k/v projection, per-head ``softmax(q kᵀ·s) v`` and
output projection; the MLP as its two or three projections and activation) and run in an ORT CPU
session with the project's session settings; the sessions of one shape are timed round-robin
(:func:`edgecompress.bench.timing.time_alternating`), so machine load drifts hit all widths alike.
The medians in milliseconds are the table. A removed branch costs 0. Grouped-query attention is
timed with its K/V heads repeated (as the runtime executes it); the input is ``batch`` samples of
the calibration data's token count (text: ``seq`` tokens).

Widths whose count exceeds ``points`` are measured at evenly spaced options and interpolated; the
measured points are listed in the report, since the runtime's speed need not be smooth in the
width (an unaligned width can be slower than a wider aligned one).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from edgecompress.bench.timing import time_alternating

OPSET = 20
ACTS = {"gelu": ("Gelu", {}), "gelu_tanh": ("Gelu", {"approximate": "tanh"}), "relu": ("Relu", {})}


@dataclass(frozen=True)
class Shape:
    kind: str  # "heads" | "mlp"
    d_in: int
    d_out: int
    col_width: int  # output-projection columns per unit (head_dim × queries per K/V head; 1)
    head_dim: int
    batch: int  # rows of one projection call's batch (images × windows)
    seq: int  # tokens per row
    gated: bool = False
    act: str = "gelu"


def _init(name: str, arr, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(arr).astype(dtype), name)


def _linear(nodes, inits, rng, x: str, d_in: int, d_out: int, name: str) -> str:
    inits += [
        _init(f"{name}_w", rng.standard_normal((d_in, d_out)) * 0.02),
        _init(f"{name}_b", np.zeros(d_out)),
    ]
    nodes += [
        _node("MatMul", [x, f"{name}_w"], [f"{name}_mm"]),
        _node("Add", [f"{name}_mm", f"{name}_b"], [name]),
    ]
    return name


def _node(op, inputs, outputs, **attrs):
    return helper.make_node(op, inputs, outputs, **attrs)


def _act(nodes, x: str, act: str, name: str) -> str:
    if act in ("silu", "quick_gelu"):
        nodes += [_node("Sigmoid", [x], [f"{name}_s"]), _node("Mul", [x, f"{name}_s"], [name])]
    else:
        op, attrs = ACTS.get(act, ACTS["gelu"])
        nodes.append(_node(op, [x], [name], **attrs))
    return name


def _mlp(nodes, inits, rng, s: Shape, k: int) -> str:
    h = _act(nodes, _linear(nodes, inits, rng, "x", s.d_in, k, "fc1"), s.act, "a")
    if s.gated:
        nodes.append(_node("Mul", [h, _linear(nodes, inits, rng, "x", s.d_in, k, "up")], ["h"]))
        h = "h"
    return _linear(nodes, inits, rng, h, k, s.d_out, "y")


def _ints(inits, name: str, values) -> str:
    inits.append(_init(name, values, np.int64))
    return name


def _heads(nodes, inits, rng, s: Shape, k: int) -> str:
    hd, rep = s.head_dim, s.col_width // s.head_dim
    q_w, kv_w = k * rep * hd, k * hd
    _linear(nodes, inits, rng, "x", s.d_in, q_w + 2 * kv_w, "qkv")
    nodes.append(_node("Split", ["qkv", _ints(inits, "split", [q_w, kv_w, kv_w])], ["q", "k", "v"], axis=-1))
    heads = {"q": k * rep, "k": k, "v": k}
    for t, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        shape = _ints(inits, f"{t}_shape", [s.batch, s.seq, heads[t], hd])
        nodes += [
            _node("Reshape", [t, shape], [f"{t}_r"]),
            _node("Transpose", [f"{t}_r"], [f"{t}_t"], perm=perm),
        ]
        if t != "q" and rep > 1:  # share each K/V head with its query heads
            nodes.append(_node("Tile", [f"{t}_t", _ints(inits, f"{t}_rep", [1, rep, 1, 1])], [f"{t}_x"]))
    kt, vt = ("k_x", "v_x") if rep > 1 else ("k_t", "v_t")
    inits.append(_init("scale", np.asarray(hd**-0.5)))
    nodes += [
        _node("MatMul", ["q_t", kt], ["s"]), _node("Mul", ["s", "scale"], ["s2"]),
        _node("Softmax", ["s2"], ["p"], axis=-1), _node("MatMul", ["p", vt], ["o"]),
        _node("Transpose", ["o"], ["o_t"], perm=[0, 2, 1, 3]),
        _node("Reshape", ["o_t", _ints(inits, "o_shape", [s.batch, s.seq, q_w])], ["o_r"]),
    ]  # fmt: skip
    return _linear(nodes, inits, rng, "o_r", q_w, s.d_out, "y")


def build(s: Shape, k: int):
    """The ONNX model of one group of shape ``s`` keeping ``k`` units (random weights)."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    out = (_heads if s.kind == "heads" else _mlp)(nodes, inits, rng, s, k)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [s.batch, s.seq, s.d_in])
    y = helper.make_tensor_value_info(out, TensorProto.FLOAT, [s.batch, s.seq, s.d_out])
    graph = helper.make_graph(nodes, f"{s.kind}_{k}", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def measure(shape: Shape, widths: list[int], threads: int | None, seconds: float) -> dict[int, float]:
    """Median ORT latency (ms) of ``shape`` at each width (0 → 0.0), timed round-robin."""
    import onnx

    from edgecompress.export.runtime import ort_session

    live = [k for k in widths if k > 0]
    x = np.random.default_rng(1).standard_normal((shape.batch, shape.seq, shape.d_in)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="ec-latency-") as tmp:
        sessions = []
        for k in live:
            path = Path(tmp) / f"w{k}.onnx"
            onnx.save(build(shape, k), str(path))
            sessions.append(ort_session(path, threads, spinning=False))
        fns = [lambda s=s: s.run(None, {"x": x}) for s in sessions]
        stats = time_alternating(fns, min_seconds=seconds, min_iters=3, warmup_s=min(0.5, seconds / 4))
    table = {k: float(st["median_ms"]) for k, st in zip(live, stats, strict=True)}
    return {k: table.get(k, 0.0) for k in widths}
