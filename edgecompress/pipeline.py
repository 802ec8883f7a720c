"""The pass interface, the pass registry, and run / save / restore.

A pass is a frozen dataclass registered with :func:`register_pass`; its fields are its whole
configuration. Data reaches a pass only through ``Context.forward_loop``. Every module swap a pass
makes goes through :func:`edgecompress.models.targeting.replace_module`, which records it in the
model's structure map, so :func:`restore` can rebuild a compressed model from its base
architecture, ``structure.json`` and ``model.safetensors`` without pickle.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from edgecompress.errors import UserError

PASSES: dict[str, type] = {}
STRUCTURE_FORMAT = 1


@dataclass(frozen=True)
class Context:
    """What a pass may use besides the model: example inputs, a calibration loop, the device."""

    example_inputs: tuple
    forward_loop: Callable[[nn.Module], None] | None
    device: torch.device
    seed: int = 0


class Pass(Protocol):
    name: ClassVar[str]
    needs_data: ClassVar[bool]

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module: ...


def register_pass(cls: type) -> type:
    """Register a frozen dataclass as a pass under ``cls.name``."""
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:
        raise TypeError(f"{cls.__name__} must be a frozen dataclass")
    if cls.name in PASSES and PASSES[cls.name] is not cls:
        raise TypeError(f"pass name {cls.name!r} registered twice")
    PASSES[cls.name] = cls
    return cls


def load_builtin_passes() -> None:
    """Import the modules that register the shipped passes (kept lazy so the core imports fast)."""
    import importlib

    for mod in BUILTIN_PASS_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # a pass family that is not part of this build
            if e.name != mod:
                raise


BUILTIN_PASS_MODULES = (
    "edgecompress.quantize.ptq",
    "edgecompress.quantize.vit_ptq",
)


def run(model: nn.Module, passes: list, ctx: Context) -> tuple[nn.Module, list[dict]]:
    """Apply ``passes`` in order; returns the model and one record per pass (config, seconds, report)."""
    records = []
    for p in passes:
        if p.needs_data and ctx.forward_loop is None:
            raise UserError(f"pass {p.name!r} needs calibration data (recipe 'calibration:' or --calib)")
        t0 = time.perf_counter()
        model = p.apply(model, ctx)
        records.append(
            {
                "pass": p.name,
                "config": dataclasses.asdict(p),
                "seconds": round(time.perf_counter() - t0, 3),
                "layers": layer_report(model),
            }
        )
    return model, records


def layer_report(model: nn.Module) -> list[dict[str, Any]]:
    """``describe()`` of every module that has one (quantizers, sparse layers, ...), in module order."""
    rows = []
    for name, mod in model.named_modules():
        describe = getattr(mod, "describe", None)
        if callable(describe):
            rows.append({"name": name, **describe()})
    return rows


def save(
    model: nn.Module,
    out_dir: str | Path,
    files: dict[str, str | dict],
    extra: Callable[[Path], dict[str, str | dict]] | None = None,
) -> Path:
    """Write ``model.safetensors``, ``structure.json`` and ``files`` to ``out_dir`` atomically.

    Everything is written to a temporary sibling folder that is renamed at the end, so an error
    never leaves a half-written output folder. ``extra(tmp_dir)`` runs after the model is saved
    and before ``files`` are written: it may write more files into ``tmp_dir`` (e.g. the exported
    ONNX model) and returns entries that update ``files``.
    """
    from safetensors.torch import save_model

    from edgecompress.models.targeting import structure_of

    out = Path(out_dir)
    if out.exists():
        raise UserError(f"output folder {out} already exists (choose another --out)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        structure = {"format": STRUCTURE_FORMAT, **structure_of(model)}
        (tmp / "structure.json").write_text(json.dumps(structure, indent=1))
        if extra is not None:
            files = {**files, **extra(tmp)}
        for fname, content in files.items():
            text = content if isinstance(content, str) else json.dumps(content, indent=1, default=str)
            (tmp / fname).write_text(text)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def restore(out_dir: str | Path) -> nn.Module:
    """Rebuild a compressed model from a folder written by :func:`save` (no pickle)."""
    from edgecompress.models.loading import load_structure_dir

    return load_structure_dir(Path(out_dir)).model
