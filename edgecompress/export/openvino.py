"""OpenVINO as a runtime of our ONNX files (the one guard around ``openvino``): compile, run, and
report which kernels the CPU plugin really picked.

OpenVINO reads the Q/DQ graph itself (``Core().read_model``): each activation
``QuantizeLinear → DequantizeLinear`` becomes a ``FakeQuantize``, each weight ``DequantizeLinear``
a ``Convert → (Subtract) → Multiply`` chain. Its low-precision transformations (LPT) then run a
``MatMul`` in INT8 only when they accept both inputs: activations per tensor, u8 or i8 (a
zero-point is fine against a constant operand), weights i8 with zero-point 0 (per channel is
fine). Asymmetric weights (our ``uniform_w8a8``) fail that test and the plugin falls back to
weight-only decompression (float GEMM on weights unpacked on the fly); an attention matmul
(both operands activations) needs zero-point 0 on both sides. ``INFERENCE_PRECISION_HINT=bf16``
runs what stays in float in bf16 (AMX or AVX512-BF16 only; elsewhere the plugin stays f32).
:func:`ov_matmul_precisions` reads the compiled model's own report, so every claim about an INT8
path is the plugin's word, not a prediction.

:class:`OVSession` gives a compiled model ONNX Runtime's session interface (``get_inputs()``,
``run(None, feeds)``), so :func:`edgecompress.export.verify.verify_onnx` verifies a file in
OpenVINO with the same code and bounds as in ONNX Runtime.

Attention: OpenVINO fuses an attention block into its MHA kernel (a ``Subgraph`` layer, no
``MatMul``/``Softmax`` left; bf16 on AMX) when it recognises the pattern. It recognises the
project's explicit attention (:func:`edgecompress.models.attention.explicit_attention_`: scaled
``q @ kᵀ``, additive mask, ``Softmax``, ``@ v``) but not the export of PyTorch's SDPA that an HF
model keeps when no pass replaced its attention (q and k each scaled by √scale, ``Where`` on the
mask, ``IsNaN``/``Where`` after the softmax). :func:`openvino_form` therefore makes the attention
explicit, on a copy, before an ``openvino`` export or bench; the verification compares the file with
that copy (the same function up to float rounding).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edgecompress.errors import UserError

OV_PRECISIONS = ("f32", "bf16")  # INFERENCE_PRECISION_HINT values we take
OV_MATMULS = ("FullyConnected", "MatMul", "Convolution")  # CPU-plugin layers that do the GEMMs


def openvino_form(loaded):
    """``loaded`` with every supported attention that still runs natively (SDPA) made explicit, on a
    copy (see the module docstring); ``loaded`` itself when there is nothing to change. Returns
    (model, names of the attention modules changed)."""
    from edgecompress.models.attention import adapters, explicit_attention_

    if adapters(loaded.model):  # a pass made the attention explicit already (its core is kept)
        return loaded, []
    model = copy.deepcopy(loaded.model)
    changed = explicit_attention_(model)
    if not changed:
        return loaded, []
    return replace(loaded, model=model.eval()), changed


def unfused_softmax(compiled) -> int:
    """Softmax layers the compiled model kept as such (0 when every attention became an MHA kernel)."""
    ops = compiled.get_runtime_model().get_ordered_ops()
    return sum(op.get_rt_info()["layerType"].astype(str) == "Softmax" for op in ops)


def openvino():
    """Import openvino or say in one line how to get it (never imported with the package)."""
    try:
        import openvino as ov
    except ImportError:
        raise UserError("openvino is not installed: pip install 'edgecompress[openvino]'") from None
    return ov


def split_runtime(runtime: str) -> tuple[str, str | None]:
    """``"openvino:bf16"`` → ``("openvino", "bf16")``; ``"openvino"`` → ``("openvino", "f32")``; others as is."""
    name, _, precision = runtime.partition(":")
    if name != "openvino":
        return runtime, None
    return name, precision or "f32"


def check_precision(precision: str, what: str) -> None:
    if precision not in OV_PRECISIONS:
        raise UserError(
            f"{what}: the openvino precision hint is one of {', '.join(OV_PRECISIONS)} (e.g. openvino:bf16)"
        )


@dataclass
class OVInput:
    """An OpenVINO model input in the form ORT's ``NodeArg`` has (name, type, shape)."""

    name: str
    type: str
    shape: list


