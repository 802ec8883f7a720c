"""Slots: the places in a model where a pass may insert a quantizer, a mask or a gate.

A slot is a :class:`Chain`: modules applied in order to one tensor (empty = identity). A pass
adds to a chain (:func:`add_to_chain`, recorded as an ``append`` op); a later pass adds after it,
so passes compose instead of overwriting each other. Chain elements declare what they are with a
class attribute ``SLOT_KIND`` (``"quantizer"``, ``"mask"``, ...); a chain holds at most one
quantizer and a mask must come before it.

A compressed Linear is still an ``nn.Linear`` (optimum-quanto's habit): :class:`SlotLinear` adds
a weight chain (mask, quantizer, ...) and an input chain (quantizer, ...) and computes
``F.linear(input_chain(x), weight_chain(W), b)``, so ``targets: [Linear]`` keeps matching after
any number of passes, and export folds the whole chain.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from edgecompress.errors import UserError
from edgecompress.models.targeting import select_modules
from edgecompress.quantize.uniform import sqnr_db
from edgecompress.structure import append_module, register_swap, replace_module

QUANTIZER, MASK = "quantizer", "mask"


class Chain(nn.ModuleList):
    """Modules applied in order to one tensor; ``role`` says what flows through it (``"linear_in"``,
    ``"linear_weight"``, ``"attn_q"``, ``"attn_k"``, ``"attn_v"``, ``"attn_probs"``)."""

    def __init__(self, role: str, modules=None):
        super().__init__(modules)
        self.role = role

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self:
            x = m(x)
        return x

    def find(self, kind: str) -> nn.Module | None:
        """The first element whose ``SLOT_KIND`` is ``kind``."""
        return next((m for m in self if getattr(m, "SLOT_KIND", None) == kind), None)

    def extra_repr(self) -> str:
        return f"role={self.role!r}"


# Linear subclasses whose forward is exactly F.linear(x, weight, bias): safe to swap. Others (LoRA
# wrappers, nn.MultiheadAttention's out_proj, which its parent never calls) are left alone.
_PLAIN_LINEAR_NAMES = {"torch.nn.modules.linear.Linear", "timm.layers.linear.Linear"}


def swappable(mod: nn.Module) -> bool:
    cls = type(mod)
    return isinstance(mod, SlotLinear) or f"{cls.__module__}.{cls.__qualname__}" in _PLAIN_LINEAR_NAMES


@register_swap
class SlotLinear(nn.Linear):
    """``F.linear(input_chain(x), weight_chain(W), b)``: an ``nn.Linear`` with two slots."""

    VERSION: ClassVar[int] = 1

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        nn.Module.__init__(self)  # no nn.Linear init: parameters are adopted or loaded, never drawn
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.weight_chain = Chain("linear_weight")
        self.input_chain = Chain("linear_in")

    @classmethod
    def adopt(cls, linear: nn.Linear) -> SlotLinear:
        """A SlotLinear sharing ``linear``'s parameter objects (empty chains)."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xi, w = self.input_chain(x), self.weight_chain(self.weight)
        if self._exact_product() and not (torch.is_grad_enabled() and (xi.requires_grad or w.requires_grad)):
            y = F.linear(xi.double(), w.double()).to(xi.dtype)
            return y if self.bias is None else y + self.bias
        return F.linear(xi, w, self.bias)

    def _exact_product(self) -> bool:
        """Both operands quantized: inference computes the product exactly, as integer kernels do.

        The quantized layer *is* ``(qa − za)·sa · (qw − zw)·sw`` summed; an INT8 runtime sums the
        integer products exactly and rounds once. A float32 matmul of the dequantized values rounds
        at every partial sum instead (error ~√K ulps, worse under cancellation), and in a quantized
        network every such difference can move a value across a code boundary and cascade. Products
        of two float32 numbers are exact in float64 and K ≤ 10⁵ terms sum there with error far below
        one float32 ulp, so the float64 product rounded to float32 is the integer kernel's value to
        within its final rounding. Measured on MiniLM W8A8: ONNX Runtime (integer kernels) vs
        PyTorch, mean cosine 0.99896 with float32 products, 0.99937 with exact ones.
        """
        return self.input_chain.find(QUANTIZER) is not None and self.weight_chain.find(QUANTIZER) is not None

    def effective_weight(self) -> torch.Tensor:
        """The weight the layer computes with (after its whole weight chain), without gradients."""
        with torch.no_grad():
            return self.weight_chain(self.weight).detach()

    def swap_config(self) -> dict:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
        }

    @classmethod
    def from_swap(cls, original, config: dict) -> SlotLinear:
        if isinstance(original, nn.Linear) and not isinstance(original, SlotLinear):
            return cls.adopt(original)
        return cls(**config)

    def _packer(self) -> nn.Module | None:
        """The weight-chain element that stores the weight in a packed form (an N:M mask), if any."""
        return next((m for m in self.weight_chain if callable(getattr(m, "pack_weight", None))), None)

    def _codec(self) -> tuple[int, nn.Module] | None:
        """(index, quantizer) when the weight can be stored as integer codes: a quantizer with
        ``encode_weight`` last in the weight chain, after nothing but a packer."""
        chain = list(self.weight_chain)
        if not chain or not callable(getattr(chain[-1], "encode_weight", None)):
            return None
        if len(chain) > 2 or (len(chain) == 2 and chain[0] is not self._packer()):
            return None
        return len(chain) - 1, chain[-1]

    def _codes_key(self, packer) -> str:
        return "weight_nm_codes" if packer is not None else "weight_codes"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """The weight as stored: N:M-packed (kept values + positions) and/or as integer codes.

        Codes are stored only where the restored weight computes bit-identically (the
        straight-through form ``w + (q(w) − w)`` can differ from ``q(w)`` by an ulp for clipped
        values); otherwise that layer keeps float values. ``weight_sqnr_db`` keeps the quantization
        error, which the restored (already quantized) weight no longer shows.
        """
        super()._save_to_state_dict(destination, prefix, keep_vars)
        packer, codec = self._packer(), self._codec()
        if packer is None and codec is None:
            return
        w = destination.pop(prefix + "weight").detach()
        parts = packer.pack_weight(w) if packer is not None else {"": w}
        vkey = "nm_values" if packer is not None else ""
        if codec is not None:
            q = codec[1]
            values = parts[vkey]
            codes = q.encode_weight(values)
            if codes is not None:
                back = q.decode_weight(codes, q.scale, q.zero_point, values.shape).to(values.dtype)
                with torch.no_grad():
                    if torch.equal(q(back), q(values)):
                        del parts[vkey]
                        destination[prefix + self._codes_key(packer)] = codes
                        destination[prefix + "weight_sqnr_db"] = torch.tensor(sqnr_db(values, q(values)))
        for key, value in parts.items():
            destination[f"{prefix}weight_{key}" if key else prefix + "weight"] = value

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        packer, codec = self._packer(), self._codec()
        codes_key = prefix + self._codes_key(packer)
        if codec is not None and codes_key in state_dict:
            i, q = codec
            scale = state_dict[f"{prefix}weight_chain.{i}.scale"]
            zero_point = state_dict[f"{prefix}weight_chain.{i}.zero_point"]
            shape = packer.values_shape() if packer is not None else (self.out_features, self.in_features)
            values = q.decode_weight(state_dict.pop(codes_key), scale, zero_point, shape).to(
                self.weight.dtype
            )
            state_dict[prefix + ("weight_nm_values" if packer is not None else "weight")] = values
            self.saved_sqnr_db = float(state_dict.pop(prefix + "weight_sqnr_db", torch.tensor(float("nan"))))
        keys = [f"{prefix}weight_{k}" for k in getattr(packer, "PACKED_KEYS", ())]
        if packer is not None and all(k in state_dict for k in keys):
            parts = {k[len(prefix) + len("weight_") :]: state_dict.pop(k) for k in keys}
            state_dict[prefix + "weight"] = packer.unpack_weight(parts).to(self.weight.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def weight_quantizer(self) -> nn.Module | None:
        return self.weight_chain.find(QUANTIZER)

    def input_quantizer(self) -> nn.Module | None:
        return self.input_chain.find(QUANTIZER)

    def deployed_bytes(self) -> int:
        """Weight bytes at the weight quantizer's bit width plus the chains' parameters, bias as stored."""
        wq, packer = self.weight_quantizer(), self._packer()
        bits = getattr(wq, "bits", self.weight.element_size() * 8)
        numel = self.weight.numel()
        n = packer.weight_bytes(numel, bits) if packer is not None else numel * bits // 8
        n += _saved_buffer_bytes(self.weight_chain) + _saved_buffer_bytes(self.input_chain)
        return n + (self.bias.numel() * self.bias.element_size() if self.bias is not None else 0)

    def describe(self) -> dict:
        row = {
            "layer": "SlotLinear",
            "shape": [self.out_features, self.in_features],
            "w_bits": getattr(self.weight_quantizer(), "bits", None),
            "a_bits": getattr(self.input_quantizer(), "bits", None),
            "bytes": self.deployed_bytes(),
        }
        packer = self._packer()
        if packer is not None:
            row["sparsity"] = packer.describe().get("sparsity", "")
        wq = self.weight_quantizer()
        if getattr(self, "saved_sqnr_db", None) is not None:  # restored from codes: the saved figure
            row["weight_sqnr_db"] = round(self.saved_sqnr_db, 2)
        elif wq is not None:  # quantization error of the weight the quantizer sees (after any mask)
            with torch.no_grad():
                w = self.weight.detach()
                for m in self.weight_chain:
                    if m is wq:
                        break
                    w = m(w)
                row["weight_sqnr_db"] = round(sqnr_db(w, wq(w)), 2)
        return row


def _saved_buffer_bytes(module: nn.Module) -> int:
    """Bytes of the persistent buffers under ``module`` (an N:M mask is rebuilt from the packed
    positions, so it is not saved and not counted)."""
    return sum(
        b.numel() * b.element_size()
        for m in module.modules()
        for name, b in m._buffers.items()
        if b is not None and name not in m._non_persistent_buffers_set
    )


def as_slot_linear(model: nn.Module, name: str) -> SlotLinear | None:
    """The SlotLinear at ``name``, swapping a plain ``nn.Linear`` in (recorded); None if not swappable."""
    mod = model.get_submodule(name)
    if isinstance(mod, SlotLinear):
        return mod
    if not swappable(mod):
        return None
    return replace_module(model, name, SlotLinear.adopt(mod))


def called(model: nn.Module, names: list[str], run) -> set[str]:
    """The modules among ``names`` whose forward runs when ``run(model)`` does (forward pre-hooks)."""
    hits: set[str] = set()
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: hits.add(n)) for n in names]
    was_training = model.training
    model.eval()  # no dropout draws: the probe leaves the RNG stream alone
    try:
        with torch.no_grad():
            run(model)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return hits


