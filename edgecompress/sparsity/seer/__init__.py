"""SeerAttention (Gao et al., "SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs",
arXiv 2410.13276, as summarised in ../shared/METHODS.md §6 — the paper's text was not read here; the
official code microsoft/SeerAttention at aba03e3 was: a per-architecture Llama/Qwen fork with CUDA-only
kernels, whose prefill gate ``Qavg_Kmaxminavg`` this follows).

The ``seer_attention`` pass puts a :class:`~.core.SeerAttentionCore` into the core slot of every
targeted attention adapter (:mod:`edgecompress.models.attention`: timm ViT/DeiT/EVA/BEiT/Swin and
Hugging Face encoders, ViTs and Llama-style decoders, without forking modeling code):

* an :class:`~.gate.AttnGate` per layer (Q average-pooled, K max/min/average-pooled over blocks of
  ``block`` tokens, per-head projections with K shared per GQA group, RoPE at block positions on
  RoPE decoders, block-causal for decoders, softmax over key blocks);
* gates trained by self-distillation through :func:`edgecompress.train.fit` (so ``torchrun`` trains
  them data-parallel): the base model is frozen and runs densely, the target is the block-max of
  each layer's softmax, row-normalised (:func:`.execute.pooled_truth`; the Triton kernel
  ``attention_with_pooled_probs`` on CUDA), the loss KL(truth ‖ gate) summed over layers
  (:mod:`.losses`); AdamW at ``lr`` 1e-3 as the paper. The gates' pooled inputs and targets are
  computed once per training sample and the steps run on that cache (:mod:`.cache`; the live model
  when it passes 4 GiB);
* at inference the kept blocks come from ``density`` (``rule: topk``, per-row top-k; ``rule:
  threshold``, one threshold calibrated on the training samples so that the mean kept fraction is
  ``density``) or a fixed ``threshold`` with forced blocks (:mod:`.masks`) and run in one of six
  forms (:mod:`.execute`): the masked-dense reference, a C++ kernel on CPU built at first use (:mod:`.cpp`, the default there for float32),
  the batched kept-block matmuls (:mod:`.tiled`: other dtypes, no compiler), FlexAttention compiled
  for the CPU (:mod:`.flex`, on request), the gathered CPU form (a model bias), the Triton kernel on
  CUDA; dense SDPA below ``min_seq_len`` tokens.

Choices where the paper or its code is silent or that differ, with the reason:

* **Pre-RoPE Q and K on Hugging Face decoders.** The attention interface hands the adapter Q and K
  after RoPE; the gate un-rotates them with the model's inverse frequencies (a rotation, exact up to
  float rounding) at the decoder's ``position_ids`` and applies RoPE at block positions (each
  block's first token, as the code) after the projection, so the gate dim is the head dim (the
  paper's 128 is Llama's head dim). timm EVA applies its 2-D RoPE before the adapter: its gate
  pools the rotated Q/K and adds no RoPE.
* **Encoders and ViTs** (the paper has only decoders): no block-causal mask; the first block's row
  and column are kept (the class token attends and is attended densely); ``dense_last_rows`` (the
  official ``last_block_dense``, 2 query blocks) applies to decoders only.
* **Padding**: pooling, the gate's allowed blocks and the target use real tokens only; the model's
  mask is applied inside the kept blocks exactly.
* **Density** is per query row, ``ceil(density · allowed blocks)`` (forced blocks included); the
  official ``nz_ratio`` uses one top-k of ``(1 − √(1 − nz)) · nb`` for every row.
* **Gate initialisation**: identity projections on the average-pooled parts (the untrained gate is
  the attention of the block averages); the official code draws N(0, 0.02²).
* **Loss**: KL(truth ‖ gate) per row as the official ``KLDivLoss``, mean over heads and rows per
  sample, without its ×10 scale (:mod:`.losses`). The first quarter of the query blocks is dropped
  for decoders only.
* Training sees every sequence length (``min_seq_len`` is an inference rule).
* **``dropped: mean``** (ours, not in the paper; default ``skip``, the paper's rule): each dropped key
  block joins the softmax as one estimated key at its mean key and value, weighted by its real-key
  count (:mod:`.dropped`: why, the measurements, the forms that support it), at ``1/block`` of a
  kept block's cost.

Export (:mod:`edgecompress.export.forms.seer`): the gate and the block mask are in the ONNX graph and
the attention is computed densely with the dropped blocks masked, verified in ONNX Runtime; ORT's
``com.microsoft.SparseAttention`` is causal-only with a KV cache and its CPU kernel computes densely
too (../shared/research/PRUNING-SPARSITY.md §4).
"""

from __future__ import annotations

from edgecompress.sparsity.seer.core import SeerAttentionCore
from edgecompress.sparsity.seer.gate import AttnGate
from edgecompress.sparsity.seer.passes import SeerAttention

__all__ = ["AttnGate", "SeerAttention", "SeerAttentionCore"]
