"""TensorRT: readiness checks on the ONNX graph (tested) and the engine build (UNVERIFIED here).

:func:`check_tensorrt_ready` lists every reason TensorRT's explicit-quantization import would
reject or mis-handle a graph: Q/DQ zero-points that are not all 0 (TensorRT only supports
symmetric INT8), non-INT8 Q/DQ types, per-channel quantization of activations, and ops outside
:data:`TRT_SUPPORTED_OPS`. It runs anywhere (ONNX only).

:func:`build_engine` builds an engine with the TensorRT Python API (``trt.Builder``, the network
parsed from the verified ONNX file by ``trt.OnnxParser``, a STRONGLY_TYPED network where the
installed TensorRT has that flag, else FP16 + INT8 builder flags; ``SPARSE_WEIGHTS`` when the
weights are 2:4; a timing-cache file; an optimization profile for dynamic inputs).
**The engine build is unverified:** TensorRT is not installable on the machines this code was
written and tested on (no NVIDIA GPU), so only the steps up to the builder are tested.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgecompress.errors import UserError

TRT_MAX_OPSET = 22  # TensorRT 10.x parsers; TensorRT 8.6 stops at 17 (export with --opset 17)
# ONNX ops the TensorRT ONNX parser supports (onnx-tensorrt docs/operators.md for 8.5, plus the
# 8.6/10.x additions LayerNormalization, GroupNormalization, Gelu, CastLike, IsInf, Hardmax).
TRT_SUPPORTED_OPS = frozenset(
    """Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast
    CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
    DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor
    Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater
    GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If
    InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop
    LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mod Mul Neg
    NonMaxSuppression NonZero Not OneHot Or Pad PRelu Pow QuantizeLinear RandomNormal
    RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
    ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape
    Resize ReverseSequence RNN RoiAlign Round Scan Scatter ScatterElements ScatterND Selu Shape Shrink
    Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum
    Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Where Xor""".split()
)
INT8 = 3  # onnx.TensorProto.INT8


def _constants(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


def _qdq_violations(node, consts: dict, elem_types: dict, offsets_rewritten: bool = False) -> list[str]:
    where = f"{node.op_type} {node.name or node.output[0]!r}"
    if len(node.input) < 3 or not node.input[2]:
        return []  # no zero-point: 0, and the default output type is uint8 only for Q
    zp_name = node.input[2]
    if zp_name not in consts:
        return [f"{where}: zero-point {zp_name!r} is not a constant"]
    zp, out = consts[zp_name], []
    activation = node.input[0] not in consts  # weights: a constant behind their DequantizeLinear
    if offsets_rewritten and not activation and zp.dtype == np.uint8 and np.all(zp == 128):
        return []  # symmetric UINT8 weight codes (--weight-dtype auto on some CPUs): INT8 there
    if elem_types.get(zp_name, INT8) != INT8 and zp.dtype != np.int8:
        out.append(f"{where}: {zp.dtype} quantization (TensorRT wants INT8)")
    if np.any(zp != 0) and not (offsets_rewritten and activation):
        out.append(
            f"{where}: zero-point {zp.flatten()[:4].tolist()} is not 0 (TensorRT needs symmetric INT8)"
        )
    scale = consts.get(node.input[1])
    if scale is not None and np.any(scale <= 0):
        out.append(f"{where}: non-positive scale")
    if (
        scale is not None
        and scale.size > 1
        and node.input[0] not in consts
        and node.op_type == "QuantizeLinear"
    ):
        out.append(f"{where}: per-channel quantization of an activation (TensorRT: per-tensor only)")
    return out


def check_tensorrt_ready(model, offsets_rewritten: bool = False) -> list[str]:
    """Every reason ``model`` (an ``onnx.ModelProto``) does not fit TensorRT explicit quantization.

    ``offsets_rewritten``: ignore non-zero zero-points of activation Q/DQ, which the
    ``target="tensorrt"`` export writes in the zero-point-0 offset form, and symmetric UINT8 weight
    codes, which it writes as INT8 (the question "would the TensorRT form of this model be ready?"
    asked of its onnxruntime form)."""
    consts = _constants(model)
    elem_types = {i.name: i.data_type for i in model.graph.initializer}
    problems: list[str] = []
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset > TRT_MAX_OPSET:
        problems.append(f"opset {opset} > {TRT_MAX_OPSET} (export with --opset {TRT_MAX_OPSET} or lower)")
    unsupported = {}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            problems += _qdq_violations(node, consts, elem_types, offsets_rewritten)
        if node.domain not in ("", "ai.onnx") or node.op_type not in TRT_SUPPORTED_OPS:
            unsupported[f"{node.domain + '.' if node.domain else ''}{node.op_type}"] = True
    problems += [f"op {op} is not in TensorRT's supported-op list" for op in sorted(unsupported)]
    return problems


def weights_2to4(model) -> tuple[int, int]:
    """(2:4-sparse MatMul/Gemm weights, all such weights) among the graph's constant weights.

    Behind a ``DequantizeLinear`` a weight is zero where its code equals the zero-point (per
    channel along the DQ's axis), not where the code is 0.
    """
    consts = _constants(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    sparse = total = 0
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        w = _weight_values(node.input[1], consts, producers)
        if w is None or w.ndim != 2:
            continue
        k_axis = (
            1 if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute) else 0
        )
        wk = np.moveaxis(w, k_axis, -1)  # [..., K]
        total += 1
        if wk.shape[-1] % 4 == 0:
            groups = wk.reshape(*wk.shape[:-1], -1, 4).sum(-1)
            sparse += int(bool((groups <= 2).all()))
    return sparse, total


def _weight_values(name: str, consts: dict, producers: dict) -> np.ndarray | None:
    """Boolean "non-zero" map of a constant weight, seen through a DequantizeLinear if there is one."""
    dq = producers.get(name)
    if dq is not None and dq.op_type == "DequantizeLinear":
        codes = consts.get(dq.input[0])
        if codes is None:
            return None
        zp = consts.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        if zp is None or zp.size == 1:
            return codes != (0 if zp is None else zp.reshape(()))
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % codes.ndim
        shape = [1] * codes.ndim
        shape[axis] = -1
        return codes.astype(np.int32) != zp.astype(np.int32).reshape(shape)
    w = consts.get(name)
    return None if w is None else w != 0


def require_tensorrt():
    """Import tensorrt and check for a CUDA GPU, or raise a one-line UserError."""
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError(
            "TensorRT is not installed (pip install 'edgecompress[tensorrt]'; it needs an NVIDIA GPU and driver)"
        ) from None
    import torch

    if not torch.cuda.is_available():
        raise UserError("TensorRT needs an NVIDIA GPU, and no CUDA device is visible")
    return trt


def _profile(trt, builder, network, batch: int, seq: int, max_batch: int, max_seq: int):
    """min/opt/max shapes for every dynamic input (batch axis 0, sequence axis 1), or None."""
    profile, dynamic = builder.create_optimization_profile(), False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if all(d >= 0 for d in shape):
            continue
        dynamic = True
        lo, opt, hi = list(shape), list(shape), list(shape)
        for axis, (o, h) in enumerate(((batch, max_batch), (seq, max_seq))):
            if axis < len(shape) and shape[axis] < 0:
                lo[axis], opt[axis], hi[axis] = 1, o, h
        profile.set_shape(tensor.name, lo, opt, hi)
    return profile if dynamic else None


def _network(trt, builder, logger, onnx_path: Path, strongly_typed: bool):
    flags = 0
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT 8.x; implied in 10
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise UserError(
            f"TensorRT cannot parse {onnx_path}: {errors[0] if errors else 'unknown parser error'}"
        )
    return network, parser


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    batch: int = 1,
    seq: int = 128,
    max_batch: int = 32,
    max_seq: int = 512,
    strongly_typed: bool | None = None,
    workspace_gib: float = 4.0,
) -> dict:
    """Build a TensorRT engine from a verified ONNX file. UNVERIFIED: never run on a GPU yet.

    ``strongly_typed=None`` uses the STRONGLY_TYPED network flag where TensorRT has it (types come
    from the graph: INT8 where Q/DQ say so, FP32 elsewhere), else a weakly typed network with the
    FP16 and INT8 builder flags. The timing cache lives next to the engine (``.timing.cache``).
    """
    import onnx

    trt = require_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    problems = check_tensorrt_ready(onnx.load(str(onnx_path)))
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"{onnx_path} is not TensorRT-ready: {problems[0]}{more}")
    sparse, total = weights_2to4(onnx.load(str(onnx_path)))
    if strongly_typed is None:
        strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _network(trt, builder, logger, onnx_path, strongly_typed)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.INT8)  # honour the explicit Q/DQ in a weakly typed network
    if sparse:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    cache_path = engine_path.with_suffix(".timing.cache")
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = _profile(trt, builder, network, batch, seq, max_batch, max_seq)
    if profile is not None:
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"TensorRT could not build an engine from {onnx_path} (see the TensorRT log above)")
    engine_path.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {
        "engine": str(engine_path),
        "timing_cache": str(cache_path),
        "tensorrt": trt.__version__,
        "strongly_typed": strongly_typed,
        "sparse_weights": f"{sparse}/{total} weights 2:4",
        "verified": False,
        "note": "engine build not verified on a GPU by edgecompress's tests",
    }
