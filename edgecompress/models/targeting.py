"""One targeting language for every pass's ``targets`` / ``ignore``.

Entries are matched against a module's qualified name and class:

* ``"blocks.0.mlp.fc1"`` — an exact module name;
* ``"re:.*mlp.*"`` — a regular expression that must match the whole name;
* ``"Linear"`` — a class name (the module's class or any of its bases, so a compressed
  :class:`~edgecompress.models.slots.SlotLinear` still matches ``Linear``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from edgecompress.errors import UserError


def _class_names(module: nn.Module) -> set[str]:
    return {c.__name__ for c in type(module).__mro__}


def is_name_pattern(pattern: str) -> bool:
    """Whether ``pattern`` names modules (exact name or ``re:``) rather than a class."""
    return pattern.startswith("re:") or "." in pattern or pattern[:1].islower()


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


def explicitly_named(name: str, patterns: Iterable[str]) -> bool:
    """Whether ``name`` is listed by its exact name (not matched by a class or a regex)."""
    return any(p == name for p in patterns)


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
