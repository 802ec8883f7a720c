"""One targeting language, one module-swap helper, one structure map.

``targets`` / ``ignore`` entries are matched against a module's qualified name and class:

* ``"blocks.0.mlp.fc1"`` — an exact module name;
* ``"re:.*mlp.*"`` — a regular expression that must match the whole name;
* ``"Linear"`` — a class name (the module's class or any of its bases).

Every swap goes through :func:`replace_module`, which records ``{"op": "swap", "name", "cls",
"config"}`` in the model's structure map; classes that can be swapped in register with
:func:`register_swap` and implement ``swap_config() -> dict`` and
``from_swap(original, config) -> nn.Module``. :func:`edgecompress.pipeline.restore` replays the
map on the base architecture and then loads the saved tensors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from edgecompress.errors import UserError

SWAPS: dict[str, type] = {}
_STRUCTURE_ATTR = "_ec_structure"


def register_swap(cls: type) -> type:
    """Make ``cls`` rebuildable from ``structure.json`` (needs ``swap_config`` and ``from_swap``)."""
    if not (hasattr(cls, "swap_config") and hasattr(cls, "from_swap")):
        raise TypeError(f"{cls.__name__} needs swap_config() and from_swap()")
    SWAPS[cls.__name__] = cls
    return cls


def _class_names(module: nn.Module) -> set[str]:
    return {c.__name__ for c in type(module).__mro__}


def matches(name: str, module: nn.Module, patterns: Iterable[str]) -> bool:
    for p in patterns:
        if p.startswith("re:"):
            try:
                if re.fullmatch(p[3:], name):
                    return True
            except re.error as e:
                raise UserError(f"invalid regular expression {p!r}: {e}") from None
        elif p == name or p in _class_names(module):
            return True
    return False


def select_modules(
    model: nn.Module, targets: Iterable[str], ignore: Iterable[str] = ()
) -> list[tuple[str, nn.Module]]:
    """Modules matching any of ``targets`` and none of ``ignore``, in module order."""
    targets, ignore = list(targets), list(ignore)
    return [
        (name, mod)
        for name, mod in model.named_modules()
        if name and matches(name, mod, targets) and not matches(name, mod, ignore)
    ]


def structure_of(model: nn.Module) -> dict:
    """The model's structure map: ``{"base": {...}, "ops": [...]}`` (created empty on first use)."""
    st = model.__dict__.get(_STRUCTURE_ATTR)
    if st is None:
        st = {"base": None, "ops": []}
        model.__dict__[_STRUCTURE_ATTR] = st
    return st


def record_op(model: nn.Module, op: dict) -> None:
    structure_of(model)["ops"].append(op)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Swap the submodule ``name`` for ``new`` and record the swap; returns ``new``."""
    if type(new).__name__ not in SWAPS:
        raise TypeError(f"{type(new).__name__} is not a registered swap class")
    set_submodule(model, name, new)
    record_op(model, {"op": "swap", "name": name, "cls": type(new).__name__, "config": new.swap_config()})
    return new


def replay(model: nn.Module, ops: list[dict]) -> nn.Module:
    """Re-apply recorded ops (structure.json) to a freshly built base model."""
    from edgecompress.models.attention import explicit_attention_

    for i, op in enumerate(ops):
        kind = op.get("op")
        if kind == "explicit_attention":
            explicit_attention_(model)
        elif kind == "swap":
            cls = SWAPS.get(op.get("cls"))
            if cls is None:
                raise UserError(f"structure.json ops[{i}]: unknown module class {op.get('cls')!r}")
            try:
                original = model.get_submodule(op["name"])
            except AttributeError:
                raise UserError(f"structure.json ops[{i}]: the model has no module {op['name']!r}") from None
            replace_module(model, op["name"], cls.from_swap(original, op["config"]))
        else:
            raise UserError(f"structure.json ops[{i}]: unknown op {kind!r}")
    return model
