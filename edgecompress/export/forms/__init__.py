"""Export forms: on a copy of the model, every module with a registered form becomes that form.

* :mod:`.registry` — :func:`register_form` (class-keyed, with a verification category);
* :mod:`.uniform` — uniform quantizers as INT8 Q/DQ pairs (TensorRT: the zero-point-0 offset form);
* :mod:`.linear` — :class:`~edgecompress.models.slots.SlotLinear` with its whole weight chain
  folded, integer weight codes (INT8 or UINT8) where its input is INT8 Q/DQ;
* :mod:`.embedding` — :class:`~edgecompress.models.slots.SlotEmbedding` as a Gather of INT8 codes;
* :mod:`.lut` — log2 / log√2 / AdaLog / TanQ as code computation + table lookup;
* :mod:`.acm` — Adaptive Computation Modules with the gate in the graph, learners masked;
* :mod:`.seer` — SeerAttention cores with the gate and the block mask in the graph, attention masked.

Modules without a form export as their own ``forward`` (a faithful float subgraph).
"""

from __future__ import annotations

import copy

from torch import nn

from edgecompress.export.forms import acm, embedding, linear, lut, seer, uniform  # noqa: F401  (register their forms)
from edgecompress.export.forms.linear import QDQLinear
from edgecompress.export.forms.registry import (
    CATEGORIES,
    DEFAULT_OPTIONS,
    FORMS,
    ExportOptions,
    form_of,
    register_form,
)
from edgecompress.export.forms.uniform import QDQActivation
from edgecompress.structure import set_submodule

__all__ = [
    "CATEGORIES", "FORMS", "ExportOptions", "QDQActivation", "QDQLinear", "export_category",
    "export_module", "form_of", "register_form", "to_export_form",
]  # fmt: skip


def export_module(mod: nn.Module, opts: ExportOptions = DEFAULT_OPTIONS) -> nn.Module:
    """The export form of one module (itself when it has none)."""
    form = form_of(mod)
    return mod if form is None else form.factory(mod, opts)


def export_category(model: nn.Module) -> str:
    """``"quantized"`` if any module's form quantizes, else ``"float"`` (decides the verification bounds)."""
    cats = {f.category for f in map(form_of, model.modules()) if f is not None}
    return "quantized" if "quantized" in cats else "float"


def to_export_form(
    model: nn.Module, opts: ExportOptions = DEFAULT_OPTIONS
) -> tuple[nn.Module, dict[str, int]]:
    """A copy of ``model`` with every registered module in its export form, and a count per form."""
    model = copy.deepcopy(model).eval()
    counts: dict[str, int] = {}
    names = [n for n, m in model.named_modules() if n and form_of(m) is not None]
    done: list[str] = []
    for name in names:
        if any(name.startswith(d + ".") for d in done):  # inside a module already converted
            continue
        new = export_module(model.get_submodule(name), opts)
        set_submodule(model, name, new)
        counts[type(new).__name__] = counts.get(type(new).__name__, 0) + 1
        done.append(name)
    return model, counts
