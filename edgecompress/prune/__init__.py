"""Structured pruning that makes transformers smaller and faster: the ``prune_structured`` pass.

Whole units go — attention heads (Llama-style grouped-query attention: a K/V head with the query
heads that share it), MLP hidden channels (gate and up rows together), whole residual branches — so
every matrix really shrinks, on timm (ViT, DeiT, Swin, EVA) and Hugging Face (BERT, ViT, Llama-style)
models alike, found from the module structure (:mod:`.groups`; no tracing, no forked modeling code)
and recorded as ``resize`` ops that ``restore`` replays (:mod:`.shrink`). Heads may be pruned
unevenly across layers: the size attributes each forward reads are set with the tensors (timm's
``num_heads`` / ``attn_dim``; HF's per-module ``num_attention_heads`` / ``all_head_size`` — the
shared config is never edited); timm's EVA attention reshapes its output to the input width, so a
head-pruned EVA runs through the explicit attention form (:mod:`edgecompress.models.attention`).

Steps (each a pure function on tensors, with plumbing beside it):

1. **Statistics** on the calibration data (:mod:`.calibrate`): the Gram matrix of every group's
   output-projection input, shapes, and the Taylor scores when asked.
2. **Importance** of each unit (:mod:`.importance`, field ``importance``): ``magnitude``,
   ``taylor`` (first order; per batch, squared — the diagonal Fisher of a gate on the unit, Kwon et
   al.'s mask-search score), ``activation`` (|W|·‖X‖), ``distortion`` (the output error of the
   unit's removal), ``obs`` (greedy structured Optimal Brain Surgeon: the removal order that the
   ``lstsq`` refit loses least by). A group keeps its most important units.
3. **Allocation** (:mod:`.allocate`, :mod:`.plan`; field ``allocation``) of kept units per group
   under ``budget`` (``{params | flops | latency: fraction of the prunable groups' cost to remove}``;
   latency from a table measured in ONNX Runtime on this CPU, :mod:`.latency`, then checked on the
   whole exported model and corrected for ``latency_rounds`` rounds, :mod:`.aim`): ``uniform`` (one
   ratio everywhere) or ``layer_adaptive``, following "Efficient Joint Optimization of
   Layer-Adaptive Weight Pruning in Deep Neural Networks" (Xu et al., ICCV 2023, arXiv 2308.10438
   v2; code Akimoto-Cris/RD_PRUNE): per-group distortion curves measured on calibration data
   (:mod:`.curves`), then the allocation minimising their sum under the budget, exactly, by dynamic
   programming; the additivity the method rests on is measured and reported (sum of single-group
   distortions vs the joint distortion of the chosen allocation).
4. **Shrinking** with kept widths that are multiples of ``round_to`` (unaligned widths can run
   slower than wider aligned ones), and **recovery** (:mod:`.recover`, :mod:`.reconstruct`; field
   ``recovery``): bias compensation, or layer-by-layer refitting of each pruned group's output
   projection on calibration data with the pruned model's inputs against the dense model's output
   (Kwon et al., NeurIPS 2022): their per-unit scales (``scale``) or the whole kept weight and bias
   by ridge least squares (``lstsq``; each layer's ridge chosen by held-out error over the
   calibration samples, and the kept input-side rows first refit against the dense pre-activations
   — drift correction); then, with
   ``recover_steps``, distillation fine-tuning through :func:`edgecompress.train.fit`.

Fields: ``granularity`` (``heads``, ``mlp``, ``blocks``), ``importance``, ``allocation``, ``budget``
(one of ``{params: f}``, ``{flops: f}``, ``{latency: f}``, ``0 < f < 1``), ``round_to`` (kept widths
a multiple of it), ``recovery`` (``none`` | ``bias`` | ``lstsq`` | ``scale``) and ``ridge`` (its strength,
relative to the mean input energy), ``ridge_folds`` (K ≥ 2: each layer's ridge is the one of
``RIDGE_GRID`` with the least K-fold held-out error; 1: ``ridge`` everywhere), ``recover_inputs``
(refit the kept q / k / v / fc1 rows before each output projection), ``refit_kept`` (refit the
groups kept whole too), ``norm_weighted`` (weight each token's error by the ``1 / σ`` its LayerNorm
applies), ``recover_steps`` / ``recover_lr`` / ``batch_size`` (distillation
after pruning; the recipe's ``train:`` gives the rest), ``curve_points`` (measured options per group),
``curve_folds`` (1: curves measured on the data the recovery is fit on; K: K-fold cross-fitted),
``curve_samples`` (curves, additivity and the reported output error measured on the first N
calibration samples — whole batches — while statistics and refits use all of them; 0: all),
``latency_points`` / ``latency_batch`` / ``latency_seq`` / ``latency_seconds`` (the ORT table; the
last also times each correction round), ``latency_rounds`` (whole-model corrections; 0: table only),
``targets`` / ``ignore`` (matched against the attention / MLP module names). Refused in one line
(exit code 2): a budget outside (0, 1), an unknown granularity, importance, allocation or recovery,
and a budget that cannot be met without deleting every head (or channel) of a layer unless
``blocks`` allows removing whole branches.

Choices where RD-prune is silent or differs (it prunes single weights and fine-tunes after):

* The allocation is over structured units: a group's options are its kept unit counts, not 101
  unstructured amounts; ``curve_points`` options are measured (evenly spaced, both ends) and the
  rest interpolated linearly.
* Budgets are in parameters, multiply-adds or measured latency (RD-prune's code counts surviving
  weights; its FLOPs option is dead code) and costs are quantised to 4096 steps of the total,
  rounded up (RD-prune's table over single weights would take ~6 GB for DeiT-S); the DP is exact
  for the quantised costs and the result always meets the real budget.
* The distortion is the mean squared error of the model output (text padding excluded; for encoders
  the normalised mean-pooled embedding) against the unpruned model, mean over samples (RD-prune's README uses the worst sample's MSE; with a few dozen
  calibration samples a maximum is noisy); with a recovery, each point is measured with that
  group's projection recovered as it will be (with the dense inputs), so the curves describe what
  is deployed. Curves are measured against the unpruned model once (RD-prune re-measures against the
  current model in each of its fine-tuned iterations; there are none here). By default a point is
  measured on the calibration data its recovery was fit on; ``curve_folds: K`` fits on K − 1 folds
  of the batches and measures on the held-out one (our choice, to not reward refits that only fit
  their few samples; measured on MiniLM, 64 texts, 2 folds: cosine 0.911 / 0.830 / 0.769 at 30 / 50 /
  70 % vs 0.926 / 0.874 / 0.795 in-sample — probably because each fold's refit sees only 32 texts,
  so the curves overstate what the final 64-text refit loses on the wide MLP projections; the
  default stays 1).
* The layers before a group are not recomputed for its curve points: their dense outputs are cached.
* Removing every head of an attention (or every channel of an MLP) is allowed only with granularity
  ``blocks``: the branch then becomes its constant output (the projection bias, or the mean output
  under a recovery). Otherwise a budget that would need it is refused.
"""

from __future__ import annotations

from edgecompress.prune.modules import ConstantBranch, Skip
from edgecompress.prune.passes import PruneStructured

__all__ = ["ConstantBranch", "PruneStructured", "Skip"]
