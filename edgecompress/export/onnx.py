"""PyTorch → ONNX: plain-tensor graph wrappers, quantizers as INT8 Q/DQ, two exporters, checks.

:func:`export_onnx` exports any loaded model (float or compressed). Quantizers are swapped for
their export forms (:mod:`edgecompress.export.forms`) on a copy of the model; the graph is
traced with ``torch.onnx.export(dynamo=True)`` and, when that fails, with the TorchScript
exporter (``dynamo=False``); which one ran, and why the first failed, is recorded. The graph is
then rewritten (:mod:`edgecompress.export.graph`) and checked with
``onnx.checker.check_model(full_check=True)``.
"""

from __future__ import annotations

import contextlib
import io
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from edgecompress.errors import UserError
from edgecompress.export.forms import ExportOptions, export_category, to_export_form
from edgecompress.export.graph import dedicate_qdq, fold_scalar_mul_into_dq, qdq_summary
from edgecompress.export.inputs import as_batch, input_names, output_name, synthetic
from edgecompress.export.runtime import resolve_weight_dtype
from edgecompress.models.loading import LoadedModel

DEFAULT_OPSET = 20  # ONNX Gelu (opset 20): ORT runs it fused, faster than Erf-based GELU (-7 %)
MIN_OPSET = 13  # per-channel QuantizeLinear / DequantizeLinear
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass
class ExportResult:
    """What was written and how."""

    path: Path
    exporter: str  # "dynamo" | "torchscript"
    opset: int
    inputs: list[str]
    output: str
    batch: int | str  # the static batch size or "dynamic"
    target: str
    quantized: bool
    weight_dtype: str = "int8"
    weight_dtype_reason: str = ""
    forms: dict[str, int] = field(default_factory=dict)
    qdq: dict = field(default_factory=dict)
    rewrites: dict = field(default_factory=dict)
    fallback_reason: str | None = None
    seconds: float = 0.0
    dynamic: dict[str, str] = field(default_factory=dict)  # form -> how the runtime computes it

    def to_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


class GraphModule(nn.Module):
    """Plain tensors in, one tensor out: ``(input_ids, attention_mask[, token_type_ids])`` →
    ``last_hidden_state`` / ``logits``, or ``pixel_values`` → ``logits``."""

    def __init__(self, loaded: LoadedModel, model: nn.Module):
        super().__init__()
        self.model = model
        self._spec = LoadedModel(
            None, loaded.spec, loaded.kind, loaded.base, loaded.data_cfg, loaded.tokenizer_dir
        )

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self._spec.call(self.model, as_batch(self._spec, tensors))


def _dynamic(loaded: LoadedModel, dynamic_batch: bool) -> tuple[dict, tuple]:
    """TorchScript ``dynamic_axes`` and dynamo ``dynamic_shapes``: batch on request, text length always."""
    dims = {0: "batch"} if dynamic_batch else {}
    if loaded.kind != "image":
        dims[1] = "sequence"
    if not dims:
        return {}, tuple(None for _ in input_names(loaded))
    axes = {name: dict(dims) for name in [*input_names(loaded), output_name(loaded)]}
    return axes, tuple({d: torch.export.Dim.DYNAMIC for d in dims} for _ in input_names(loaded))


