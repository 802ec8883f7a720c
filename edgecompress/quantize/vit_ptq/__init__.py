"""ViT/transformer PTQ passes of the AdaLog family: ``adalog``, ``repq_vit`` and ``dopq_vit``.

One calibration procedure (METHODS.md §1), three sets of defaults:

| pass | softmax (A of A@V) | post-GELU (fc2 input) | post-LN reparameterization |
|---|---|---|---|
| ``adalog`` (ECCV 2024, official code GoatWu/AdaLog) | AdaLog, scale 1, q searched | AdaLog + shift c, joint (q, scale) | mean (RepQ-ViT's) |
| ``repq_vit`` (ICCV 2023) | log√2 | uniform | mean |
| ``dopq_vit`` (arXiv 2408.03291; no code) | TanQ (our construction) | uniform | median (v1 MOSF) |

Speed (fields that change the cost, not the method): ``scoring`` — ``bf16`` (default) scores the
search candidates with bf16 matrix products (AMX on this CPU, tensor cores on a GPU) and re-scores
each search's final survivors in fp32, so the chosen parameters are the fp32 best of the
survivors (measured: objectives within 1.3e-4 of the fp32 search's); ``fp32`` is the reference
path, every candidate in fp32, bit-identical to version 1 before it (see
:mod:`~edgecompress.quantize.vit_ptq.scoring`). Under ``torchrun --nproc_per_node N`` the units'
searches are spread over the processes and the results gathered on every rank
(:mod:`~edgecompress.quantize.vit_ptq.ranks`); one process is the default. ``max_tokens`` (opt-in)
subsamples the calibration tokens — an approximation, unlike the two above. The pass record's
``info.profile`` (report.json; a table in report.md) gives the seconds per step (capture, reparam,
weight and input searches, q@kᵀ and A@V searches) in total and per unit, with the rank that ran it.

Every choice is a field, so an ablation is one recipe line: ``softmax_quantizer`` (adalog, log2,
logsqrt2, tanq, uniform), ``post_gelu`` (adalog, uniform), ``reparam`` (mean, median, mad, none).
Weights: asymmetric uniform per output channel. Linear inputs, Q, K, V: asymmetric uniform (per
tensor; Q/K/V per head). All searched with FPCS against the layer's output MSE on float inputs.

Procedure (:mod:`~edgecompress.quantize.vit_ptq.calibrate`): make attention explicit; make the
targeted Linears SlotLinears; find the units (:mod:`edgecompress.models.graph`); then, block by
block in module order, capture the block's float inputs (first ``calib_samples`` samples of the
loop; padding tokens of text batches dropped, attention operands grouped by sequence length;
:func:`edgecompress.calib.capture`) and search each unit
(:mod:`~edgecompress.quantize.vit_ptq.objectives`, :mod:`~edgecompress.quantize.vit_ptq.attn`).
Post-LN inputs are first calibrated per channel, folded into the LayerNorm and its Linears (kept
only if the model output is unchanged), then searched per tensor. Quantizers are installed after
every block is calibrated, so all searches see full-precision inputs as in the official code. The
report carries, per quantizer, the layer's output SQNR on float inputs (``layer_sqnr_db``), the
alternation rounds its search ran (``search_rounds``; fewer than asked where it reached a fixed
point) and, for Linears, the SQNR of the layer output inside the fully quantized model
(``model_sqnr_db``) on up to 8 example samples.

Quantizers go into the slots (:mod:`edgecompress.models.slots`) after anything an earlier pass
put there (an N:M mask: the weight search sees the masked weight, and zeros stay exactly zero
since every zero-point is an integer inside the code range); a replaced attention core without a
softmax slot gets q, k and v quantized only.

Not quantized here: convolutions (the patch embedding stays float; the papers quantize its weights
and 8-bit input) and grouped-query attention (K/V with fewer heads than Q is refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import nn

from edgecompress.pipeline import Context, register_pass
from edgecompress.quantize.ptq import check_bits
from edgecompress.quantize.vit_ptq.calibrate import calibrate_

Scoring = Literal["bf16", "fp32"]
SoftmaxQ = Literal["adalog", "log2", "logsqrt2", "tanq", "uniform"]
PostGelu = Literal["adalog", "uniform"]
Reparam = Literal["mean", "median", "mad", "none"]


@dataclass(frozen=True)
class _ViTPTQBase:
    """Fields shared by the three passes (see the module docstring)."""

    family: ClassVar[str] = "quantize"
    VERSION: ClassVar[int] = 1
    needs_data: ClassVar[bool] = True

    w_bits: int = 4
    a_bits: int = 4
    calib_samples: int = 32
    softmax_quantizer: SoftmaxQ = "adalog"
    post_gelu: PostGelu = "adalog"
    reparam: Reparam = "mean"
    search_rounds: int = 3
    max_tokens: int | None = None  # subsample calibration tokens (speed); None = all, as the papers
    scoring: Scoring = "bf16"  # candidate products in bf16, survivors re-scored in fp32; fp32: reference
    threads: int = 0  # intra-op threads during calibration; 0 = leave torch's setting
    seed: int = 0
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ()

    def __post_init__(self):
        check_bits(self.w_bits, self.a_bits)
        if self.calib_samples < 1 or self.search_rounds < 1:
            raise ValueError("calib_samples and search_rounds must be ≥ 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be ≥ 1 or null")
        if self.threads < 0:
            raise ValueError("threads must be ≥ 0")

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        return calibrate_(self, model, ctx)


@register_pass
@dataclass(frozen=True)
class AdaLogPTQ(_ViTPTQBase):
    """AdaLog (ECCV 2024; official code GoatWu/AdaLog, calibration-only numbers, no block reconstruction)."""

    name: ClassVar[str] = "adalog"


@register_pass
@dataclass(frozen=True)
class RepQViTPTQ(_ViTPTQBase):
    """RepQ-ViT (ICCV 2023): mean reparameterization + log√2 softmax, in AdaLog's FPCS calibration."""

    name: ClassVar[str] = "repq_vit"
    softmax_quantizer: SoftmaxQ = "logsqrt2"
    post_gelu: PostGelu = "uniform"


@register_pass
@dataclass(frozen=True)
class DopQViTPTQ(_ViTPTQBase):
    """DopQ-ViT (arXiv 2408.03291 v1 MOSF = median; TanQ as our companded construction; no block
    reconstruction, so not comparable with the paper's reconstructed numbers)."""

    name: ClassVar[str] = "dopq_vit"
    softmax_quantizer: SoftmaxQ = "tanq"
    post_gelu: PostGelu = "uniform"
    reparam: Reparam = "median"
