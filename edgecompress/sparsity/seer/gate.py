"""SeerAttention's AttnGate: block scores from pooled Q and K (pure functions, then :class:`AttnGate`).

Shapes: ``q`` ``[B, H, N, D]``, ``k`` ``[B, Hkv, N, D]`` (``H % Hkv == 0``), ``valid`` ``[B, N]`` bool
(real tokens; ``None``: all), ``nb = ceil(N / block)``. The gate of one attention layer:

1. pool Q over blocks with the average and K with max, min and average (concatenated in that order,
   the official ``Qavg_Kmaxminavg`` gate), over the block's real tokens only (a partial last block
   and padding are left out; a block without a real token pools to 0);
2. project per head (no bias): Q with ``[H, D, G]``, K with ``[Hkv, 3D, G]`` — one K projection per
   K/V head, shared by the query heads of its group (GQA);
3. RoPE models: RoPE at block positions (the position of the block's first token) on both, with the
   model's own inverse frequencies (so ``G`` equals the head dim);
4. ``Q_p K_pᵀ / √G``, key blocks outside ``allowed`` (block-causal for decoders, blocks without a
   real token) set to the dtype's minimum; the softmax over key blocks is the gate's distribution.
"""

from __future__ import annotations

import math

import torch
from torch import nn

K_POOLS = ("max", "min", "avg")


def num_blocks(n: int, block: int) -> int:
    return (n + block - 1) // block


def pool_blocks(
    x: torch.Tensor, block: int, valid: torch.Tensor | None, kinds: tuple[str, ...]
) -> torch.Tensor:
    """``[B, h, N, D]`` → ``[B, h, nb, len(kinds)·D]``: each kind (max/min/avg) over the real tokens of a block."""
    b, h, n, d = x.shape
    nb = num_blocks(n, block)
    ok = torch.ones(b, n, dtype=torch.bool, device=x.device) if valid is None else valid.to(torch.bool)
    ok = nn.functional.pad(ok, (0, nb * block - n)).view(b, 1, nb, block, 1)  # pad: not real
    xb = nn.functional.pad(x, (0, 0, 0, nb * block - n)).view(b, h, nb, block, d)
    count = ok.sum(3)  # [B, 1, nb, 1]
    out = []
    for kind in kinds:
        if kind == "avg":
            pooled = (xb * ok).sum(3) / count.clamp(min=1)
        else:
            fill = float("-inf") if kind == "max" else float("inf")
            pooled = xb.masked_fill(~ok, fill)
            pooled = pooled.amax(3) if kind == "max" else pooled.amin(3)
            pooled = pooled.masked_fill(count == 0, 0.0)
        out.append(pooled)
    return torch.cat(out, dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0,
         inverse: bool = False) -> torch.Tensor:  # fmt: skip
    """Rotary embedding in the Hugging Face (rotate-half) convention on the first ``2·len(inv_freq)``
    dims of ``x`` ``[B, h, n, d]`` at ``positions`` ``[B, n]``; ``inverse`` undoes it (÷ scaling)."""
    r, ct = 2 * inv_freq.numel(), torch.promote_types(x.dtype, torch.float32)
    angle = positions.to(ct)[:, None, :, None] * inv_freq.to(ct)  # [B, 1, n, r/2]
    angle = torch.cat((angle, angle), dim=-1)
    cos, sin = angle.cos(), angle.sin()
    rot, rest = x[..., :r].to(ct), x[..., r:]
    if inverse:
        out = (rot * cos - _rotate_half(rot) * sin) / scaling
    else:
        out = (rot * cos + _rotate_half(rot) * sin) * scaling
    return torch.cat((out.to(x.dtype), rest), dim=-1)


def token_positions(positions: torch.Tensor | None, b: int, n: int, device) -> torch.Tensor:
    """``[B, n]`` int positions: the model's ``position_ids`` or ``0..n-1``."""
    if positions is None:
        return torch.arange(n, device=device).expand(b, n)
    return positions.to(device).expand(b, n)


