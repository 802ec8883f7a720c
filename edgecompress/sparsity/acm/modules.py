"""The ACM modules: :class:`ACMGate` and :class:`ACMMLP` (and :class:`ACMPassthrough` for HF MLPs
whose output projection lives in another module).

An :class:`ACMMLP` holds ``n_learners`` learners packed in two (three, gated) ``nn.Linear``s —
``fc1`` ``[L·h, d]`` with bias, ``fc_up`` ``[L·h, d]`` (gated MLPs only; with the replaced up projection's
bias when it has one), ``fc2`` ``[d_out, L·h]``
without bias; learner ``n`` owns hidden units ``n·h:(n+1)·h`` — plus ``bias2`` (the replaced MLP's
output bias, added to every token, also at ``k = 0``) and a gate choosing ``k`` per token.

Forward by mode:

* training with ``use_gate`` set (only the ``acm`` pass's phase III sets it): hard Gumbel-softmax straight-through one-hot ``y`` over
  ``k ∈ {k_min..L}``; learner ``n`` is scaled by ``m_n = Σ_{c>n} y_c`` (1 for the executed ones),
  which equals the paper's ``Σ_c y_c·h(z, c)`` in value and gradient (the sum is linear in ``y``);
  the last one-hot is kept in ``last_choice`` for the budget / entropy / diversity losses;
* eval: ``k = k_min + argmax(gate)``, then the form ``form`` (``"auto"``: the Triton kernel on
  CUDA for plain exact-GELU learners, else the bucketed form; ``"reference"``/``"bucketed"``/
  ``"triton"`` force one). Learners that are not plain ``nn.Linear`` (a later pass put quantizers
  in their slots) or that carry hooks (calibration observers) run the masked-dense form through
  their modules, so whatever observes or quantizes them sees every call;
* ``fixed_k`` (int) overrides the gate: every token runs that many learners (the static baseline;
  saved with the module).

With ``record`` set, eval forwards add the histogram of ``k`` to ``k_counts`` (the report).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from edgecompress.kernels.ops import HAS_TRITON, INTERPRET
from edgecompress.sparsity.acm.execute import ACTIVATIONS, bucketed, masked_dense
from edgecompress.structure import register_swap

FORMS = ("auto", "reference", "bucketed", "triton")


class ACMGate(nn.Module):
    """Linear → GELU → Linear: per-token logits over the ``choices`` learner counts (the paper's deep
    gate with the nonlinearity its code leaves out)."""

    def __init__(self, d: int, width: int, choices: int):
        super().__init__()
        self.fc1 = nn.Linear(d, width)
        self.fc2 = nn.Linear(width, choices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def _plain(mod: nn.Module) -> bool:
    return type(mod) is nn.Linear and not (mod._forward_pre_hooks or mod._forward_hooks)


@register_swap
class ACMMLP(nn.Module):
    """An MLP replaced by ``n_learners`` learners and a per-token gate (see the module docstring)."""

    VERSION: ClassVar[int] = 1
    DYNAMIC: ClassVar[bool] = True  # the report counts its weights as compressed (rebuilt by a pass)

    def __init__(
        self, d: int, d_out: int, n_learners: int, learner_width: int, gate_width: int,
        act: str = "gelu", gated: bool = False, k_min: int = 0, out_bias: bool = True,
        fixed_k: int | None = None, up_bias: bool = False,
    ):  # fmt: skip
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
        if not 0 <= k_min <= n_learners:
            raise ValueError(f"k_min must be in [0, {n_learners}], got {k_min}")
        self.d, self.d_out, self.n_learners, self.h = d, d_out, n_learners, learner_width
        self.act, self.gated, self.k_min, self.gate_width = act, gated, k_min, gate_width
        width = n_learners * learner_width
        self.fc1 = nn.Linear(d, width)
        self.fc_up = nn.Linear(d, width, bias=up_bias) if gated else None
        self.fc2 = nn.Linear(width, d_out, bias=False)
        self.bias2 = nn.Parameter(torch.zeros(d_out)) if out_bias else None
        self.gate = ACMGate(d, gate_width, n_learners + 1 - k_min)
        self.register_buffer("k_counts", torch.zeros(n_learners + 1, dtype=torch.long), persistent=False)
        # use_gate: sampled (Gumbel) gates in training mode. Off outside the acm pass, so a later
        # training pass (ASP, STEP, ...) trains the learners under the gates' deterministic choices
        # and no graph tensor is left on the module (last_choice)
        self.use_gate, self.fixed_k, self.form, self.record = False, fixed_k, "auto", False
        self.gumbel_tau = 1.0
        self.last_choice: torch.Tensor | None = None  # [tokens, choices] one-hot of the last forward

    # ---- structure ------------------------------------------------------------------------------

    def swap_config(self) -> dict:
        return dict(
            d=self.d, d_out=self.d_out, n_learners=self.n_learners, learner_width=self.h,
            gate_width=self.gate_width, act=self.act, gated=self.gated, k_min=self.k_min,
            out_bias=self.bias2 is not None, fixed_k=self.fixed_k,
            up_bias=self.fc_up is not None and self.fc_up.bias is not None,
        )  # fmt: skip

    @classmethod
    def from_swap(cls, original, config: dict) -> ACMMLP:
        return cls(**config)

    # ---- forward ----------------------------------------------------------------------------------

    def choose(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token learner counts ``k`` [T] (int64) from the gate (argmax), or ``fixed_k``."""
        if self.fixed_k is not None:
            return torch.full(x.shape[:1], int(self.fixed_k), dtype=torch.long, device=x.device)
        return self.gate(x).argmax(-1) + self.k_min

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [T, d]
        if self.training and self.use_gate and self.fixed_k is None:
            out = self._train_forward(flat)
        else:
            k = self.choose(flat)
            if self.record:
                self.k_counts += torch.bincount(k, minlength=self.n_learners + 1).to(self.k_counts.device)
            out = self.execute(flat, k)
        if self.bias2 is not None:
            out = out + self.bias2
        return out.reshape(*shape[:-1], self.d_out)

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gumbel_softmax(self.gate(x).float(), tau=self.gumbel_tau, hard=True)  # [T, C] ST one-hot
        self.last_choice = y
        full = torch.cat([y.new_zeros(y.shape[0], self.k_min), y], dim=1)  # [T, L+1] over k = 0..L
        keep = full.flip(1).cumsum(1).flip(1)[:, 1:]  # [T, L]: learner n runs iff k > n, Σ_{c>n} y_c
        hid = self._hidden_modules(x) * keep.to(x.dtype).repeat_interleave(self.h, dim=1)
        return self.fc2(hid)

    def _hidden_modules(self, x: torch.Tensor) -> torch.Tensor:
        z = ACTIVATIONS[self.act](self.fc1(x))
        return z if self.fc_up is None else z * self.fc_up(x)

    def pick_form(self, x: torch.Tensor) -> str:
        if torch.is_grad_enabled() and (x.requires_grad or self.fc1.weight.requires_grad):
            return "modules"  # training (a fixed-k baseline): the autograd-friendly masked form
        if not all(_plain(m) for m in (self.fc1, self.fc2, self.fc_up) if m is not None):
            return "modules"
        kernel_ok = self.act == "gelu" and not self.gated  # the kernel runs plain exact-GELU learners
        if self.form == "triton" and not kernel_ok:
            raise ValueError(
                f"form='triton' runs plain GELU learners only; this ACM is {self.extra_repr()}: "
                "use 'auto', 'bucketed' or 'reference'"
            )
        if self.form != "auto":
            return self.form
        return "triton" if kernel_ok and HAS_TRITON and x.is_cuda and not INTERPRET else "bucketed"

    def execute(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The learners' sum for learner counts ``k`` (no ``bias2``), in the chosen form."""
        form = self.pick_form(x)
        if form == "modules" or torch.compiler.is_compiling():
            mask = torch.arange(self.n_learners, device=x.device).repeat_interleave(self.h) < k[:, None]
            return self.fc2(self._hidden_modules(x) * mask.to(x.dtype))
        w1, b1, w2 = self.fc1.weight, self.fc1.bias, self.fc2.weight
        wu, bu = (None, None) if self.fc_up is None else (self.fc_up.weight, self.fc_up.bias)
        if form == "triton":
            from edgecompress.kernels import acm_mlp

            return acm_mlp(x, k, w1.t(), b1, w2.t(), self.n_learners)
        fn = masked_dense if form == "reference" else bucketed
        return fn(x, k, w1, b1, w2, self.n_learners, self.act, wu, bu)

    def prefix_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, L+1, d_out]``: the output with k = 0..L learners (``bias2`` included), for phases I/II."""
        hid = self._hidden_modules(x).reshape(x.shape[0], self.n_learners, self.h)  # [T, L, h]
        w2 = self.fc2.weight.reshape(self.d_out, self.n_learners, self.h)  # [d_out, L, h]
        contrib = torch.einsum("tlh,olh->tlo", hid, w2)  # [T, L, d_out]
        pre = torch.cat([contrib.new_zeros(x.shape[0], 1, self.d_out), contrib.cumsum(1)], dim=1)
        return pre if self.bias2 is None else pre + self.bias2

    def describe(self) -> dict:
        """A row of the per-layer report: learners, and the executed fraction last recorded."""
        counts = self.k_counts.cpu()
        seen = int(counts.sum())
        frac = float((counts * torch.arange(len(counts))).sum()) / seen / self.n_learners if seen else None
        nbytes = sum(p.numel() * p.element_size() for p in self.parameters())
        return {
            "layer": "ACM", "role": f"{self.n_learners} learners x {self.h}", "bits": str(self.fc1.weight.dtype).removeprefix("torch."),
            "sparsity": "" if frac is None else f"executes {frac:.3f}", "shape": [self.d_out, self.d], "bytes": nbytes,
        }  # fmt: skip

    def extra_repr(self) -> str:
        kind = "gated " if self.gated else ""
        return f"{kind}{self.n_learners} learners x {self.h} ({self.act}), k_min={self.k_min}, gate {self.gate_width}"


@register_swap
class ACMPassthrough(nn.Identity):
    """Stands in for an HF output projection (``BertOutput.dense``) whose work the ACM in the
    intermediate module already did; the residual and LayerNorm around it stay the model's."""

    VERSION: ClassVar[int] = 1

    def swap_config(self) -> dict:
        return {}

    @classmethod
    def from_swap(cls, original, config: dict) -> ACMPassthrough:
        return cls()
