"""The pass interface, the pass registry, order checks and :func:`run`.

A pass is a frozen dataclass registered with :func:`register_pass`; its fields are its whole
configuration and its class attributes say what it is:

* ``name`` (recipe key), ``family`` (``"quantize"``, ``"sparsity"``, ``"prune"``, ``"dynamic"``),
  ``VERSION`` (checked when a recipe or a saved model names it);
* ``needs_data`` (calibration data), ``needs_teacher`` (a frozen copy of the uncompressed model,
  made by :func:`run` only when a pass asks for it), ``needs_training`` (the recipe's ``train:``
  data);
* ``cannot_follow``: ``{family or pass name: why}`` — earlier passes it must not come after.
  Besides, two passes of an exclusive family (a layer is quantized once, a weight gets one
  sparsity pattern) with the same ``targets``/``ignore`` are refused; with different targets a
  later pass that meets an already-quantized slot stops with a one-line error naming it.

Data reaches a pass only through the :class:`Context`. Every change a pass makes to the model goes
through :mod:`edgecompress.structure` (swap, append, resize, registered ops), so the result can be
saved and rebuilt without pickle.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from edgecompress.errors import UserError
from edgecompress.structure import structure_of

PASSES: dict[str, type] = {}
FAMILIES = ("quantize", "sparsity", "prune", "dynamic")
EXCLUSIVE_FAMILIES = {
    "quantize": "a layer is quantized once",
    "sparsity": "a weight gets one sparsity pattern",
}
BUILTIN_PASS_MODULES = (
    "edgecompress.quantize.ptq",
    "edgecompress.quantize.vit_ptq",
    "edgecompress.sparsity.nm",
    "edgecompress.sparsity.acm",
    "edgecompress.prune",
    "edgecompress.sparsity.seer",
)


@dataclass(frozen=True)
class Context:
    """What a pass may use besides the model.

    ``call(model, inputs)`` runs any model on a batch (raw inputs or a
    :class:`~edgecompress.data.samples.Batch`, moved to ``device``) and returns its main output;
    ``forward_loop(model)`` runs the calibration batches (eval mode, no grad); ``batches(split)``
    gives the ``"calib"``, ``"eval"`` or ``"train"`` samples as a
    :class:`~edgecompress.data.samples.SampleSet` (loaded on first use); ``train`` is the recipe's
    :class:`~edgecompress.train.TrainConfig`; ``teacher`` the frozen uncompressed model (set by
    :func:`run` for passes with ``needs_teacher``); ``kind`` the model kind (``"image"``,
    ``"encoder"``, ``"causal_lm"``); ``notes`` collects a pass's report lines (skipped layers ...)
    and ``info`` its structured results (training losses, a switch step ...), both in its record.
    """

    example_inputs: tuple
    forward_loop: Callable[[nn.Module], None] | None
    call: Callable[[nn.Module, Any], torch.Tensor]
    device: torch.device
    seed: int = 0
    kind: str = "image"
    batches: Callable[[str], Any] | None = None
    train: Any = None
    teacher: nn.Module | None = None
    notes: list = field(default_factory=list)
    info: dict = field(default_factory=dict)


class Pass(Protocol):
    name: ClassVar[str]
    family: ClassVar[str]
    VERSION: ClassVar[int]
    needs_data: ClassVar[bool]

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module: ...


_CLASS_DEFAULTS = {"needs_data": False, "needs_teacher": False, "needs_training": False, "cannot_follow": {}}


def register_pass(cls: type) -> type:
    """Register a frozen dataclass as a pass under ``cls.name`` (class attributes: module docstring)."""
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:
        raise TypeError(f"{cls.__name__} must be a frozen dataclass")
    for attr in ("name", "family", "VERSION"):
        if not hasattr(cls, attr):
            raise TypeError(f"pass {cls.__name__} needs a class attribute {attr!r}")
    if cls.family not in FAMILIES:
        raise TypeError(f"pass {cls.name!r}: family {cls.family!r} is not one of {FAMILIES}")
    for attr, default in _CLASS_DEFAULTS.items():
        if not hasattr(cls, attr):
            setattr(cls, attr, default)
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


def check_pass_versions(passes: list, where: str) -> None:
    """Every recorded ``{"pass", "version"}`` must name a pass of this installation at that VERSION."""
    load_builtin_passes()
    for entry in passes:
        name = entry.get("pass") if isinstance(entry, dict) else None
        cls = PASSES.get(name)
        if cls is None:
            raise UserError(f"{where}: made by pass {name!r}, which this edgecompress does not have")
        if entry.get("version") != cls.VERSION:
            raise UserError(
                f"{where}: made by {name} version {entry.get('version')}; this edgecompress has "
                f"version {cls.VERSION}"
            )


def _scope(p) -> tuple:
    return tuple(getattr(p, "targets", ())), tuple(getattr(p, "ignore", ()))


def order_error(earlier, later) -> str | None:
    """Why ``later`` cannot come after ``earlier`` (None if it can)."""
    why = later.cannot_follow.get(earlier.name) or later.cannot_follow.get(earlier.family)
    if why:
        return why
    if (
        later.family == earlier.family
        and later.family in EXCLUSIVE_FAMILIES
        and _scope(later) == _scope(earlier)
    ):
        return (
            f"both act on the same layers ({EXCLUSIVE_FAMILIES[later.family]}); "
            "split the model between them with targets/ignore"
        )
    return None


def check_order(passes: Sequence, path: str = "passes") -> None:
    """Refuse, in one line naming both, a pass placed after one it cannot follow."""
    for i, later in enumerate(passes):
        for j, earlier in enumerate(passes[:i]):
            why = order_error(earlier, later)
            if why:
                raise UserError(
                    f"{path}[{i}] {later.name!r} cannot follow {path}[{j}] {earlier.name!r}: {why}"
                )


def make_teacher(model: nn.Module) -> nn.Module:
    """A frozen copy (eval mode, no gradients) of ``model``."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def run(model: nn.Module, passes: list, ctx: Context) -> tuple[nn.Module, list[dict]]:
    """Apply ``passes`` in order; returns the model and one record per pass (config, seconds, layers)."""
    check_order(passes)
    if any(p.needs_teacher for p in passes) and ctx.teacher is None:
        ctx = dataclasses.replace(ctx, teacher=make_teacher(model))
    records = []
    for p in passes:
        if p.needs_data and ctx.forward_loop is None:
            raise UserError(f"pass {p.name!r} needs calibration data (recipe 'calibration:' or --calib)")
        if p.needs_training and ctx.batches is None:
            raise UserError(f"pass {p.name!r} needs training data (recipe 'train:' section)")
        st = structure_of(model)
        before = len(st["ops"])
        pctx = dataclasses.replace(ctx, notes=[], info={})
        t0 = time.perf_counter()
        model = p.apply(model, pctx)
        st = structure_of(model)
        config = dataclasses.asdict(p)
        st["passes"].append({"pass": p.name, "version": p.VERSION, "config": config})
        records.append(
            {
                "pass": p.name,
                "version": p.VERSION,
                "config": config,
                "seconds": round(time.perf_counter() - t0, 3),
                "layers": layer_report(model, st["ops"][before:]),
                "notes": list(pctx.notes),
                "info": dict(pctx.info),
            }
        )
    return model, records


def _touched(ops: list[dict]) -> list[str]:
    names = []
    for op in ops:
        if op["op"] == "append":
            names.append(f"{op['name']}.{op['index']}")
        elif "name" in op:
            names.append(op["name"])
    return names


def layer_report(model: nn.Module, ops: list[dict] | None = None) -> list[dict[str, Any]]:
    """``describe()`` of the modules the given ops created (all describable modules if None)."""
    wanted = None if ops is None else set(_touched(ops))
    rows = []
    for name, mod in model.named_modules():
        describe = getattr(mod, "describe", None)
        if callable(describe) and (wanted is None or name in wanted):
            rows.append({"name": name, **describe()})
    return rows