def allowed_blocks(nb: int, causal: bool, block_valid: torch.Tensor | None, device) -> torch.Tensor:
    """``[B or 1, 1, nb, nb]`` bool: key blocks a query block may see (block-causal; real key blocks)."""
    allowed = torch.ones(nb, nb, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed.tril()
    allowed = allowed[None, None]
    if block_valid is not None:
        allowed = allowed & block_valid[:, None, None, :]
    return allowed


def block_valid(valid: torch.Tensor | None, n: int, block: int) -> torch.Tensor | None:
    """``[B, nb]``: blocks holding at least one real token (None: every block)."""
    if valid is None:
        return None
    nb = num_blocks(n, block)
    return nn.functional.pad(valid.to(torch.bool), (0, nb * block - n)).view(-1, nb, block).any(-1)


def scores(qp: torch.Tensor, kp: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Masked logits ``[B, H, nb, nb]`` from projected blocks ``qp [B, H, nb, G]``, ``kp [B, Hkv, nb, G]``."""
    group = qp.shape[1] // kp.shape[1]
    kp = kp.repeat_interleave(group, dim=1)
    logits = (qp @ kp.transpose(-1, -2)) / math.sqrt(qp.shape[-1])
    return logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)


class AttnGate(nn.Module):
    """The AttnGate of one attention layer (see the module docstring); ``forward`` returns its logits.

    Initialisation (the paper is silent; the official code draws N(0, 0.02²)): with ``G = D`` the Q
    projection is the identity and the K projection the identity on the average-pooled part (zero on
    max and min), so an untrained gate scores ``avg(Q)·avg(K)`` — the block attention of the
    average tokens — and training starts from that prior. Otherwise N(0, 1/fan_in).
    """

    def __init__(
        self, heads: int, kv_heads: int, head_dim: int, gate_dim: int, block: int, rope_dims: int = 0
    ):
        super().__init__()
        if heads % kv_heads:
            raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}")
        self.heads, self.kv_heads, self.head_dim, self.gate_dim, self.block = (
            heads,
            kv_heads,
            head_dim,
            gate_dim,
            block,
        )
        self.q_weight = nn.Parameter(torch.empty(heads, head_dim, gate_dim))
        self.k_weight = nn.Parameter(torch.empty(kv_heads, len(K_POOLS) * head_dim, gate_dim))
        # RoPE models: the model's inverse frequencies (saved: restore needs no model code)
        self.register_buffer("inv_freq", torch.zeros(rope_dims // 2))
        self.rope_scaling = 1.0
        self.keep_pooled, self.pooled = False, None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.gate_dim == self.head_dim:
                eye = torch.eye(self.head_dim)
                self.q_weight.copy_(eye.expand_as(self.q_weight))
                self.k_weight.zero_()
                self.k_weight[:, K_POOLS.index("avg") * self.head_dim :].copy_(eye)
            else:
                nn.init.normal_(self.q_weight, std=self.head_dim**-0.5)
                nn.init.normal_(self.k_weight, std=(len(K_POOLS) * self.head_dim) ** -0.5)

    @property
    def uses_rope(self) -> bool:
        return self.inv_freq.numel() > 0

    def pool(self, q, k, valid) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled blocks in the gate's dtype: ``qa [B, H, nb, D]`` (average), ``kb [B, Hkv, nb, 3D]`` (max, min, average)."""
        dt = self.q_weight.dtype
        return pool_blocks(q.to(dt), self.block, valid, ("avg",)), pool_blocks(
            k.to(dt), self.block, valid, K_POOLS
        )

    def project_pooled(self, qa, kb, pos):
        """Projected blocks from pooled ones; ``pos`` ``[B, nb]`` block positions (RoPE models only)."""
        qp = torch.einsum("bhnd,hdg->bhng", qa, self.q_weight)
        kp = torch.einsum("bhnd,hdg->bhng", kb, self.k_weight)
        if self.uses_rope:
            qp, kp = rope(qp, pos, self.inv_freq), rope(kp, pos, self.inv_freq)
        return qp, kp

    def project(self, q, k, valid, positions):
        """Projected blocks ``qp [B, H, nb, G]``, ``kp [B, Hkv, nb, G]`` (RoPE at block positions)."""
        pos = positions[:, :: self.block] if self.uses_rope else None  # [B, nb]: each block's first token
        return self.project_pooled(*self.pool(q, k, valid), pos)

    def logits(self, qa, kb, pos, allowed) -> torch.Tensor:
        """Masked logits from pooled blocks (what :meth:`pool` returns): the trainable part of the gate."""
        return scores(*self.project_pooled(qa, kb, pos), allowed)

    def forward(self, q, k, valid=None, positions=None, causal: bool = False):
        """Logits ``[B, H, nb, nb]`` and ``allowed`` ``[B|1, 1, nb, nb]``. ``q``/``k`` are the attention's
        inputs; for RoPE models they are un-rotated first (the gate pools pre-RoPE Q and K, as the paper).
        With ``keep_pooled`` set, the pooled blocks and block positions stay in ``pooled`` (the
        training cache of :mod:`.cache` reads them)."""
        b, _, n, _ = q.shape
        pos = None
        if self.uses_rope:
            positions = token_positions(positions, b, n, q.device)
            q = rope(q, positions, self.inv_freq, self.rope_scaling, inverse=True)
            k = rope(k, positions, self.inv_freq, self.rope_scaling, inverse=True)
            pos = positions[:, :: self.block]
        qa, kb = self.pool(q, k, valid)
        if self.keep_pooled:
            self.pooled = (qa, kb, pos)
        allowed = allowed_blocks(
            num_blocks(n, self.block), causal, block_valid(valid, n, self.block), q.device
        )
        return self.logits(qa, kb, pos, allowed), allowed

    def extra_repr(self) -> str:
        rope_txt = f", rope {2 * self.inv_freq.numel()} dims" if self.uses_rope else ""
        return f"heads={self.heads}, kv_heads={self.kv_heads}, {self.head_dim}->{self.gate_dim}, block={self.block}{rope_txt}"
