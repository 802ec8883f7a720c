"""Adaptive Computation Modules (Wójcik et al., "Adaptive Computation Modules: Granular Conditional
Computation for Efficient Inference", arXiv 2312.10193 v3, AAAI 2025; official code
bartwojcik/adaptive_computation_modules, which has no kernel).

The ``acm`` pass replaces every targeted MLP with ``n_learners`` small learners (dense → act →
dense, the replaced MLP's activation; gated MLPs keep the gate/up/down form) and a gate that picks,
per token, how many run (``k ∈ {0..L}``: k = 0 is allowed because every MLP sits under a residual).
Training, in the paper's three phases, each through :func:`edgecompress.train.fit` (so torchrun
runs them data-parallel):

1. **distillation** (``distill_steps``, Adam ``distill_lr`` 1e-3, cosine): each ACM on the frozen
   teacher's recorded MLP inputs, MSE of every prefix ``n = 1..L`` to the MLP's output, all layers
   at once (the layers are independent given the teacher's inputs);
2. **gate pre-training** (``gate_steps``, Adam ``gate_lr`` 1e-2): learners frozen; labels from
   ``τ`` (``tau`` 1.2, :func:`.losses.gate_labels`); cross-entropy;
3. **end to end** (``steps``, the recipe's ``train:``): the task loss (or distillation from the
   teacher without labels) + ``budget_weight`` 0.1 · |executed fraction − ``budget``| +
   ``entropy_weight`` 0.05 · entropy term + ``diversity_weight`` 0.05 · diversity term
   (:mod:`.losses`), hard Gumbel-softmax straight-through gates at temperature ``gumbel_tau``
   (0.8, the official ViT-B scripts' value; the paper gives none); the whole model trains
   (``train_all``), as in the paper.

Choices where the paper or its code is silent or disagrees:

* Learners start from the replaced MLP split by hidden-unit importance (:mod:`.sites`), not from
  random initialisation: with all learners the ACM is the original MLP exactly, and short
  distillation runs start from a good prefix ordering. The MLP's output bias is kept as one shared
  bias added to every token (also at k = 0; it costs no multiply).
* The gate is Linear → GELU → Linear with width ≈ 1 % of the MLP's multiply-adds (at least 16);
  the official "deep" gate has no nonlinearity, the paper's has one.
* The task gradient reaches the gates: the chosen prefix is multiplied by the straight-through
  one-hot (the paper); the official code takes an argmax and never does.
* Phase II labels follow the paper's rule (:func:`.losses.gate_labels` says how the code differs).
* Attention projections (the paper's ViT-B variant) are not converted; MLPs only.

Execution (:mod:`.execute`, DESIGN §6): the masked-dense reference, the bucketed CPU form that
skips the work, and the Triton kernel ``edgecompress.kernels.acm_mlp`` on CUDA. Export
(:mod:`edgecompress.export.forms.acm`): the gate is in the ONNX graph; for ONNX Runtime the graph
runs each learner only on the tokens that execute it, for TensorRT (or quantized learners) every
learner is computed and the unexecuted ones are masked; the export JSON says which.
"""

from __future__ import annotations

from edgecompress.sparsity.acm.modules import ACMMLP, ACMGate, ACMPassthrough
from edgecompress.sparsity.acm.passes import ACM

__all__ = ["ACM", "ACMGate", "ACMMLP", "ACMPassthrough"]
