"""Benchmark backends: one prepared, zero-argument callable per (model, backend, shape).

* ``torch``: the PyTorch model (eager, ``inference_mode``) on CPU or CUDA;
* ``onnxruntime``: an ONNX file in an ORT CPU session (the session settings of
  :mod:`edgecompress.export.runtime`);
* ``openvino``: an ONNX file (Q/DQ pairs included) read by ``openvino.Core().read_model`` and
  compiled for its CPU plugin with ``PERFORMANCE_HINT=LATENCY``, ``INFERENCE_NUM_THREADS`` and an
  ``INFERENCE_PRECISION_HINT`` (``f32``, or ``bf16``, which the plugin only honours on CPUs with
  AVX512-BF16 or AMX); the precision the compiled model reports is recorded, with the precision
  its matrix multiplications really run in (:func:`edgecompress.export.openvino.ov_matmul_precisions`);
* ``tensorrt``: a serialized engine run with ``execute_async_v3`` on torch-allocated CUDA buffers.
  UNVERIFIED: TensorRT was not available where this was written.

Inputs are seeded synthetic tensors of the model's form (:func:`edgecompress.export.inputs.synthetic`)
— latency does not depend on the values for these models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgecompress.errors import UserError
from edgecompress.export.inputs import as_batch, synthetic
from edgecompress.export.openvino import OV_PRECISIONS, openvino  # noqa: F401  (re-exported)
from edgecompress.models.loading import LoadedModel

BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")
SYNTH_ID_RANGE = (100, 1000)


@dataclass
class Runner:
    """What one timed call runs, and how to describe it next to the numbers."""

    call: Callable[[], object]
    info: dict = field(default_factory=dict)
    cuda: bool = False
    output: Callable[[], np.ndarray] | None = None  # one run's main output, for sanity checks
    feeds: dict[str, np.ndarray] | None = None  # the inputs it runs on (onnxruntime, openvino)
    shapes: dict[str, list[int]] = field(default_factory=dict)  # every input's shape, as fed

    @property
    def batch(self) -> int | None:
        """The leading dimension of the first input: the batch this runner really times."""
        first = next(iter(self.shapes.values()), None)
        return int(first[0]) if first else None


def _shapes(inputs) -> dict[str, list[int]]:
    if isinstance(inputs, dict):
        return {k: list(v.shape) for k, v in inputs.items() if torch.is_tensor(v)}
    if torch.is_tensor(inputs):
        return {"input": list(inputs.shape)}
    return {f"input{i}": list(t.shape) for i, t in enumerate(inputs)}


def torch_runner(
    loaded: LoadedModel, batch: int, seq: int, threads: int | None, device: str = "cpu"
) -> Runner:
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available")
    if threads:
        torch.set_num_threads(threads)
    model = loaded.model.to(device).eval()
    inputs = as_batch(loaded, tuple(t.to(device) for t in synthetic(loaded, batch, seq)))

    def call():
        with torch.inference_mode():
            return loaded.call(model, inputs)

    info = {
        "backend": "torch",
        "device": device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    output = lambda: call().float().cpu().numpy()  # noqa: E731
    return Runner(call, info, cuda=device == "cuda", output=output, shapes=_shapes(inputs))


def vocab_size(path: str | Path) -> int | None:
    """Rows of the embedding table the graph's ``input_ids`` index (a Gather on an initializer)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inputs = {i.name for i in model.graph.input if "input_ids" in i.name}
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] in inputs:
            rows = shapes.get(node.input[0])
            if rows:
                return int(rows[0])
    return None


def feeds_for(sess, batch: int, seq: int, seed: int = 0, vocab: int | None = None) -> dict[str, np.ndarray]:
    """Synthetic inputs for an ORT session (or anything with ORT's ``get_inputs()``): dynamic axis 0 =
    batch, axis 1 of integer inputs = seq; token ids below ``vocab`` (every vocabulary has ids
    100–999 when it is not known)."""
    rng = np.random.default_rng(seed)
    hi = min(SYNTH_ID_RANGE[1], vocab or SYNTH_ID_RANGE[1])
    lo = min(SYNTH_ID_RANGE[0], hi - 1)
    feeds = {}
    for inp in sess.get_inputs():
        is_int = "int" in inp.type
        shape = []
        for axis, d in enumerate(inp.shape):
            if isinstance(d, int) and d > 0:
                shape.append(d)
            elif axis == 0:
                shape.append(batch)
            elif axis == 1 and is_int:
                shape.append(seq)
            else:
                raise UserError(f"input {inp.name!r} has a dynamic axis {axis} that bench cannot size")
        if not is_int:
            feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
        elif "mask" in inp.name:
            feeds[inp.name] = np.ones(shape, np.int64)
        elif "type" in inp.name:
            feeds[inp.name] = np.zeros(shape, np.int64)
        else:
            feeds[inp.name] = rng.integers(lo, hi, size=shape).astype(np.int64)
    return feeds