def ov_inputs(model) -> list[OVInput]:
    return [
        OVInput(
            i.get_any_name(),
            "tensor(int64)" if i.get_element_type().is_integral() else "tensor(float)",
            [d.get_length() if d.is_static else None for d in i.get_partial_shape()],
        )
        for i in model.inputs
    ]


def read_model(path: str | Path):
    try:
        return openvino().Core().read_model(str(path))
    except RuntimeError as e:
        raise UserError(f"OpenVINO cannot read {path}: {str(e).strip().splitlines()[-1][:300]}") from None


def compile_model(model, path, precision: str = "f32", threads: int | None = None):
    """``model`` compiled for the CPU plugin: LATENCY hint, ``threads`` inference threads, ``precision``."""
    check_precision(precision, "openvino")
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        return openvino().Core().compile_model(model, "CPU", config), config
    except RuntimeError as e:
        raise UserError(f"OpenVINO cannot compile {path}: {str(e).strip().splitlines()[-1][:300]}") from None


def compiled_info(compiled, config: dict) -> dict:
    """What was asked and what the compiled model reports (precision, threads, streams, pinning)."""
    return {
        "openvino": openvino().get_version(),
        "config": config,
        "compiled": {
            "INFERENCE_PRECISION_HINT": compiled.get_property("INFERENCE_PRECISION_HINT").to_string(),
            "PERFORMANCE_HINT": str(compiled.get_property("PERFORMANCE_HINT")),
            "INFERENCE_NUM_THREADS": int(compiled.get_property("INFERENCE_NUM_THREADS")),
            "NUM_STREAMS": int(compiled.get_property("NUM_STREAMS")),
            "ENABLE_CPU_PINNING": bool(compiled.get_property("ENABLE_CPU_PINNING")),
        },
    }


def ov_matmul_precisions(compiled) -> dict[str, int]:
    """``{"FullyConnected i8 brgemm_avx512_amx_i8": 36, ...}``: how many of the compiled model's GEMM
    layers run in which input precision (``runtimePrecision``) and with which kernel (``primitiveType``).

    An INT8 layer reads ``u8``/``i8`` *and* has an integer kernel (``…_i8`` / ``…_u8s8``); a kernel
    named ``…_f32`` / ``…_bf16`` with ``i8``/``u8`` precision is weight-only decompression (float GEMM
    on weights unpacked on the fly). The kernel names are final only after a first inference.
    """
    counts: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        kind = rt["layerType"].astype(str)
        if kind in OV_MATMULS:
            key = f"{kind} {rt['runtimePrecision'].astype(str)} {rt['primitiveType'].astype(str)}"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def is_int8_kernel(key: str) -> bool:
    """A key of :func:`ov_matmul_precisions` whose kernel (not only its weights) is an integer one."""
    kernel = key.split()[-1].lower()
    return any(t in kernel for t in ("i8", "u8", "s8"))


def gemm_summary(layers: dict[str, int]) -> dict:
    """INT8 vs float GEMM layers of a :func:`ov_matmul_precisions` report."""
    return {
        "int8_gemms": sum(n for k, n in layers.items() if is_int8_kernel(k)),
        "float_gemms": sum(n for k, n in layers.items() if not is_int8_kernel(k)),
        "layers": layers,
    }


class OVSession:
    """An ONNX file compiled by OpenVINO's CPU plugin, with ORT's session interface (dynamic shapes
    kept: each new input shape is compiled on first use)."""

    def __init__(self, path: str | Path, precision: str = "f32", threads: int | None = None):
        model = read_model(path)
        self._inputs = ov_inputs(model)
        self.compiled, config = compile_model(model, path, precision, threads)
        self.info = compiled_info(self.compiled, config)

    def get_inputs(self) -> list[OVInput]:
        return self._inputs

    def run(self, _output_names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = self.compiled(feeds)
        return [np.asarray(out[o]) for o in self.compiled.outputs]

    def report(self) -> dict:
        """The compiled model's settings and GEMM kernels (call after a first :meth:`run`)."""
        return {
            **self.info,
            **gemm_summary(ov_matmul_precisions(self.compiled)),
            "unfused_softmax": unfused_softmax(self.compiled),
        }