def _first_line(e: BaseException) -> str:
    """``Type: first line`` of the innermost cause (the exporters wrap the real error)."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _export_dynamo(module, example, path, names, out, opset, shapes) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        prog = torch.onnx.export(
            module, example, dynamo=True, input_names=names, output_names=[out], opset_version=opset,
            dynamic_shapes=(shapes,) if any(s is not None for s in shapes) else None, verbose=False,
        )  # fmt: skip
    prog.save(str(path), external_data=False)


def _export_torchscript(module, example, path, names, out, opset, axes) -> None:
    from edgecompress.export.symbolic import register_symbolics

    register_symbolics(opset)
    torch.onnx.export(
        module, example, str(path), dynamo=False, input_names=names, output_names=[out],
        opset_version=opset, dynamic_axes=axes or None, do_constant_folding=True,
    )  # fmt: skip


def export_graph(module, example, path, names, out, opset, shapes, axes=None, exporter: str = "auto"):
    """Export ``module`` called on ``example`` to ``path``: dynamo, else TorchScript (``exporter``
    auto | dynamo | torchscript). Returns ``(exporter used, why dynamo failed or None)``; a failure
    of the exporter(s) is one :class:`UserError`."""
    used, reason = "dynamo", None
    with torch.no_grad():
        if exporter in ("auto", "dynamo"):
            try:
                _export_dynamo(module, example, path, names, out, opset, shapes)
            except Exception as e:  # the exporters raise many types; the fallback records it
                if exporter == "dynamo":
                    raise UserError(f"dynamo export failed: {_first_line(e)}") from e
                used, reason = "torchscript", _first_line(e)
        else:
            used = "torchscript"
        if used == "torchscript":
            try:
                _export_torchscript(module, example, path, names, out, opset, axes)
            except Exception as e:
                why = f"; dynamo: {reason}" if reason else ""
                raise UserError(f"ONNX export failed: torchscript: {_first_line(e)}{why}") from e
    return used, reason


def export_onnx(
    loaded: LoadedModel,
    path: str | Path,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    batch: int = 1,
    target: str = "onnxruntime",
    exporter: str = "auto",
    weight_dtype: str = "auto",
) -> ExportResult:
    """Export ``loaded.model`` to ``path`` (ONNX, checked). ``exporter``: auto | dynamo | torchscript;
    ``weight_dtype``: auto | int8 | uint8 (:func:`edgecompress.export.runtime.resolve_weight_dtype`)."""
    if opset < MIN_OPSET:
        raise UserError(f"--opset {opset}: INT8 Q/DQ with per-channel weights needs opset ≥ {MIN_OPSET}")
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise UserError(f"exporter must be auto, dynamo or torchscript, got {exporter!r}")
    t0 = time.perf_counter()
    dtype, why = resolve_weight_dtype(weight_dtype, target)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    form, counts = to_export_form(loaded.model, ExportOptions(target, dtype))
    module = GraphModule(loaded, form).eval()
    seq = max([16] + [getattr(m, "TRACE_MIN_SEQ", 0) for m in form.modules()])  # a form may need a longer trace
    example = synthetic(loaded, max(batch, 2) if dynamic_batch else batch, seq=seq)
    names, out = input_names(loaded), output_name(loaded)
    axes, shapes = _dynamic(loaded, dynamic_batch)
    used, reason = export_graph(module, example, path, names, out, opset, shapes, axes, exporter)
    rewrites = rewrite_graph(path, target)
    model = check_onnx(path)
    return ExportResult(
        path, used, opset, names, out, "dynamic" if dynamic_batch else batch, target,
        export_category(loaded.model) == "quantized", dtype, why, counts, qdq_summary(model), rewrites, reason,
        round(time.perf_counter() - t0, 2), _dynamic_compute(form),
    )  # fmt: skip


def _dynamic_compute(form: nn.Module) -> dict[str, str]:
    """Per dynamic export form, whether the graph skips compute or computes densely, masked."""
    return {
        type(m).__name__: m.COMPUTE for m in form.modules() if isinstance(getattr(m, "COMPUTE", None), str)
    }


def check_onnx(path: str | Path):
    """Load ``path`` and run the full ONNX checker (with shape inference); returns the ModelProto."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # DecodeError, ValidationError, InferenceError ...
        raise UserError(f"{path} is not a valid ONNX model ({_first_line(e)})") from None
    return model


def rewrite_graph(path: str | Path, target: str) -> dict[str, int]:
    """Apply the graph rewrites of :mod:`edgecompress.export.graph` to the file in place."""
    import onnx

    model = onnx.load(str(path))
    done = {"dedicated_qdq_nodes": dedicate_qdq(model)}
    if target == "onnxruntime":
        done["folded_scalar_muls"] = fold_scalar_mul_into_dq(model)
    if any(done.values()):
        onnx.save(model, str(path))
    return done
