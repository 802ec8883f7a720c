"""N:M structured sparsity passes: ``nm_oneshot``, ``asp``, ``sr_ste`` and ``step``.

All four put one :class:`~edgecompress.sparsity.nm.modules.NMMask` (frozen at the end) first in
the weight chain of every targeted Linear whose input dimension is a multiple of ``m`` (a Linear
named explicitly that does not fit is refused in one line; one matched by a pattern is left dense
and named in the report). The classifier heads (``head``, ``classifier``, ``lm_head``) and BERT's
pooler are ignored by default, as N:M studies leave them dense. The training passes train every
parameter of the model through :func:`edgecompress.train.fit` on ``ctx.batches("train")`` with the
recipe's ``train:`` settings (a pass's ``steps`` / ``lr`` / ``batch_size`` / ``weight_decay``
override them); the loss is the task loss where the data has labels, else distillation from the
uncompressed model.

* ``nm_oneshot`` — magnitude N:M, no training (the floor).
* ``asp`` — NVIDIA ASP (Mishra et al., 2021): prune by magnitude once, then fine-tune with the mask
  fixed.
* ``sr_ste`` — SR-STE (Zhou et al., ICLR 2021): dense weights, the N:M mask of ``|w|`` in every
  forward, straight-through backward plus ``λ·(1 − mask) ⊙ w`` (``decay``, 2e-4), under the
  recipe's optimizer (AdamW by default, the setting STEP compares with).
* ``step`` — STEP (ICML 2023, arXiv 2302.01172; :mod:`.step`): dense AdamW until AutoSwitch, then
  the second moment frozen and straight-through mask learning; the switch step is reported.

``from_scratch: true`` re-initialises the model first (the papers' CIFAR setting) instead of
fine-tuning it. Quantization passes may follow (their quantizers see the masked weights, whose
zeros stay exactly zero); these passes cannot follow quantization.
"""

from __future__ import annotations

from edgecompress.sparsity.nm.passes import ASP, SRSTE, STEP, NMOneShot

__all__ = ["ASP", "NMOneShot", "SRSTE", "STEP"]
