"""ONNX Runtime sessions (the one guard around onnxruntime) and what ORT did with our Q/DQ graph.

Sessions for graphs with Q/DQ disable three of ORT's fusions (:data:`QDQ_DISABLED_OPTIMIZERS`,
recorded next to every number so users can reproduce it with
``InferenceSession(..., disabled_optimizers=[...])``), each measured on this CPU:

* ``MatMulAddFusion`` rewrites ``MatMul + Add(bias)`` with a static input shape into
  ``Reshape → Gemm → Reshape`` *before* the QDQ fusions run, which strands the
  ``DequantizeLinear`` nodes and leaves the layer in float (2.4× slower on a 384×1536 layer);
* ``CommonSubexpressionElimination`` merges the Q→DQ pairs we give each consumer (see
  :func:`edgecompress.export.graph.dedicate_qdq`) back into shared ones, which ORT then does
  not fuse (24 of 42 MatMuls left in float on MiniLM);
* ``BiasGeluFusion``: its ``BiasGelu`` kernel is slower here than ``Add`` + the opset-20 ``Gelu``
  it replaces (−4 % MiniLM, −5 % DeiT-S end to end at batch 8, 2 threads).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

from edgecompress.errors import UserError

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
QDQ_DISABLED_OPTIMIZERS = ("MatMulAddFusion", "CommonSubexpressionElimination", "BiasGeluFusion")
INTEGER_KERNELS = ("QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger", "QGemm", "DynamicQuantizeMatMul")


def onnxruntime():
    """Import onnxruntime or say in one line how to get it."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("onnxruntime is not installed: pip install onnxruntime") from None
    return ort


def u8s8_saturates(flags: list[str] | None = None, machine: str | None = None) -> bool:
    """Whether ONNX Runtime's u8×s8 integer kernels can saturate on this CPU.

    x86-64 without VNNI runs them with ``VPMADDUBSW``, which adds pairs of u8×s8 products in int16:
    with full-range 8-bit weights a pair reaches 2·255·127 > 32767 and is clipped, so the layer's
    output is wrong (ORT's and OpenVINO's documentation describe it; measured here on an AVX2-only
    AMD EPYC: cosine 0.98 instead of 1.0 on a W8A8 ViT). VNNI (``VPDPBUSD``) and AMX accumulate in
    int32. ARM's dot-product kernels accumulate in int32 too.
    """
    from edgecompress.bench.env import cpu_info

    if flags is None or machine is None:
        info = cpu_info()
        flags, machine = info["flags"], info["machine"]
    x86 = machine.lower() in ("x86_64", "amd64", "i386", "i686")
    return x86 and not any(f in flags for f in VNNI_FLAGS)


def resolve_weight_dtype(requested: str, target: str) -> tuple[str, str]:
    """``(dtype, why)`` of the exported weight codes for ``requested`` in ``auto | int8 | uint8``.

    TensorRT needs INT8. For ONNX Runtime, ``auto`` takes INT8 (u8×s8 kernels, the fastest with
    VNNI) unless this CPU's u8×s8 kernels saturate (:func:`u8s8_saturates`); then UINT8, whose
    u8×u8 kernels are exact on every CPU. A file is verified on the machine that exports it; an
    INT8-weight file moved to an x86 CPU without VNNI computes wrong outputs there in ORT, so
    export with ``uint8`` for such targets.
    """
    if requested not in ("auto", "int8", "uint8"):
        raise UserError(f"weight dtype {requested!r}: choose auto, int8 or uint8")
    if target == "tensorrt":
        if requested == "uint8":
            raise UserError("TensorRT needs INT8 weights (weight dtype uint8 is for ONNX Runtime)")
        return "int8", "TensorRT takes signed INT8 weights with zero-point 0"
    if requested != "auto":
        return requested, "asked for"
    if u8s8_saturates():
        return "uint8", "this CPU has no VNNI: ONNX Runtime's u8×s8 kernels would saturate (u8×u8 are exact)"
    return "int8", "this CPU has VNNI: u8×s8 kernels are exact and fastest"


def has_qdq(path: str | Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def session_config(
    path: str | Path,
    threads: int | None = None,
    ort_defaults: bool = False,
    spinning: bool = True,
    integer_kernels: bool = True,
) -> dict:
    """The session settings we use for ``path`` (recorded next to every number).

    ``ort_defaults=True``: ORT's own defaults (no optimizer disabled), e.g. for models from
    ``onnxruntime.quantization``, which are meant to run that way.
    """
    return {
        "providers": ["CPUExecutionProvider"],
        "graph_optimization_level": "ORT_ENABLE_ALL" if integer_kernels else "ORT_ENABLE_BASIC",
        "intra_op_num_threads": threads or 0,
        "disabled_optimizers": [] if ort_defaults or not has_qdq(path) else list(QDQ_DISABLED_OPTIMIZERS),
        "intra_op_allow_spinning": spinning,
    }


def ort_session(
    path: str | Path,
    threads: int | None = None,
    optimized_path: str | Path | None = None,
    ort_defaults: bool = False,
    spinning: bool = True,
    integer_kernels: bool = True,
):
    """An ORT CPU session with all graph optimizations (see the module docstring for the exceptions).

    ``integer_kernels=False`` stops at ORT's basic level, where Q/DQ pairs stay float ops: the
    graph's own function, for verifying a file meant for another runtime (TensorRT) on a CPU whose
    integer kernels would saturate (:func:`u8s8_saturates`).

    ``spinning=False`` stops idle intra-op threads from busy-waiting after a run; benchmarks that
    alternate sessions (or ORT and PyTorch) in one process need it, or each session's spinning
    threads steal the cores from the next one.
    """
    ort = onnxruntime()
    cfg = session_config(path, threads, ort_defaults, spinning, integer_kernels)
    so = ort.SessionOptions()
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, cfg["graph_optimization_level"])
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized_path:
        so.optimized_model_filepath = str(optimized_path)
    try:
        return ort.InferenceSession(
            str(path), so, providers=cfg["providers"], disabled_optimizers=cfg["disabled_optimizers"]
        )
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
        raise UserError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0][:300]}") from None


def optimized_ops(path: str | Path, threads: int | None = None, ort_defaults: bool = False) -> dict:
    """Op types of the graph ORT actually runs (after its fusions) and the integer kernels among them."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        ort_session(path, threads, optimized_path=out, ort_defaults=ort_defaults)
        model = onnx.load(str(out))
    ops = Counter(n.op_type for n in model.graph.node)
    return {
        "integer_kernels": {k: ops[k] for k in INTEGER_KERNELS if ops[k]},
        "float_matmuls": ops["MatMul"] + ops["Gemm"] + ops["FusedMatMul"],
        "quantize_linear": ops["QuantizeLinear"],
        "dequantize_linear": ops["DequantizeLinear"],
        "ops": dict(sorted(ops.items())),
    }
