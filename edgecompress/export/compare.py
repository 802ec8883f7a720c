"""Layer-by-layer comparison of an exported ONNX graph against the PyTorch model it came from.

``edgecompress export --debug-compare`` and the tests call :func:`compare_layers`: every activation
quantizer of the PyTorch model — Q/DQ pairs (with the ``Clip`` below 8 bits) and code-table forms
(log2, AdaLog, TanQ) alike — is found in the graph through the module scopes the exporter tagged
its nodes with (the dynamo exporter's ``pkg.torch.onnx.name_scopes``, :func:`quantizer_inputs`);
the tensor *entering* it is captured on both sides for the same inputs (a forward pre-hook in
PyTorch, that tensor made a graph output in ONNX Runtime) and compared:

* ``rel_err`` — ``‖ort − torch‖ / ‖torch‖`` of the float input, each runtime on its own values end
  to end (what users see: a float-rounding difference flips a code, the one-step error compounds
  at every later quantizer, so in a deep low-bit model this grows to the quantization noise);
* ``segment_rel_err`` — the same with PyTorch fed ORT's value at every quantizer input, so a row
  measures only the ops since the previous quantizers (float32 rounding: ~1e-7; a different
  function: far above :data:`DEPART_REL_ERR`);
* ``code_flips`` — the fraction of elements whose quantized code differs end to end (the
  quantizer's own scale/zero-point applied to both).

Rows come in graph order; the **first departure** is the first row whose ``segment_rel_err``
exceeds :data:`DEPART_REL_ERR`: that segment computes something else in the exported graph.
Measured on MiniLM W8A8 (16 texts): every segment ≤ 4.2e-7 while ``rel_err`` grows from 7e-8 to
0.1 over six layers.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import torch

from edgecompress.export.inputs import as_batch
from edgecompress.models.loading import LoadedModel

DEPART_REL_ERR = 1e-3
SCOPE_KEY = "pkg.torch.onnx.name_scopes"


def _module_path(node) -> str | None:
    """The innermost ``model.…`` module scope the dynamo exporter tagged ``node`` with (without ``model.``)."""
    scopes = next((p.value for p in node.metadata_props if p.key == SCOPE_KEY), None)
    if not scopes:
        return None
    try:  # module scopes, outermost first, then the op's own name
        paths = [s for s in ast.literal_eval(scopes) if s.startswith("model.")]
    except (ValueError, SyntaxError):
        return None
    return paths[-1][len("model.") :] if paths else None


def quantizer_inputs(model_proto, is_quantizer) -> list[tuple[str, str]]:
    """``(module path, tensor name)`` of the tensor *entering* each quantizer's subgraph, in graph
    order: the data input of the first node scoped to a module for which ``is_quantizer(path)``.

    That is the ``QuantizeLinear`` input for an 8-bit uniform quantizer, the ``Clip`` before it
    below 8 bits (so both sides compare the unclipped value), and the first op of a code table
    (log / AdaLog / TanQ forms, :mod:`edgecompress.export.forms.lut`), so every quantizer, not only
    the Q/DQ ones, bounds a segment. Copies made by :func:`~edgecompress.export.graph.dedicate_qdq`
    carry no scope and are skipped."""
    consts = {i.name for i in model_proto.graph.initializer}
    consts |= {o for n in model_proto.graph.node if n.op_type == "Constant" for o in n.output}
    out, seen = [], set()
    for node in model_proto.graph.node:
        path = _module_path(node)
        if path is None or path in seen or not node.input or node.input[0] in consts:
            continue
        if is_quantizer(path):
            seen.add(path)
            out.append((path, node.input[0]))
    return out


def _with_outputs(model_proto, names: list[str], path: Path) -> None:
    """Save a copy of the graph in which ``names`` are also graph outputs."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model_proto)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
            have.add(n)
    onnx.save(m, str(path))


def _flips(a: torch.Tensor, b: torch.Tensor, q) -> float | None:
    """Fraction of elements whose code under quantizer ``q`` differs between ``a`` and ``b``."""
    from edgecompress.export.forms import export_module
    from edgecompress.export.forms.lut import LUTQuantizer
    from edgecompress.quantize.uniform import quantize_uniform

    if hasattr(q, "zero_point") and hasattr(q, "bits") and q.scale.numel() == 1:
        s, z = q.scale.to(a.dtype), q.zero_point.to(a.dtype)
        return float((quantize_uniform(a, s, z, q.bits) != quantize_uniform(b, s, z, q.bits)).float().mean())
    form = export_module(q)
    if isinstance(form, LUTQuantizer):
        return float((form.codes(a) != form.codes(b)).float().mean())
    return None  # per-channel / per-head scales: the flat rows lost the axis


def _ort_run(proto, nodes, batches, threads) -> dict[str, list[np.ndarray]]:
    import tempfile

    from edgecompress.export.runtime import ort_session

    vals: dict[str, list[np.ndarray]] = {t: [] for _, t in nodes}
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.onnx"
        _with_outputs(proto, [t for _, t in nodes], probe)
        sess = ort_session(probe, threads, integer_kernels=False)
        in_names = [i.name for i in sess.get_inputs()]
        out_names = [o.name for o in sess.get_outputs()]
        for tensors in batches:
            got = dict(zip(out_names, sess.run(None, {n: t.numpy() for n, t in zip(in_names, tensors)})))
            for t in vals:
                vals[t].append(np.asarray(got[t]))
    return vals


