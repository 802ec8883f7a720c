"""The gates' self-distillation loss and its held-out value (pure functions of what the cores kept).

Per layer, per query-block row ``r`` of head ``h``: ``KL(truth_r ‖ gate_r) = Σ_j t_j (log t_j − log g_j)``
with ``g = softmax(logits)``. That is the official code's ``KLDivLoss(log_softmax(gate), truth)``;
the paper writes the divergence between gate and ground truth without fixing the order, and the
other order is infinite wherever the target is 0 (every block the causal mask removes). Rows that
hold no real token or see no key block weigh 0; for decoders the first quarter of each sample's real
query blocks is dropped (the official code: "for training stability" — those rows see few blocks;
counted over the real blocks, so the loss of a sample does not depend on the padding a batch adds:
the training cache of :mod:`.cache` pads every sample to one width). The value of
one sample is the mean over its heads and weighted rows; a layer's loss is the mean over the batch's
samples (so DDP's averaged gradient is the one-process gradient); layers are summed. The official
``KLDivLoss`` averages over every element and scales by 10; under Adam(W) a constant factor changes
nothing but epsilon's weight, so neither is copied.
"""

from __future__ import annotations

import torch


def layer_kl(
    logits: torch.Tensor, truth: torch.Tensor, rows: torch.Tensor, skip_first: float = 0.0
) -> torch.Tensor:
    """``[B]`` KL per sample of one layer: logits/truth ``[B, H, nb, nb]``, rows ``[B|1, nb]`` weights."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    t = truth.float()
    kl = (torch.xlogy(t, t) - t * logp).sum(-1)  # [B, H, nb]
    w = rows.float().expand(kl.shape[0], kl.shape[-1])
    if skip_first:  # the first floor(skip_first · real rows) real rows of each sample weigh 0
        cut = torch.floor(w.sum(-1, keepdim=True).double() * skip_first)
        w = w * (w.cumsum(-1).double() > cut)
    per_row = kl.mean(1)  # [B, nb] mean over heads
    return (per_row * w).sum(-1) / w.sum(-1).clamp(min=1.0)


def total_loss(cores, skip_first_causal: float) -> torch.Tensor:
    """Sum over layers of the batch-mean KL, from what each core kept in its last collect call."""
    terms = []
    for core in cores:
        last = core.last
        if last is None:
            continue
        skip = skip_first_causal if core.causal else 0.0
        terms.append(layer_kl(last["logits"], last["truth"], last["rows"], skip).mean())
    if not terms:
        raise RuntimeError("no SeerAttention core ran in the forward")
    return torch.stack(terms).sum()
