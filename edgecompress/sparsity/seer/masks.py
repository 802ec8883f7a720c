"""Which key blocks each query block keeps, from the gate's scores (pure functions on tensors).

* ``threshold``: the blocks whose gate probability exceeds it (the paper's default inference rule);
* ``density``: per query block the top ``ceil(density · allowed)`` blocks of its row, where
  ``allowed`` counts the key blocks the row may see (block-causal rows see ``i + 1``). A row keeps
  every block scoring at least its k-th score (ties are kept), so the rule is a per-row threshold
  and the exported graph computes the same blocks with a sort and a gather.

Blocks kept whatever the gate says (:func:`forced_blocks`), within ``allowed``: the diagonal; the
first block's column (attention sinks, the class token) and, for encoders, its row (the class token
attends densely); for decoders the last ``dense_last_rows`` query blocks (the official
``last_block_dense`` keeps 2). Forced blocks count inside the density budget when they fit.
"""

from __future__ import annotations

import torch

EPS = 1e-6  # density · allowed is rounded up after this slack (0.3 · 10 is 3.0000000000000004)


def forced_blocks(nb: int, causal: bool, keep_diagonal: bool, keep_first: bool, dense_last_rows: int,
                  device=None) -> torch.Tensor:  # fmt: skip
    """``[nb, nb]`` bool: blocks kept regardless of the gate (see the module docstring)."""
    i = torch.arange(nb, device=device)
    row, col = i[:, None], i[None, :]  # comparisons only: the exported graph builds it for any nb
    forced = torch.zeros(nb, nb, dtype=torch.bool, device=device)
    if keep_diagonal:
        forced = forced | (row == col)
    if keep_first:
        forced = forced | (col == 0)
        if not causal:
            forced = forced | (row == 0)
    if causal and dense_last_rows > 0:
        forced = forced | (row >= nb - dense_last_rows)
    return forced


def row_budget(allowed: torch.Tensor, density: float) -> torch.Tensor:
    """Blocks a row may keep: ``ceil(density · allowed)``, at least 1 where the row sees any."""
    n = allowed.sum(-1)  # [B, 1, nb]
    k = torch.ceil(n.to(torch.float64) * density - EPS).to(n.dtype)
    return torch.where(n > 0, k.clamp(min=1), 0)


def topk_keep(
    logits: torch.Tensor, allowed: torch.Tensor, forced: torch.Tensor, density: float
) -> torch.Tensor:
    """Per-row top-k by the k-th largest score (forced blocks rank first)."""
    s = logits.masked_fill(forced & allowed, float("inf")).masked_fill(~allowed, float("-inf"))
    k = row_budget(allowed, density).expand(s.shape[:-1])  # [B, H, nb]
    ordered = s.sort(dim=-1, descending=True).values
    kth = ordered.gather(-1, (k - 1).clamp(min=0)[..., None])  # [B, H, nb, 1]
    return ((s >= kth) & allowed & (k[..., None] > 0)) | (forced & allowed)


def select_blocks(logits: torch.Tensor, allowed: torch.Tensor, forced: torch.Tensor,
                  density: float | None, threshold: float | None) -> torch.Tensor:  # fmt: skip
    """``[B, H, nb, nb]`` bool block mask from gate logits (one of ``density`` / ``threshold``)."""
    if density is not None:
        return topk_keep(logits, allowed, forced, density)
    probs = logits.float().softmax(-1)
    return ((probs > threshold) | forced) & allowed


def density_of(keep: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept and allowed block counts per head, summed over batch and rows: two ``[H]`` tensors."""
    allowed = allowed.expand_as(keep)
    return keep.sum(dim=(0, 2, 3)), allowed.sum(dim=(0, 2, 3))
