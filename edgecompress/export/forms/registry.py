"""The class-keyed registry of export forms: what each module becomes in the exported graph.

:func:`register_form` ties a module class to a factory ``factory(module, options) -> nn.Module``
(the export form, a module whose ``forward`` emits ops a runtime understands) and to its
verification category:

* ``"quantized"`` — the form quantizes (Q/DQ pairs, code tables): ORT and PyTorch may round a
  value on a quantization boundary differently, so verification allows rare outlier samples
  (:mod:`edgecompress.export.verify`);
* ``"float"`` — exact float math (a masked weight, a reshaped layer): every sample must match.

Lookup walks the module's class hierarchy, so a subclass of a registered class gets its form.
Adding the export of a new module type is one ``@register_form`` in one file of this package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

CATEGORIES = ("quantized", "float")
TARGETS = ("onnxruntime", "tensorrt")
WEIGHT_DTYPES = ("int8", "uint8")


@dataclass(frozen=True)
class ExportOptions:
    target: str = "onnxruntime"  # "onnxruntime" | "tensorrt"
    weight_dtype: str = "int8"  # "int8" | "uint8" (see forms.uniform)

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype must be one of {WEIGHT_DTYPES}, got {self.weight_dtype!r}")


DEFAULT_OPTIONS = ExportOptions()


@dataclass(frozen=True)
class Form:
    factory: Callable[[nn.Module, ExportOptions], nn.Module]
    category: str


FORMS: dict[type, Form] = {}


def register_form(cls: type, category: str):
    """Decorator: ``factory(module, options)`` exports modules of ``cls`` (and its subclasses)."""
    if category not in CATEGORIES:
        raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")

    def deco(factory):
        FORMS[cls] = Form(factory, category)
        return factory

    return deco


def form_of(mod: nn.Module) -> Form | None:
    for cls in type(mod).__mro__:
        if cls in FORMS:
            return FORMS[cls]
    return None
