"""``uniform_ptq``: the baseline uniform post-training quantization every method is compared with.

Weights: asymmetric (or symmetric) uniform, per output channel, min/max; ``symmetric`` makes weights
and activations symmetric (zero-point 0 after export, TensorRT's form), ``symmetric_weights`` only
the weights (OpenVINO's INT8 form: symmetric weights, activations with their zero-point; see
:mod:`edgecompress.export.openvino`). Activations: per tensor
at the inputs of every targeted Linear and of both attention matmuls (q, k, softmax output, v;
``attention_inputs`` picks a subset, e.g. ``[q, k]`` for q·kᵀ alone as NNCF does for transformers;
``symmetric_attention`` makes q, k and v symmetric, zero-point 0, which a runtime needs to run a
matmul of two activations in INT8, e.g. OpenVINO; both only with ``quantize_attention``), with
``observer`` = ``minmax``, ``percentile`` (clip to the ``percentile``/100 and
(100 − ``percentile``)/100 quantiles) or ``mse`` (clip ratio minimizing the quantization MSE of the
calibration sample). All statistics come from one run of ``ctx.forward_loop`` on the float model,
on real tokens only (padding tokens of text batches are left out: :func:`edgecompress.calib.observe`).

``smooth_alpha`` (0 = off): SmoothQuant before quantizing (:mod:`edgecompress.quantize.smooth`):
per-channel factors ``s`` move activation outliers of the chosen Linears' inputs
(``smooth_targets``: ``post_norm``, the paper's QKV/FC1, or ``all``) into their weights; the
activation quantizer then calibrates on ``x / s``.

``embedding_bits`` (0 = keep float): every targeted ``nn.Embedding`` table (``embedding_targets``)
is quantized per row (one asymmetric min/max scale and zero-point per vocabulary entry, the form
ORT/TensorRT deployments use for INT8 embedding tables), stored as integer codes and exported as a
``Gather`` of the codes and of their row parameters followed by the dequantization
(:mod:`edgecompress.export.forms.embedding`). Tables tied to another module's weight (an LM head)
stay float, with a note. Embedding outputs are not activation-quantized (they feed a LayerNorm or a
residual sum, not a matmul).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from edgecompress.calib import ActivationStats, example_run, observe
from edgecompress.errors import UserError
from edgecompress.models.attention import SLOT_ROLES, adapters, explicit_attention_
from edgecompress.models.embedding import SlotEmbedding, slot_embeddings
from edgecompress.models.slots import (
    QUANTIZER,
    SlotLinear,
    add_to_chain,
    slot_linears,
)
from edgecompress.pipeline import Context, register_pass
from edgecompress.quantize.modules import UniformQuantizer, sqnr_db
from edgecompress.quantize.smooth import check_smooth, smooth_
from edgecompress.quantize.uniform import mse_search_range, params_from_range, weight_params

ATTENTION_ROLES = ("attn_q", "attn_k", "attn_probs", "attn_v")
MIN_BITS, MAX_BITS = 2, 8


def check_bits(w_bits: int, a_bits: int) -> None:
    for field_name, b in (("w_bits", w_bits), ("a_bits", a_bits)):
        if not MIN_BITS <= b <= MAX_BITS:
            raise ValueError(f"{field_name} must be in [{MIN_BITS}, {MAX_BITS}], got {b}")


def quantizable_linears(model: nn.Module, targets, ignore, ctx: Context) -> list[str]:
    """Every targeted Linear as a :class:`SlotLinear` whose chains hold no quantizer yet.

    Linears that cannot be swapped or that the model never calls are noted in the pass report
    (``not quantized``); a Linear an earlier pass already
    quantized is a one-line error (the order check lets only passes with different targets meet).
    """
    names, skipped = slot_linears(model, targets, ignore, example_run(ctx))
    for name, why in skipped:
        ctx.notes.append(f"{name}: not quantized ({why})")
    for name in names:
        layer: SlotLinear = model.get_submodule(name)
        if layer.weight_chain.find(QUANTIZER) is not None or layer.input_chain.find(QUANTIZER) is not None:
            raise UserError(f"{name} is already quantized by an earlier pass (exclude it with ignore)")
    return names


def check_embedding_bits(bits: int) -> None:
    if bits != 0 and not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"embedding_bits must be 0 (keep float) or in [{MIN_BITS}, {MAX_BITS}], got {bits}")


def quantize_embeddings(model: nn.Module, ctx: Context, bits: int, targets, ignore) -> list[str]:
    """Per-row asymmetric min/max quantization of every targeted embedding table (``bits`` 0: none)."""
    if not bits:
        return []
    names, skipped = slot_embeddings(model, targets, ignore, example_run(ctx))
    for name, why in skipped:
        ctx.notes.append(f"{name}: not quantized ({why})")
    for name in names:
        emb: SlotEmbedding = model.get_submodule(name)
        if emb.weight_chain.find(QUANTIZER) is not None:
            raise UserError(f"{name} is already quantized by an earlier pass (exclude it with ignore)")
        w = emb.effective_weight()
        q = UniformQuantizer(bits, False, "channel", "embedding")
        q.set_params(*weight_params(w, bits, False))
        q.stats = {"sqnr_db": round(sqnr_db(w, q(w)), 2)}
        add_to_chain(model, f"{name}.weight_chain", q)
    return names


def attention_slots(model: nn.Module, ctx: Context, inputs=tuple(SLOT_ROLES)) -> list[str]:
    """Names of the attention slots to quantize: those of ``inputs`` (q, k, v, probs), probs only
    where the core exposes it."""
    out = []
    for name, adapter in adapters(model):
        for slot in inputs:
            chain = getattr(adapter, slot)
            if slot == "probs" and not getattr(adapter.core, "SUPPORTS_PROBS", False):
                ctx.notes.append(
                    f"{name}.probs: not quantized ({type(adapter.core).__name__} fuses the softmax)"
                )
                continue
            if chain.find(QUANTIZER) is not None:
                raise UserError(f"{name}.{slot} is already quantized by an earlier pass")
            out.append(f"{name}.{slot}")
    return out


def activation_params(stats: ActivationStats, bits: int, symmetric: bool, observer: str, percentile: float):
    lo, hi = torch.tensor(stats.lo), torch.tensor(stats.hi)
    if observer == "percentile":
        q = torch.tensor([1 - percentile / 100, percentile / 100])
        lo, hi = torch.quantile(stats.sample, q)
    if observer == "mse":
        return mse_search_range(stats.sample, lo, hi, bits, symmetric)
    return params_from_range(lo, hi, bits, symmetric)


@register_pass
@dataclass(frozen=True)
class UniformPTQ:
    """Uniform min/max-style PTQ of Linear layers and attention matmuls (W8A8 … W2A2)."""

    name: ClassVar[str] = "uniform_ptq"
    needs_data: ClassVar[bool] = True

    family: ClassVar[str] = "quantize"
    VERSION: ClassVar[int] = 1

    w_bits: int = 8
    a_bits: int = 8
    observer: Literal["minmax", "percentile", "mse"] = "minmax"
    percentile: float = 99.99
    symmetric: bool = False
    symmetric_weights: bool = False
    quantize_attention: bool = True
    attention_inputs: tuple[str, ...] = tuple(SLOT_ROLES)
    symmetric_attention: bool = False
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ()
    embedding_bits: int = 0
    embedding_targets: tuple[str, ...] = ("Embedding",)
    smooth_alpha: float = 0.0
    smooth_targets: str = "post_norm"

    def __post_init__(self):
        check_bits(self.w_bits, self.a_bits)
        check_smooth(self.smooth_alpha, self.smooth_targets)
        check_embedding_bits(self.embedding_bits)
        unknown = sorted(set(self.attention_inputs) - set(SLOT_ROLES))
        if unknown or not self.attention_inputs:
            raise UserError(
                f"attention_inputs must be a non-empty subset of {', '.join(SLOT_ROLES)}, got {list(self.attention_inputs)}"
            )
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        if self.quantize_attention:
            explicit_attention_(model)
        linears = quantizable_linears(model, self.targets, self.ignore, ctx)
        smoothed = (
            smooth_(model, linears, ctx, self.smooth_alpha, self.smooth_targets) if self.smooth_alpha else []
        )
        if smoothed:
            ctx.notes.append(f"SmoothQuant α={self.smooth_alpha}: {len(smoothed)} Linear inputs smoothed")
        for name in linears:
            layer: SlotLinear = model.get_submodule(name)
            w = layer.effective_weight()  # after any earlier mask: zeros stay exactly zero
            sym = self.symmetric or self.symmetric_weights
            wq = UniformQuantizer(self.w_bits, sym, "channel", "weight")
            wq.set_params(*weight_params(w, self.w_bits, sym))
            wq.stats = {"sqnr_db": round(sqnr_db(w, wq(w)), 2)}
            add_to_chain(model, f"{name}.weight_chain", wq)
        quantize_embeddings(model, ctx, self.embedding_bits, self.embedding_targets, self.ignore)
        act_points = [f"{n}.input_chain" for n in linears]
        if self.quantize_attention:
            act_points += attention_slots(model, ctx, self.attention_inputs)
        # a smoothed input is quantized after its 1/s: observe the output of that scale
        after = {f"{n}.input_chain": f"{n}.input_chain.0" for n in smoothed}
        at = [after.get(p, p) for p in act_points]
        stats = observe(model, at, ctx.forward_loop, seed=ctx.seed, outputs=frozenset(after.values()))
        for name in act_points:
            role = model.get_submodule(name).role
            st = stats[after.get(name, name)]
            if st.sample is None:  # the slot never ran (e.g. an unused head): leave it float
                ctx.notes.append(f"{name}: not quantized (never ran on the calibration data)")
                continue
            sym = role != "attn_probs" and (
                self.symmetric or (self.symmetric_attention and role in ATTENTION_ROLES)
            )
            q = UniformQuantizer(self.a_bits, sym, "tensor", role)
            q.set_params(*activation_params(st, self.a_bits, sym, self.observer, self.percentile))
            q.stats = {"sqnr_db": round(sqnr_db(st.sample, q(st.sample)), 2), "observer": self.observer}
            add_to_chain(model, name, q)
        return model
