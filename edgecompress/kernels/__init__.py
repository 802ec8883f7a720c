"""Fused kernels for dynamic sparsity: block-sparse attention and pooled attention probabilities
(SeerAttention) and the grouped-GEMM Adaptive Computation Module (ACM).

Importing needs torch only; Triton is optional (see ``edgecompress.kernels.ops``). Pure-torch twins
of every op live in ``edgecompress.kernels.reference``.
"""

from edgecompress.kernels.inputs import BlockIndex, block_mask_to_index
from edgecompress.kernels.ops import acm_mlp, attention_with_pooled_probs, block_sparse_attention

__all__ = [
    "BlockIndex",
    "acm_mlp",
    "attention_with_pooled_probs",
    "block_mask_to_index",
    "block_sparse_attention",
]