def _torch_run(loaded, modules, nodes, batches, forced: dict | None) -> dict[str, list[torch.Tensor]]:
    """Each mapped quantizer's input per batch. With ``forced`` (ORT's values) every quantizer then
    gets ORT's input instead of its own, so each row measures one segment of the graph alone; an
    unmapped quantizer reading the same tensor as a mapped one (q/k/v input quantizers with equal
    parameters, which the exporter merges into one node) is forced to the same value."""
    captured: dict[str, list[torch.Tensor]] = {p: [] for p, _ in nodes}
    mapped = {p: t for p, t in nodes}
    state: dict = {"batch": 0, "seen": {}}

    def hook(_m, args, p):
        x = args[0]
        if p in mapped:
            captured[p].append(x.detach().float())
            if forced is None:
                return None
            new = torch.from_numpy(forced[mapped[p]][state["batch"]]).to(x.dtype)
            state["seen"][id(x)] = (x, new)
            return (new, *args[1:])
        if forced is not None and id(x) in state["seen"] and state["seen"][id(x)][0] is x:
            return (state["seen"][id(x)][1], *args[1:])
        return None

    quantizers = [n for n, m in modules.items() if getattr(m, "SLOT_KIND", None) == "quantizer"]
    hooks = [modules[p].register_forward_pre_hook(lambda m, a, p=p: hook(m, a, p)) for p in quantizers]
    loaded.model.eval()
    try:
        with torch.no_grad():
            for i, tensors in enumerate(batches):
                state["batch"], state["seen"] = i, {}
                loaded.call(loaded.model, as_batch(loaded, tensors))
    finally:
        for h in hooks:
            h.remove()
    return captured


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((b - a).norm() / a.norm().clamp_min(1e-30))


def compare_layers(loaded: LoadedModel, onnx_path: str | Path, batches, threads: int | None = None) -> dict:
    """Run ``batches`` (tuples of input tensors, as :func:`~edgecompress.export.inputs.sample_batches`
    returns) through both; one row per quantizer in graph order, and the first departure.

    Two comparisons per row: *free-running* (each runtime on its own values end to end: the error
    users see, where rounding differences cascade through later quantizers) and *segment*
    (PyTorch fed ORT's value at every quantizer input, so a row measures only the ops between the
    previous quantizers and this one). A segment error far above float rounding is a real
    difference of function; the first such row is the **first departure**.

    ORT runs at its basic optimization level, where Q/DQ pairs stay float ops: the graph's own
    function, so a departure is the export's. (Its integer kernels fuse ``DQ → MatMul → Q``; a
    fused node's intermediate made a graph output is not the value the fused kernel used, so
    they cannot be compared this way.)
    """
    import onnx

    proto = onnx.load(str(onnx_path))
    modules = dict(loaded.model.named_modules())
    nodes = quantizer_inputs(proto, lambda p: getattr(modules.get(p), "SLOT_KIND", None) == "quantizer")
    ort = _ort_run(proto, nodes, batches, threads)
    free = _torch_run(loaded, modules, nodes, batches, None)
    forced = _torch_run(loaded, modules, nodes, batches, ort)
    rows = []
    for p, t in nodes:
        if len(free[p]) != len(batches):  # called more than once per forward: ambiguous, skipped
            continue
        b = torch.cat([torch.from_numpy(x).float().reshape(-1) for x in ort[t]])
        a = torch.cat([x.reshape(-1) for x in free[p]])
        f = torch.cat([x.reshape(-1) for x in forced[p]])
        if a.numel() != b.numel():
            continue
        flips = _flips(a, b, modules[p])
        rows.append({
            "module": p, "onnx_tensor": t, "rel_err": _rel(a, b), "segment_rel_err": _rel(f, b),
            "max_abs": float((b - a).abs().max()), "code_flips": flips,
        })  # fmt: skip
    first = next((r for r in rows if r["segment_rel_err"] > DEPART_REL_ERR), None)
    return {
        "onnx": str(onnx_path),
        "reference": "PyTorch eager (the model that was exported)",
        "ort": "float Q/DQ (ORT_ENABLE_BASIC)",
        "depart_rel_err": DEPART_REL_ERR,
        "compared": len(rows),
        "first_departure": first,
        "layers": rows,
    }


def format_table(result: dict, limit: int = 200) -> str:
    lines = [f"{'module (input of its quantizer)':<60} {'rel err':>9} {'segment':>9} {'code flips':>10}"]
    for r in result["layers"][:limit]:
        mark = "  <- first departure" if r is result["first_departure"] else ""
        flips = "—" if r["code_flips"] is None else f"{100 * r['code_flips']:.3f}%"
        lines.append(f"{r['module']:<60} {r['rel_err']:>9.2e} {r['segment_rel_err']:>9.2e} {flips:>10}{mark}")
    return "\n".join(lines)


def write_compare(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(result, indent=1))
    return path
