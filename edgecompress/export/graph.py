"""Rewrites of the exported ONNX graph (onnx helper API) and a summary of its Q/DQ content.

* :func:`dedicate_qdq` — one Q→DQ pair per consumer (ONNX Runtime and TensorRT need it);
* :func:`fold_scalar_mul_into_dq` — ``MatMul(DQ(q), …) · α`` → ``MatMul(DQ'(q), …)`` with the DQ
  scale multiplied by α (ONNX Runtime target only): the attention's ``q kᵀ · scale``, which ORT
  fuses into its float MatMul but cannot fuse after an integer one (measured −3 % latency on
  MiniLM W8A8; same values up to float rounding);
* :func:`qdq_summary` — counts of Q/DQ nodes, integer (INT8 / UINT8) weights and MatMuls fed by DQ.
"""

from __future__ import annotations

import numpy as np


def _copy_node(node, suffix: str, inputs: list[str]):
    import onnx

    new = onnx.helper.make_node(
        node.op_type, inputs, [f"{node.output[0]}_{suffix}"], name=f"{node.name}_{suffix}"
    )
    new.attribute.extend(node.attribute)
    return new


def _dedicate(nodes: list, op_type: str, consumers: dict) -> int:
    """Split every ``op_type`` node whose output has several users into one copy per user (in place)."""
    added, k = 0, 0
    while k < len(nodes):
        node = nodes[k]
        users = consumers.get(node.output[0], []) if node.op_type == op_type else []
        for j, user in enumerate(users[1:], start=1):
            copy = _copy_node(node, f"ded{j}", list(node.input))
            user.input[:] = [copy.output[0] if i == node.output[0] else i for i in user.input]
            nodes.insert(k + j, copy)
            added += 1
        k += 1 + max(0, len(users) - 1)
    return added


def dedicate_qdq(model) -> int:
    """Give every consumer of a shared Q→DQ pair its own pair; returns how many nodes were added.

    The exporter's common-subexpression pass merges identical Q/DQ pairs (e.g. the input
    quantizers of the q/k/v projections, which saw the same tensor). ONNX Runtime then leaves
    those MatMuls in float (it fuses a DQ→MatMul only when the Q and the DQ each have one user:
    measured 24 of 42 fused before, 42 of 42 after), and TensorRT's placement rules assume one
    pair per consumer as well. Sessions must then keep ORT's own CSE off
    (:data:`edgecompress.export.runtime.QDQ_DISABLED_OPTIMIZERS`).
    """
    nodes = list(model.graph.node)
    added = 0
    for op_type in ("DequantizeLinear", "QuantizeLinear"):
        consumers: dict[str, list] = {}
        for node in nodes:
            for i in node.input:
                consumers.setdefault(i, []).append(node)
        added += _dedicate(nodes, op_type, consumers)
    if added:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return added


def _initializers(model) -> dict:
    return {i.name: i for i in model.graph.initializer}


def qdq_summary(model) -> dict:
    """Counts of Q/DQ nodes, integer weight initializers behind DequantizeLinear, Q/DQ feeding MatMul/Gemm."""
    from onnx import TensorProto

    inits = _initializers(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    nodes = model.graph.node
    dq = [n for n in nodes if n.op_type == "DequantizeLinear"]
    integer = (TensorProto.INT8, TensorProto.UINT8)
    int_weights = [n.input[0] for n in dq if n.input[0] in inits and inits[n.input[0]].data_type in integer]
    mm = [n for n in nodes if n.op_type in ("MatMul", "Gemm")]
    fed = sum(
        all(i in producers and producers[i].op_type == "DequantizeLinear" for i in n.input[:2]) for n in mm
    )
    return {
        "QuantizeLinear": sum(n.op_type == "QuantizeLinear" for n in nodes),
        "DequantizeLinear": len(dq),
        "integer_weight_initializers": len(int_weights),
        "matmuls": len(mm),
        "matmuls_with_dq_inputs": fed,
    }


def _users(model) -> dict[str, list]:
    users: dict[str, list] = {}
    for node in model.graph.node:
        for i in node.input:
            users.setdefault(i, []).append(node)
    return users


def _scalar_init(inits: dict, name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    if name not in inits:
        return None
    value = numpy_helper.to_array(inits[name])
    return value if value.size == 1 else None


def _foldable(node, users: dict, producers: dict, inits: dict):
    """(Mul node, α, the DQ feeding input 0) when ``node`` is a MatMul followed only by ``· α``."""
    after = users.get(node.output[0], [])
    if node.op_type != "MatMul" or len(after) != 1 or after[0].op_type != "Mul":
        return None
    mul = after[0]
    other = mul.input[1] if mul.input[0] == node.output[0] else mul.input[0]
    alpha, dq = _scalar_init(inits, other), producers.get(node.input[0])
    if alpha is None or dq is None or dq.op_type != "DequantizeLinear" or len(users[dq.output[0]]) != 1:
        return None
    if _scalar_init(inits, dq.input[1]) is None:
        return None
    return mul, alpha, dq


def fold_scalar_mul_into_dq(model) -> int:
    """Fold ``MatMul(DequantizeLinear(x), w) · α`` (scalar α, per-tensor DQ used once) into the DQ scale."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    users, graph_outputs = _users(model), {o.name for o in model.graph.output}
    folded = 0
    for node in list(model.graph.node):
        found = _foldable(node, users, producers, inits)
        if found is None or found[0].output[0] in graph_outputs:
            continue
        mul, alpha, dq = found
        scale = numpy_helper.to_array(inits[dq.input[1]])
        name = f"{dq.input[1]}_times_{folded}"
        model.graph.initializer.append(
            numpy_helper.from_array((scale * alpha.reshape(scale.shape)).astype(scale.dtype), name)
        )
        dq.input[1] = name
        for user in users.get(mul.output[0], []):
            user.input[:] = [node.output[0] if i == mul.output[0] else i for i in user.input]
        model.graph.node.remove(mul)
        folded += 1
    return folded
