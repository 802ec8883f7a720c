"""The structure log: every change a pass makes to a model, as replayable ops; save and its checks.

A compressed model is its base architecture plus an ordered list of ops, kept in one place
(:func:`structure_of`, on the unwrapped model, so a DDP wrapper or ``torch.compile`` sees the same
log) and written to ``structure.json``:

* ``swap`` — ``{"name", "cls", "version", "config"}``: the submodule ``name`` becomes
  ``cls.from_swap(original, config)``;
* ``append`` — ``{"name", "index", "cls", "version", "config"}``: a module appended to the chain
  (:class:`~edgecompress.models.slots.Chain`) at ``name``;
* ``resize`` — ``{"name", "keep": {tensor: {dim: [indices]}}, "attrs": {...}}``: structured
  pruning; the named parameters/buffers of the module keep only those indices along those
  dimensions and the module's size attributes are set (``out_features``, ``num_heads``, ...);
* any op a family registers with :func:`register_op` (``explicit_attention`` lives beside the
  attention adapter). An op records the module that defines it, so replay imports that module,
  never a pass.

Classes are keyed by their import path (``edgecompress.quantize.modules.UniformQuantizer``) and
carry a ``VERSION``; replay imports only paths inside ``edgecompress`` (or classes registered in
this process) and refuses an unknown class, op or version in one line. ``structure.json`` also
records the format version, each pass and its ``VERSION``, and the shape and dtype of every saved
tensor; loading checks all of them before any tensor is read.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from edgecompress.errors import UserError

FORMAT = 2
SWAPS: dict[str, type] = {}  # import path → class
OPS: dict[str, Callable[[nn.Module, dict], None]] = {}
OP_MODULES: dict[str, str] = {}  # op name → module that registers it
TRUSTED_PREFIX = "edgecompress."
_ATTR = "_ec_structure"


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_swap(cls: type) -> type:
    """Make ``cls`` rebuildable from ``structure.json`` (needs ``swap_config`` and ``from_swap``)."""
    if not (hasattr(cls, "swap_config") and hasattr(cls, "from_swap")):
        raise TypeError(f"{cls.__name__} needs swap_config() and from_swap()")
    path = class_path(cls)
    if SWAPS.get(path, cls) is not cls:
        raise TypeError(f"swap class {path} registered twice")
    SWAPS[path] = cls
    return cls


def register_op(name: str):
    """Decorator: ``fn(model, op_dict)`` replays the op ``name``; the op records this module."""

    def deco(fn):
        if name in OPS and OPS[name] is not fn:
            raise TypeError(f"structure op {name!r} registered twice")
        OPS[name], OP_MODULES[name] = fn, fn.__module__
        return fn

    return deco


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def structure_of(model: nn.Module) -> dict:
    """The model's structure: ``{"base", "passes", "ops"}`` (created empty on first use)."""
    root = unwrap(model)
    st = root.__dict__.get(_ATTR)
    if st is None:
        st = {"base": None, "passes": [], "ops": []}
        root.__dict__[_ATTR] = st
    return st


def record(model: nn.Module, op: dict) -> None:
    """Append ``op`` to the log, naming the module that defines its replay function."""
    kind = op["op"]
    if kind not in OPS:
        raise TypeError(f"structure op {kind!r} is not registered")
    structure_of(model)["ops"].append({**op, "module": OP_MODULES[kind]})


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _swap_record(cls: type, new: nn.Module) -> dict:
    return {"cls": class_path(cls), "version": getattr(cls, "VERSION", 1), "config": new.swap_config()}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Swap the submodule ``name`` for ``new`` (a registered swap class) and record it; returns ``new``."""
    cls = type(new)
    if SWAPS.get(class_path(cls)) is not cls:
        raise TypeError(f"{class_path(cls)} is not a registered swap class")
    model = unwrap(model)
    set_submodule(model, name, new)
    record(model, {"op": "swap", "name": name, **_swap_record(cls, new)})
    return new


def append_module(model: nn.Module, chain: str, new: nn.Module) -> nn.Module:
    """Append ``new`` (a registered swap class) to the chain at ``chain`` and record it."""
    cls = type(new)
    if SWAPS.get(class_path(cls)) is not cls:
        raise TypeError(f"{class_path(cls)} is not a registered swap class")
    model = unwrap(model)
    target = model.get_submodule(chain)
    target.append(new)
    record(model, {"op": "append", "name": chain, "index": len(target) - 1, **_swap_record(cls, new)})
    return new


def resize_module(model: nn.Module, name: str, keep: dict[str, dict[int, list[int]]], attrs: dict) -> None:
    """Keep only ``keep[tensor][dim]`` indices of the module's tensors, set ``attrs``; record it."""
    model = unwrap(model)
    _resize(model.get_submodule(name), keep, attrs)
    plain = {t: {str(d): [int(i) for i in idx] for d, idx in dims.items()} for t, dims in keep.items()}
    record(model, {"op": "resize", "name": name, "keep": plain, "attrs": dict(attrs)})


