"""A :class:`~edgecompress.sparsity.seer.core.SeerAttentionCore` as a graph with the gate and the block mask in it.

The AttnGate (pooling, projections, RoPE at block positions), the block selection (a sort and a
gather give each row's k-th score for ``density``; a comparison for ``threshold``) and the forced
blocks run in the graph, so ONNX Runtime makes the same per-input choices as PyTorch; the attention
is then computed densely with the dropped blocks masked to -inf ("computes densely, masked").
Sequences below ``min_seq_len`` keep every block (a tensor comparison, no graph branch).

No ONNX Runtime operator skips blocks of bidirectional attention: ``com.microsoft.SparseAttention``
is causal-only, needs a KV cache in shared buffers, and its CPU kernel computes the dense product and
then masks (measured slower than dense: ../shared/research/PRUNING-SPARSITY.md §4).
"""

from __future__ import annotations

import torch
from torch import nn

from edgecompress.export.forms.registry import ExportOptions, register_form
from edgecompress.sparsity.seer.core import SeerAttentionCore
from edgecompress.sparsity.seer.dropped import dropped_part, merge
from edgecompress.sparsity.seer.execute import attend_mask, masked_dense


class SeerExport(nn.Module):
    COMPUTE = "computes densely, masked (the AttnGate and the block mask are in the graph)"
    TAKES_POSITIONS = True

    def __init__(self, core: SeerAttentionCore):
        super().__init__()
        self.core = core
        # traced with >= 3 blocks and a partial one: a block count of 1 would be specialised by the exporter
        self.TRACE_MIN_SEQ = 2 * core.block + 1

    def forward(self, q, k, v, bias, scale: float, probs: nn.Module, positions=None) -> torch.Tensor:
        c = self.core
        valid = None
        if bias is not None:
            b4 = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
            valid = attend_mask(b4).any(dim=1).any(dim=1).expand(q.shape[0], -1)  # [B, N] keys any query sees
        keep, allowed = c.choose(q, k, valid, positions)
        if c.min_seq_len:
            short = q.new_ones(q.shape[2]).sum() < c.min_seq_len  # a 0-d tensor: no branch in the graph
            keep = keep | (allowed & short)
        if c.dropped == "mean":  # the dropped blocks' estimates join the softmax (sparsity/seer/dropped.py)
            out, lse = masked_dense(q, k, v, keep, bias, c.causal, scale, c.block, lse=True)
            return merge(out, lse, *dropped_part(q, k, v, keep, c.causal, scale, c.block, None, bias))
        return masked_dense(q, k, v, keep, bias, c.causal, scale, c.block)  # the model's whole mask: bias


@register_form(SeerAttentionCore, "float")
def _seer(core: SeerAttentionCore, opts: ExportOptions) -> nn.Module:
    return SeerExport(core).eval()
