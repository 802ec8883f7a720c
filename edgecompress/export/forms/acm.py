"""An :class:`~edgecompress.sparsity.acm.modules.ACMMLP` as a graph with the gate in it.

The gate runs in the graph (``ArgMax`` over its logits gives each token's ``k``), so ONNX Runtime
makes the same per-token decisions as PyTorch. Two forms; the export JSON says which (``COMPUTE``):

* :class:`ACMSkipExport` (ONNX Runtime, float learners): per learner ``n``, the tokens with
  ``k > n`` (``NonZero``) are gathered, run through that learner's slices of the weights and
  scatter-added into the output (``ScatterND`` add) — the graph skips the unexecuted work. Measured
  on ORT CPU (384 → 4×384, 4096 tokens, executed fraction 0.49): 0.68× the masked graph's time;
* :class:`ACMExport` (TensorRT, or learners in their own quantized forms, which cannot be sliced):
  every learner computed, the hidden units of unexecuted learners multiplied by 0 — "computes
  densely, masked".
"""

from __future__ import annotations

import torch
from torch import nn

from edgecompress.export.forms.registry import ExportOptions, register_form
from edgecompress.sparsity.acm.execute import ACTIVATIONS
from edgecompress.sparsity.acm.modules import ACMMLP


class ACMExport(nn.Module):
    COMPUTE = "computes densely, masked (the gate's per-token choices are in the graph)"

    def __init__(self, acm: ACMMLP, opts: ExportOptions):
        from edgecompress.export.forms import export_module

        super().__init__()
        self.fc1, self.fc2 = export_module(acm.fc1, opts), export_module(acm.fc2, opts)
        self.fc_up = None if acm.fc_up is None else export_module(acm.fc_up, opts)
        self.gate1, self.gate2 = export_module(acm.gate.fc1, opts), export_module(acm.gate.fc2, opts)
        self.bias2 = (
            None if acm.bias2 is None else nn.Parameter(acm.bias2.detach().clone(), requires_grad=False)
        )
        self.act, self.k_min, self.fixed_k, self.d_out = acm.act, acm.k_min, acm.fixed_k, acm.d_out
        learner = torch.arange(acm.n_learners).repeat_interleave(acm.h)  # [L*h]
        self.register_buffer("learner", learner.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [T, d]
        if self.fixed_k is None:
            k = (
                self.gate2(nn.functional.gelu(self.gate1(flat))).argmax(-1, keepdim=True) + self.k_min
            )  # [T, 1]
            keep = (self.learner[None, :] < k.to(flat.dtype)).to(flat.dtype)  # [T, L*h]
        else:
            keep = (self.learner < self.fixed_k).to(flat.dtype)[None, :]
        hid = ACTIVATIONS[self.act](self.fc1(flat))
        if self.fc_up is not None:
            hid = hid * self.fc_up(flat)
        out = self.fc2(hid * keep)
        if self.bias2 is not None:
            out = out + self.bias2
        return out.reshape(*shape[:-1], self.d_out)


class ACMSkipExport(nn.Module):
    COMPUTE = "skips compute: per learner, only the tokens that execute it (NonZero, Gather, ScatterND add)"

    def __init__(self, acm: ACMMLP):
        super().__init__()
        self.w1 = nn.Parameter(acm.fc1.weight.detach().clone(), requires_grad=False)  # [L*h, d]
        self.b1 = nn.Parameter(acm.fc1.bias.detach().clone(), requires_grad=False)
        up = acm.fc_up
        self.wu = None if up is None else nn.Parameter(up.weight.detach().clone(), requires_grad=False)
        self.bu = (
            None
            if up is None or up.bias is None
            else nn.Parameter(up.bias.detach().clone(), requires_grad=False)
        )
        self.w2 = nn.Parameter(acm.fc2.weight.detach().clone(), requires_grad=False)  # [d_out, L*h]
        self.gate1, self.gate2 = acm.gate.fc1, acm.gate.fc2
        self.bias2 = (
            None if acm.bias2 is None else nn.Parameter(acm.bias2.detach().clone(), requires_grad=False)
        )
        self.act, self.k_min, self.fixed_k, self.d_out = acm.act, acm.k_min, acm.fixed_k, acm.d_out
        self.n_learners, self.h = acm.n_learners, acm.h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [T, d]
        out = flat.new_zeros(flat.shape[0], self.d_out)
        if self.fixed_k is None:
            k = self.gate2(nn.functional.gelu(self.gate1(flat))).argmax(-1) + self.k_min  # [T]
        for n in range(self.n_learners if self.fixed_k is None else self.fixed_k):
            cols = slice(n * self.h, (n + 1) * self.h)
            if self.fixed_k is None:
                idx = torch.nonzero(k > n).squeeze(1)  # [T_n] the tokens running learner n
                xs = flat.index_select(0, idx)
            else:
                xs = flat
            hid = ACTIVATIONS[self.act](nn.functional.linear(xs, self.w1[cols], self.b1[cols]))
            if self.wu is not None:
                hid = hid * nn.functional.linear(
                    xs, self.wu[cols], None if self.bu is None else self.bu[cols]
                )
            part = nn.functional.linear(hid, self.w2[:, cols])
            out = out + part if self.fixed_k is not None else out.index_add(0, idx, part)
        if self.bias2 is not None:
            out = out + self.bias2
        return out.reshape(*shape[:-1], self.d_out)


def _plain(acm: ACMMLP) -> bool:
    mods = (acm.fc1, acm.fc2, acm.fc_up, acm.gate.fc1, acm.gate.fc2)
    return all(type(m) is nn.Linear for m in mods if m is not None)


@register_form(ACMMLP, "float")
def _acm(acm: ACMMLP, opts: ExportOptions) -> nn.Module:
    if opts.target == "onnxruntime" and _plain(acm):
        return ACMSkipExport(acm).eval()
    return ACMExport(acm, opts).eval()
