"""Public kernel entry points, registered as torch custom ops (``torch.ops.edgecompress.*``).

Each op dispatches to its Triton kernel when Triton imports and the tensors are on CUDA, or when
``TRITON_INTERPRET=1`` was set before import (so CPU tests run the real kernels in Triton's
interpreter); otherwise to its twin in ``edgecompress.kernels.reference``. Fake implementations give
torch.compile / torch.export the output shapes. Forward only: no autograd formula is registered.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

from edgecompress.kernels import reference
from edgecompress.kernels.inputs import (
    BlockIndex,
    block_mask_to_index,
    check_acm,
    check_attention,
    check_block_mask,
    num_blocks,
    resolve_scale,
)


def _triton_importable() -> bool:
    """The one guard around the optional Triton dependency."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception as err:  # a broken install must not break `import edgecompress.kernels`
        warnings.warn(f"triton failed to import ({err}); using the torch reference ops", stacklevel=2)
        return False
    return True


HAS_TRITON = _triton_importable()
if HAS_TRITON:
    from edgecompress.kernels.triton import acm_mlp as _acm_triton
    from edgecompress.kernels.triton import block_sparse_attention as _bsa_triton
    from edgecompress.kernels.triton import pooled_attention as _pooled_triton
    from edgecompress.kernels.triton.configs import INTERPRET
else:
    INTERPRET = False


def _use_triton(t: torch.Tensor) -> bool:
    return HAS_TRITON and (t.is_cuda or INTERPRET)


# ---------------------------------------------------------------------------------------------------
# registered ops (tensor-only signatures; the public functions below validate and convert first)


@torch.library.custom_op("edgecompress::block_sparse_attention", mutates_args=())
def _block_sparse_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    causal: bool,
    sm_scale: float,
    block: int,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``; ``lse`` is an empty tensor unless ``return_lse``."""
    if _use_triton(q):
        res = _bsa_triton.block_sparse_attention_fwd(
            q, k, v, kv_indices, kv_counts, causal, sm_scale, block, return_lse=return_lse
        )
    else:
        index = BlockIndex(kv_indices, kv_counts)
        res = reference.block_sparse_attention(
            q, k, v, index, causal, sm_scale, block=block, return_lse=return_lse
        )
    return res if return_lse else (res, q.new_empty(0, dtype=torch.float32))


@_block_sparse_attention_op.register_fake
def _(q, k, v, kv_indices, kv_counts, causal, sm_scale, block, return_lse):
    lse = q.new_empty(q.shape[:3] if return_lse else (0,), dtype=torch.float32)
    return q.new_empty(q.shape), lse  # [B, H, N, D], contiguous like the kernel's output


@torch.library.custom_op("edgecompress::attention_with_pooled_probs", mutates_args=())
def _pooled_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, causal: bool, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton(q):
        return _pooled_triton.attention_with_pooled_probs_fwd(q, k, v, block, causal, sm_scale)
    return reference.attention_with_pooled_probs(q, k, v, block, causal, sm_scale)


@_pooled_op.register_fake
def _(q, k, v, block, causal, sm_scale):
    b, h, n, _ = q.shape
    nb = num_blocks(n, block)
    return q.new_empty(q.shape), q.new_empty(b, h, nb, nb, dtype=torch.float32)


@torch.library.custom_op("edgecompress::acm_mlp", mutates_args=())
def _acm_op(
    x: torch.Tensor, k: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, n_learners: int
) -> torch.Tensor:
    if _use_triton(x):
        return _acm_triton.acm_mlp_fwd(x, k, w1, b1, w2, n_learners)
    return reference.acm_mlp(x, k, w1, b1, w2, n_learners)


@_acm_op.register_fake
def _(x, k, w1, b1, w2, n_learners):
    return x.new_empty(x.shape[0], w2.shape[1])  # [T, d_out]


# ---------------------------------------------------------------------------------------------------
# public API


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor | BlockIndex,
    causal: bool = False,
    sm_scale: float | None = None,
    *,
    block: int = 64,
    return_lse: bool = False,
):
    """Block-sparse attention forward (SeerAttention, arXiv 2410.13276): softmax(q k^T * sm_scale) v
    over the kept key blocks only.

    Args:
        q: [B, H, N, D]; k, v: [B, Hkv, N, D] with H % Hkv == 0 (GQA). fp16, bf16 or fp32; D <= 256.
        block_mask: [B, H, ceil(N/block), ceil(N/block)] bool (True = keep the key block for the query
            block), or a ``BlockIndex`` (kept key-block indices per query block, see
            ``block_mask_to_index``), which skips a dense-to-index conversion on every call.
        causal: additionally mask keys after the query element-wise (inside diagonal blocks too).
        sm_scale: score scale, default 1/sqrt(D).
        block: mask granularity, 32, 64 (default) or 128 tokens.

    Returns [B, H, N, D] in q's dtype. A query row that keeps no key outputs zeros. With ``return_lse``:
    ``(out, lse)``, ``lse`` [B, H, N] float32 each row's natural-log log-sum-exp of its scaled kept
    scores (``-inf`` where it keeps no key), to merge the result with attention over other keys.
    """
    b, h, _, n, d = check_attention(q, k, v, block)
    check_block_mask(block_mask, b, h, n, block, q.device)
    index = block_mask if isinstance(block_mask, BlockIndex) else block_mask_to_index(block_mask, causal)
    out, lse = _block_sparse_attention_op(
        q,
        k,
        v,
        index.indices,
        index.counts,
        bool(causal),
        resolve_scale(sm_scale, d),
        int(block),
        bool(return_lse),
    )
    return (out, lse) if return_lse else out


def attention_with_pooled_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block: int = 64,
    causal: bool = False,
    sm_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention plus SeerAttention's self-distillation target (arXiv 2410.13276, section 3.2):
    the maximum softmax probability inside every (query block, key block) tile.

    Shapes and dtypes as in ``block_sparse_attention``. Returns (out [B, H, N, D] in q's dtype,
    pooled [B, H, ceil(N/block), ceil(N/block)] float32, not row-normalised; masked or padded entries
    count as 0). The N x N probability matrix is never materialised by the kernel.
    """
    _, _, _, _, d = check_attention(q, k, v, block)
    return _pooled_op(q, k, v, int(block), bool(causal), resolve_scale(sm_scale, d))


def acm_mlp(
    x: torch.Tensor,
    k: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    n_learners: int,
) -> torch.Tensor:
    """Adaptive Computation Module forward (ACM, arXiv 2312.10193): token i sums its first k[i] learners,
    GELU(x_i @ W1[:, :k h] + b1[:k h]) @ W2[:k h, :] (exact erf GELU, no output bias).

    Args:
        x: [T, d] tokens; k: [T] integer learner counts in [0, n_learners] (values outside are clamped;
            0 gives a zero row); w1: [d, n_learners*h] (learner n owns columns n*h:(n+1)*h);
            b1: [n_learners*h]; w2: [n_learners*h, d_out]. x, w1, b1, w2 share fp16, bf16 or fp32.

    Returns [T, d_out] in x's dtype. The kernel buckets tokens by k and runs a grouped GEMM whose
    reduction length per bucket is k*h, so its cost follows the executed fraction mean(k)/n_learners.
    """
    check_acm(x, k, w1, b1, w2, n_learners)
    return _acm_op(x, k, w1, b1, w2, int(n_learners))