@torch.no_grad()
def _resize(mod: nn.Module, keep: dict, attrs: dict) -> None:
    for tname, dims in keep.items():
        t = getattr(mod, tname)
        new = t.detach()
        for dim, idx in dims.items():
            new = new.index_select(int(dim), torch.as_tensor(idx, dtype=torch.long, device=new.device))
        if isinstance(t, nn.Parameter):
            setattr(mod, tname, nn.Parameter(new.contiguous(), requires_grad=t.requires_grad))
        else:
            mod._buffers[tname] = new.contiguous()
    for key, value in attrs.items():
        setattr(mod, key, tuple(value) if isinstance(value, list) else value)


def _import(module: str, where: str) -> None:
    """Import ``module`` (``edgecompress.*`` only) so that it registers the classes and ops it defines."""
    if not module.startswith(TRUSTED_PREFIX):
        raise UserError(f"{where}: refusing to import {module!r} (only edgecompress modules are loaded)")
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"{where}: cannot import {module!r} ({e})") from None


def resolve_class(path: str, version: int | None, where: str) -> type:
    """The registered swap class at ``path``, imported on demand, with a version check."""
    if not isinstance(path, str):
        raise UserError(f"{where}: module class {path!r} is not an import path")
    if path not in SWAPS:
        _import(path.rpartition(".")[0], where)
    cls = SWAPS.get(path)
    if cls is None:
        raise UserError(f"{where}: unknown module class {path!r}")
    have = getattr(cls, "VERSION", 1)
    if version is not None and version != have:
        raise UserError(f"{where}: {path} was saved at version {version}; this edgecompress has {have}")
    return cls


def _module(model: nn.Module, op: dict, what: str = "module") -> nn.Module:
    try:
        return model.get_submodule(op["name"])
    except AttributeError:
        raise UserError(f"{op['where']}: the model has no {what} {op['name']!r}") from None


@register_op("swap")
def _replay_swap(model: nn.Module, op: dict) -> None:
    cls = resolve_class(op["cls"], op.get("version"), op["where"])
    replace_module(model, op["name"], cls.from_swap(_module(model, op), op["config"]))


@register_op("append")
def _replay_append(model: nn.Module, op: dict) -> None:
    cls = resolve_class(op["cls"], op.get("version"), op["where"])
    chain = _module(model, op, "chain")
    if len(chain) != op.get("index", len(chain)):
        raise UserError(
            f"{op['where']}: chain {op['name']!r} has {len(chain)} modules, expected {op['index']}"
        )
    append_module(model, op["name"], cls.from_swap(None, op["config"]))


@register_op("resize")
def _replay_resize(model: nn.Module, op: dict) -> None:
    _module(model, op)
    keep = {t: {int(d): idx for d, idx in dims.items()} for t, dims in op["keep"].items()}
    resize_module(model, op["name"], keep, op.get("attrs", {}))


def replay(model: nn.Module, ops: list[dict]) -> nn.Module:
    """Re-apply recorded ops (``structure.json``) to a freshly built base model."""
    for i, op in enumerate(ops):
        where = f"structure.json ops[{i}]"
        kind = op.get("op") if isinstance(op, dict) else None
        if kind not in OPS:
            module = op.get("module") if isinstance(op, dict) else None
            if isinstance(module, str):
                _import(module, where)
            if kind not in OPS:
                raise UserError(f"{where}: unknown op {kind!r}")
        try:
            OPS[kind](model, {**op, "where": where})
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            raise UserError(f"{where}: cannot replay {kind!r} ({type(e).__name__}: {e})") from None
    return model


