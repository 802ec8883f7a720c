"""A :class:`~edgecompress.models.slots.SlotEmbedding` as a ``Gather`` of integer codes.

With a per-row uniform quantizer (``uniform_ptq``'s ``embedding_bits``) the table is exported as
INT8 codes ``q − 2^(b−1)`` ``[V, D]`` and per-row float scales and zero-points ``[V, 1]``; the
graph gathers the rows of all three for the token ids and dequantizes only them:
``(Cast(Gather(codes)) − Gather(zp)) · Gather(scale)`` — the float operations of the PyTorch
quantizer, so both compute the same values. A ``DequantizeLinear`` cannot express this: its
per-axis parameters index the *table's* rows, so it would have to dequantize all ``V`` rows on
every call (11.7 M values for MiniLM's vocabulary) before the ``Gather``. Any other weight chain
exports its float values (a plain ``Gather``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgecompress.export.forms.registry import ExportOptions, register_form
from edgecompress.models.embedding import SlotEmbedding
from edgecompress.quantize.modules import UniformQuantizer
from edgecompress.quantize.uniform import quantize_uniform


class QDQEmbedding(nn.Module):
    """Gather of INT8 codes + per-row dequantization (or of the float table)."""

    def __init__(self, emb: SlotEmbedding):
        super().__init__()
        q = emb._row_quantizer()
        self.int8 = isinstance(q, UniformQuantizer) and q.bits <= 8
        self.padding_idx = emb.padding_idx
        if not self.int8:
            self.register_buffer("table", emb.effective_weight().float().contiguous())
            return
        off = 2 ** (q.bits - 1)
        codes = quantize_uniform(emb.weight.detach().float(), q.scale.float(), q.zero_point.float(), q.bits)
        self.register_buffer("codes", (codes - off).to(torch.int8).contiguous())  # [V, D]
        self.register_buffer("scale", q.scale.float().reshape(-1, 1).contiguous())  # [V, 1]
        self.register_buffer("zp", (q.zero_point.float().reshape(-1, 1) - off).contiguous())  # [V, 1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.int8:
            return F.embedding(ids, self.table)
        rows = F.embedding(ids, self.codes).float()  # one ONNX Gather each
        return (rows - F.embedding(ids, self.zp)) * F.embedding(ids, self.scale)


@register_form(SlotEmbedding, "float")  # its quantizer carries the "quantized" category itself
def _slot_embedding(emb: SlotEmbedding, opts: ExportOptions) -> nn.Module:
    return QDQEmbedding(emb)
