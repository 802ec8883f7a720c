""":class:`SeerAttentionCore`: the attention core slot (:mod:`edgecompress.models.attention`) filled
with an AttnGate and block-sparse attention.

Per call (``q`` ``[B, H, N, D]``, ``k``/``v`` ``[B, Hkv, N, D]`` after the adapter's slots, the
model's ``bias`` / mask, ``positions`` from Hugging Face decoders):

* ``collect`` (set by the pass while the gates train): the dense attention is returned — the base
  model's computation, frozen — and the gate's logits and the target
  (:func:`~edgecompress.sparsity.seer.execute.pooled_truth`) are kept in ``last`` for the loss;
* otherwise: the gate scores the blocks (no gradient: the choice is discrete), the kept blocks are
  selected (:mod:`~edgecompress.sparsity.seer.masks`) and one form runs them (``form``: ``auto`` —
  the Triton kernel on CUDA where it applies, else on CPU the C++ kernel of
  :mod:`~edgecompress.sparsity.seer.cpp` (float32, built at first use), the batched kept-block
  matmuls of :mod:`~edgecompress.sparsity.seer.tiled` where it is unavailable or for other dtypes
  (both measured faster than FlexAttention compiled by Inductor, :mod:`~edgecompress.sparsity.seer.flex`:
  ``benchmarks/seer.py --parts forms``), and the gathered form where the model adds a bias beyond its
  padding mask; ``reference``, ``gathered``, ``tiled``, ``cpp``, ``flex``, ``triton`` force one —
  ``tiled``, ``cpp`` and ``flex`` hand a bias to the gathered form, ``cpp`` and ``flex`` a failed
  build to ``tiled``). Dense SDPA runs instead below ``min_seq_len``
  tokens, when a KV cache makes the keys longer than the queries (decoding), and when every allowed
  block is kept.

With ``dropped="mean"`` (ours, off by default) each dropped block also enters the softmax as one
estimated key at its mean key and value (:mod:`~edgecompress.sparsity.seer.dropped`): the form
returns its log-sum-exp over the kept blocks and the estimate is merged in.

The softmax is fused (``SUPPORTS_PROBS = False``): a later PTQ pass quantizes q, k and v around this
core. With ``record`` set, kept and allowed block counts per head accumulate (the report's density).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from edgecompress.sparsity.seer import execute as X
from edgecompress.sparsity.seer.cpp import attend as cpp_attend
from edgecompress.sparsity.seer.dropped import DROPPED, dropped_part, merge
from edgecompress.sparsity.seer.flex import flex
from edgecompress.sparsity.seer.gate import AttnGate, block_valid, num_blocks
from edgecompress.sparsity.seer.masks import density_of, forced_blocks, select_blocks
from edgecompress.sparsity.seer.tiled import tiled
from edgecompress.structure import register_swap

FORMS = ("auto", "reference", "gathered", "tiled", "cpp", "flex", "triton")


@register_swap
class SeerAttentionCore(nn.Module):
    """AttnGate + block-sparse attention in the adapter's core slot (see the module docstring)."""

    VERSION: ClassVar[int] = 1
    SUPPORTS_PROBS: ClassVar[bool] = False
    TAKES_POSITIONS: ClassVar[bool] = True
    DYNAMIC: ClassVar[bool] = True  # the report counts the gate as a pass's weights

    def __init__(
        self, heads: int, kv_heads: int, head_dim: int, gate_dim: int, block: int, causal: bool,
        rope_dims: int = 0, rope_scaling: float = 1.0, density: float | None = 0.5,
        threshold: float | None = None, keep_diagonal: bool = True, keep_first: bool = True,
        dense_last_rows: int = 2, min_seq_len: int = 0, form: str = "auto", dropped: str = "skip",
    ):  # fmt: skip
        super().__init__()
        if (density is None) == (threshold is None):
            raise ValueError("exactly one of density and threshold must be set")
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        if dropped not in DROPPED:
            raise ValueError(f"dropped must be one of {DROPPED}, got {dropped!r}")
        self.gate = AttnGate(heads, kv_heads, head_dim, gate_dim, block, rope_dims)
        self.gate.rope_scaling = float(rope_scaling)
        self.block, self.causal, self.density, self.threshold = block, bool(causal), density, threshold
        self.keep_diagonal, self.keep_first, self.dense_last_rows = keep_diagonal, keep_first, dense_last_rows
        self.min_seq_len, self.form, self.dropped = min_seq_len, form, dropped
        self.collect, self.record = False, False
        self.last: dict | None = None
        self.register_buffer("kept", torch.zeros(heads, dtype=torch.long), persistent=False)
        self.register_buffer("allowed", torch.zeros(heads, dtype=torch.long), persistent=False)

    # ---- structure ------------------------------------------------------------------------------

    def swap_config(self) -> dict:
        g = self.gate
        return dict(
            heads=g.heads, kv_heads=g.kv_heads, head_dim=g.head_dim, gate_dim=g.gate_dim, block=self.block,
            causal=self.causal, rope_dims=2 * g.inv_freq.numel(), rope_scaling=g.rope_scaling,
            density=self.density, threshold=self.threshold, keep_diagonal=self.keep_diagonal,
            keep_first=self.keep_first, dense_last_rows=self.dense_last_rows, min_seq_len=self.min_seq_len,
            form=self.form, dropped=self.dropped,
        )  # fmt: skip

    @classmethod
    def from_swap(cls, original, config: dict) -> SeerAttentionCore:
        return cls(**config)

    # ---- forward --------------------------------------------------------------------------------

    def forward(self, q, k, v, bias, scale: float, probs: nn.Module, positions=None) -> torch.Tensor:
        n = q.shape[2]
        if k.shape[2] != n or (n < self.min_seq_len and not self.collect):
            self._count_dense(q)
            return X.dense(q, k, v, bias, self.causal, scale)
        rest, valid = X.simplify_bias(bias, self.causal, n)  # the model's mask = rest + padding keys
        if valid is not None:
            valid = valid.expand(q.shape[0], n)
        if self.collect:
            logits, allowed = self.gate(q.detach(), k.detach(), valid, positions, self.causal)
            out, truth = X.pooled_truth(q, k, v, rest, self.causal, scale, self.block, valid)
            self.last = {
                "logits": logits,
                "truth": truth,
                "rows": _row_weights(allowed, valid, n, self.block),
            }
            return out
        keep, allowed = self.choose(q, k, valid, positions)
        if self.record:
            kept, seen = density_of(keep, allowed)
            self.kept += kept
            self.allowed += seen
        if bool((keep == allowed.expand_as(keep)).all()):
            return X.dense(q, k, v, bias, self.causal, scale)
        return self.sparse(q, k, v, keep, rest, scale, valid)

    def sparse(self, q, k, v, keep, bias, scale: float, valid=None) -> torch.Tensor:
        """The kept blocks (:meth:`execute`) and, with ``dropped="mean"``, the dropped blocks' estimates."""
        if self.dropped == "mean":
            grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
            if bias is None and not grad and self.pick_form(q, bias, valid) == "cpp":  # estimates in-kernel
                out = cpp_attend(q, k, v, keep, self.causal, scale, self.block, valid, estimates=True)
                if out is not None:
                    return out
            out, lse = self.execute(q, k, v, keep, bias, scale, valid, lse=True)
            est, est_lse = dropped_part(q, k, v, keep, self.causal, scale, self.block, valid, bias)
            return merge(out, lse, est, est_lse)
        return self.execute(q, k, v, keep, bias, scale, valid)

    def choose(self, q, k, valid=None, positions=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept blocks ``[B, H, nb, nb]`` and allowed blocks ``[B|1, 1, nb, nb]`` for this input."""
        with torch.no_grad():
            logits, allowed = self.gate(q, k, valid, positions, self.causal)
            nb = logits.shape[-1]
            forced = forced_blocks(
                nb, self.causal, self.keep_diagonal, self.keep_first, self.dense_last_rows, q.device
            )
            return select_blocks(logits, allowed, forced, self.density, self.threshold), allowed

    def pick_form(self, q: torch.Tensor, bias, valid) -> str:
        if self.form == "triton" and not X.triton_ok(q, bias, valid, self.block):
            raise ValueError(
                f"form='triton' needs CUDA, Triton, no attention mask beyond the causal one and block in "
                f"(32, 64, 128); got device {q.device.type}, block {self.block}: use 'auto'"
            )
        if self.form != "auto":
            return self.form
        if X.triton_ok(q, bias, valid, self.block):
            return "triton"
        return "cpp" if q.device.type == "cpu" and bias is None else "gathered"

    def execute(self, q, k, v, keep, bias, scale: float, valid=None, lse: bool = False):
        """The kept blocks in the chosen form; ``bias``/``valid`` as :func:`.execute.simplify_bias` gives them.
        Under autograd (a later pass training through the core) the masked-dense form runs; ``tiled``,
        ``cpp`` and FlexAttention hand a bias beyond the padding mask to the gathered form, ``cpp`` and
        FlexAttention a failed build (and ``cpp`` a dtype other than float32) to ``tiled``. With ``lse``
        (``dropped: mean``): ``(out, logsumexp)``; FlexAttention hands over to ``tiled``."""
        form = self.pick_form(q, bias, valid)
        if lse and form == "flex":
            form = "tiled"
        if form == "triton":
            return X.triton(q, k, v, keep, self.causal, scale, self.block, lse=lse)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            form = "reference"
        if form == "flex" and bias is None:
            out = flex(q, k, v, keep, self.causal, scale, self.block, valid)
            if out is not None:
                return out
            form = "tiled"
        if form == "cpp" and bias is None:
            out = cpp_attend(q, k, v, keep, self.causal, scale, self.block, valid, lse=lse)
            if out is not None:
                return out
            form = "tiled"
        if form == "tiled" and bias is None:
            return tiled(q, k, v, keep, self.causal, scale, self.block, valid, lse=lse)
        fn = X.masked_dense if form == "reference" else X.gathered
        return fn(q, k, v, keep, bias, self.causal, scale, self.block, valid, lse=lse)

    def _count_dense(self, q: torch.Tensor) -> None:
        if self.record:
            nb = num_blocks(q.shape[2], self.block)
            blocks = nb * (nb + 1) // 2 if self.causal else nb * nb
            self.kept += blocks * q.shape[0]
            self.allowed += blocks * q.shape[0]

    def describe(self) -> dict:
        seen = self.allowed.sum().item()
        rule = f"density {self.density}" if self.density is not None else f"threshold {self.threshold}"
        return {
            "layer": "SeerAttention", "role": f"block {self.block}, {rule}" + (", dropped blocks estimated" if self.dropped == "mean" else ""),
            "bits": str(self.gate.q_weight.dtype).removeprefix("torch."),
            "sparsity": f"keeps {self.kept.sum().item() / seen:.3f}" if seen else "",
            "bytes": sum(p.numel() * p.element_size() for p in self.gate.parameters()),
        }  # fmt: skip

    def extra_repr(self) -> str:
        rule = f"density={self.density}" if self.density is not None else f"threshold={self.threshold}"
        return (
            f"block={self.block}, causal={self.causal}, {rule}, min_seq_len={self.min_seq_len}, form={self.form}, "
            f"dropped={self.dropped}"
        )


def _row_weights(allowed: torch.Tensor, valid, n: int, block: int) -> torch.Tensor:
    """``[B, nb]`` 1 for query blocks that hold a real token and see at least one key block."""
    rows = allowed.any(-1)[:, 0]  # [B|1, nb]
    bv = block_valid(valid, n, block)
    return (rows & bv if bv is not None else rows).float()