def tensor_shapes(model: nn.Module) -> dict[str, dict]:
    """Shape and dtype of every tensor ``safetensors.torch.save_model`` writes."""
    return {
        k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
        for k, v in model.state_dict().items()
    }


def save(
    model: nn.Module,
    out_dir: str | Path,
    files: dict[str, str | dict | bytes],
    extra: Callable[[Path], dict[str, str | dict | bytes]] | None = None,
) -> Path:
    """Write ``model.safetensors``, ``structure.json`` and ``files`` to ``out_dir`` atomically.

    Everything is written to a temporary sibling folder that is renamed at the end, so an error
    never leaves a half-written output folder. ``extra(tmp_dir)`` runs after the model is saved
    and before ``files`` are written: it may write more files into ``tmp_dir`` (e.g. the exported
    ONNX model) and returns entries that update ``files``. Under torchrun only rank 0 writes.
    """
    from safetensors.torch import save_model

    from edgecompress.train import process_rank

    model = unwrap(model)
    out = Path(out_dir)
    if process_rank() != 0:  # under torchrun every rank holds the same model; rank 0 writes it
        return out
    if out.exists():
        raise UserError(f"output folder {out} already exists (choose another --out)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; an output folder is not
        save_model(model, str(tmp / "model.safetensors"))
        st = structure_of(model)
        structure = {"format": FORMAT, **st, "tensors": tensor_shapes(model)}
        (tmp / "structure.json").write_text(json.dumps(structure, indent=1))
        if extra is not None:
            files = {**files, **extra(tmp)}
        for fname, content in files.items():
            if isinstance(content, bytes):  # a figure
                (tmp / fname).write_bytes(content)
                continue
            text = content if isinstance(content, str) else json.dumps(content, indent=1, default=str)
            (tmp / fname).write_text(text)
        for f in tmp.rglob("*"):  # some writers (safetensors) create private files
            if f.is_file():
                os.chmod(f, 0o666 & ~_umask())
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_structure(folder: Path) -> dict:
    """``structure.json`` of ``folder`` with its format checked (pass versions:
    :func:`edgecompress.pipeline.check_pass_versions`)."""
    path = folder / "structure.json"
    try:
        st = json.loads(path.read_text())
        base, ops, passes = st["base"], st["ops"], st.get("passes", [])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is missing or corrupt ({type(e).__name__}: {e})") from None
    if st.get("format") != FORMAT:
        raise UserError(
            f"{path}: structure format {st.get('format')!r}; this edgecompress reads format {FORMAT} "
            "(compress the model again with this version)"
        )
    if not isinstance(base, dict) or not isinstance(ops, list) or not isinstance(passes, list):
        raise UserError(f"{path} is corrupt (base, ops or passes has the wrong type)")
    return st


def load_tensors(model: nn.Module, weights: Path, recorded: dict | None) -> None:
    """Strictly load ``weights`` into the rebuilt ``model`` after checking every tensor's shape.

    The one place where shapes are reconciled: a buffer whose recorded shape differs from the
    rebuilt one (quantizer parameters are created as scalars and saved per channel/head) takes
    the recorded shape; any other mismatch is a one-line error.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_model

    try:
        with safe_open(str(weights), "pt") as f:
            saved = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{weights} is not a valid safetensors file ({str(e).splitlines()[0]})") from None
    for key, shape in saved.items():
        want = (recorded or {}).get(key, {}).get("shape", shape)
        if want != shape:
            raise UserError(f"{weights}: {key} has shape {shape}, structure.json says {want}")
    _fit_buffers(model, saved)
    try:
        load_model(model, str(weights), strict=True)
    except RuntimeError as e:
        raise UserError(f"{weights} does not fit the rebuilt model ({str(e).splitlines()[0]})") from None


def _fit_buffers(model: nn.Module, saved: dict[str, list[int]]) -> None:
    for name, mod in model.named_modules():
        for bname, buf in list(mod._buffers.items()):
            key = f"{name}.{bname}" if name else bname
            if buf is not None and key in saved and list(buf.shape) != saved[key]:
                mod._buffers[bname] = torch.empty(saved[key], dtype=buf.dtype, device=buf.device)