NOT_CALLED = "never called: its parent computes with its weight directly, so a slot there would not run"


def slot_linears(model: nn.Module, targets, ignore, run=None) -> tuple[list[str], list[tuple[str, str]]]:
    """Every targeted Linear as a SlotLinear: (names, [(name, why skipped)]).

    With ``run(model)`` (one forward on example data), a Linear whose forward never runs (timm EVA's
    ``F.linear(x, self.qkv.weight, bias)``, nn.MultiheadAttention's out_proj) is skipped, so no
    pass claims a quantizer or mask that the model would not execute.
    """
    linears = [(n, m) for n, m in select_modules(model, targets, ignore) if isinstance(m, nn.Linear)]
    ran = called(model, [n for n, _ in linears], run) if run is not None else {n for n, _ in linears}
    names, skipped = [], []
    for name, mod in linears:
        if name not in ran:
            skipped.append((name, NOT_CALLED))
        elif as_slot_linear(model, name) is None:
            skipped.append((name, f"{type(mod).__name__} is not a plain Linear (custom forward)"))
        else:
            names.append(name)
    return names, skipped


def chains(model: nn.Module, roles: tuple[str, ...] | None = None) -> list[tuple[str, Chain]]:
    """Every chain whose role is in ``roles`` (all if None), in module order."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, Chain) and (roles is None or m.role in roles)
    ]


def add_to_chain(model: nn.Module, chain: str, module: nn.Module) -> nn.Module:
    """Append ``module`` to the chain at ``chain`` (recorded), keeping one quantizer per chain, last."""
    target = model.get_submodule(chain)
    kind = getattr(module, "SLOT_KIND", None)
    if target.find(QUANTIZER) is not None:
        what = "quantized" if kind == QUANTIZER else f"quantized, so a {kind} cannot follow"
        raise UserError(
            f"{chain} is already {what} (an earlier pass put a quantizer there; exclude it with ignore)"
        )
    return append_module(model, chain, module)