def ort_runner(
    path: str | Path, batch: int, seq: int, threads: int | None, ort_defaults: bool = False
) -> Runner:
    from edgecompress.export.runtime import onnxruntime, ort_session, session_config

    sess = ort_session(path, threads, ort_defaults=ort_defaults, spinning=False)
    feeds = feeds_for(sess, batch, seq, vocab=vocab_size(path))
    info = {
        "backend": "onnxruntime",
        "onnx": str(path),
        "onnxruntime": onnxruntime().__version__,
        "session": session_config(path, threads, ort_defaults, spinning=False),
    }
    output = lambda: np.asarray(sess.run(None, feeds)[0])  # noqa: E731
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    return Runner(lambda: sess.run(None, feeds), info, output=output, feeds=feeds, shapes=shapes)


def ov_runner(path: str | Path, batch: int, seq: int, threads: int | None, precision: str = "f32") -> Runner:
    """An ONNX file (or an OpenVINO IR ``.xml``) in OpenVINO's CPU plugin (:mod:`edgecompress.export.openvino`),
    reshaped to the fed shapes where the graph's are dynamic."""
    from edgecompress.export import openvino as ovx

    ovx.check_precision(precision, f"openvino precision {precision!r}")
    ov = ovx.openvino()
    model = ovx.read_model(path)
    vocab = vocab_size(path) if Path(path).suffix == ".onnx" else None
    feeds = feeds_for(_OVInputs(ovx.ov_inputs(model)), batch, seq, vocab=vocab)
    reshaped = not all(i.get_partial_shape().is_static for i in model.inputs)
    if reshaped:  # static shapes compile to the faster kernels, and fix what the run is timed on
        model.reshape({name: ov.PartialShape(list(v.shape)) for name, v in feeds.items()})
    compiled, config = ovx.compile_model(model, path, precision, threads)
    request = compiled.create_infer_request()
    for name, value in feeds.items():
        request.set_tensor(name, ov.Tensor(value))  # inputs in place: a timed call is one inference
    out = compiled.output(0)
    request.infer()  # the first run picks the kernels; the layer report below is then final
    info = {
        "backend": "openvino",
        "onnx": str(path),
        **ovx.compiled_info(compiled, config),
        "reshaped_to_fed_shapes": reshaped,
        "matmul_precisions": ovx.ov_matmul_precisions(compiled),
    }
    output = lambda: np.array(request.infer()[out])  # noqa: E731
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    return Runner(request.infer, info, output=output, feeds=feeds, shapes=shapes)


class _OVInputs:
    """OpenVINO inputs behind ORT's ``get_inputs()``, for :func:`feeds_for`."""

    def __init__(self, inputs):
        self.inputs = inputs

    def get_inputs(self):
        return self.inputs


_TRT_DTYPES = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "BOOL": torch.bool,
}


def trt_runner(engine_path: str | Path, batch: int, seq: int) -> Runner:
    """UNVERIFIED (no TensorRT here): deserialize, size dynamic inputs, run on one CUDA stream."""
    from edgecompress.export.tensorrt import require_tensorrt

    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise UserError(f"{engine_path} is not a TensorRT engine for this TensorRT/GPU")
    ctx = engine.create_execution_context()
    buffers = {}  # keeps the device tensors alive while the engine holds their addresses
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            shape = [
                batch if a == 0 and d < 0 else seq if d < 0 else d
                for a, d in enumerate(engine.get_tensor_shape(name))
            ]
            ctx.set_input_shape(name, shape)
    shapes = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            shapes[name] = list(ctx.get_tensor_shape(name))
        dtype = _TRT_DTYPES[engine.get_tensor_dtype(name).name]
        shape = tuple(ctx.get_tensor_shape(name))
        t = (
            torch.ones(shape, dtype=dtype, device="cuda")
            if not dtype.is_floating_point
            else torch.randn(shape, device="cuda").to(dtype)
        )
        buffers[name] = t
        ctx.set_tensor_address(name, t.data_ptr())

    def call(_alive=buffers):  # current stream: the CUDA events that time it see the work
        ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream)

    info = {"backend": "tensorrt", "engine": str(engine_path), "tensorrt": trt.__version__, "verified": False}
    return Runner(call, info | {"buffers": sorted(buffers)}, cuda=True, shapes=shapes)
