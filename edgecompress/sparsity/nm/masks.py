"""N:M masks and the packed N:M form, as pure functions on tensors.

An N:M pattern keeps ``n`` of every ``m`` consecutive weights along the reduction (input) dimension
of an ``[out, in]`` Linear weight — the layout sparse tensor cores (2:4) read. Groups are
``w[o, g·m : (g+1)·m]``; ``in`` must be a multiple of ``m``.

* :func:`nm_mask` keeps the ``n`` largest scores of each group (``|w|`` by default); ties go to the
  lower index (a stable sort), so the mask is deterministic.
* :func:`pack` / :func:`unpack`: the kept values ``[out, in·n/m]`` in group order and, per kept
  value, its position inside its group (``ceil(log2 m)`` bits, packed into bytes); exact inverses
  for any weight that obeys the mask.
"""

from __future__ import annotations

import math

import torch


def check_nm(n: int, m: int) -> None:
    if not (isinstance(n, int) and isinstance(m, int)) or not 0 < n < m:
        raise ValueError(f"N:M needs integers 0 < n < m, got n={n}, m={m}")


def fits(weight_shape: tuple[int, ...], m: int) -> bool:
    """Whether a ``[out, in]`` weight can carry an N:M pattern (``in`` a multiple of ``m``)."""
    return len(weight_shape) == 2 and weight_shape[1] % m == 0


def nm_mask(weight: torch.Tensor, n: int, m: int, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of ``weight`` ``[out, in]``: the ``n`` highest ``scores`` (default ``|weight|``) of
    every group of ``m`` along ``in``."""
    check_nm(n, m)
    if not fits(tuple(weight.shape), m):
        raise ValueError(f"a [out, in] weight with in divisible by {m} is needed, got {tuple(weight.shape)}")
    s = (weight.abs() if scores is None else scores).detach().float()
    out, k = s.shape
    groups = s.reshape(out, k // m, m)
    top = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]  # [out, G, n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return mask.reshape(out, k)


def index_bits(m: int) -> int:
    return max(1, math.ceil(math.log2(m)))


def pack(weight: torch.Tensor, mask: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [out, in·n/m], positions packed as uint8)`` of the weights ``mask`` keeps."""
    check_nm(n, m)
    out, k = weight.shape
    g = mask.reshape(out, k // m, m)
    if not bool((g.sum(-1) == n).all()):
        raise ValueError(f"mask is not {n}:{m}: some group does not keep exactly {n} values")
    pos = torch.sort(g.to(torch.uint8), dim=-1, descending=True, stable=True).indices[..., :n]
    pos = pos.sort(dim=-1).values  # [out, G, n] ascending positions in each group
    values = torch.gather(weight.reshape(out, k // m, m), -1, pos).reshape(out, -1)
    return values.contiguous(), _pack_bits(pos.reshape(-1).to(torch.uint8), index_bits(m))


def unpack(
    values: torch.Tensor, packed: torch.Tensor, n: int, m: int, in_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dense weight [out, in], mask)`` from :func:`pack`'s output."""
    check_nm(n, m)
    out = values.shape[0]
    pos = (
        _unpack_bits(packed, index_bits(m), out * in_features // m * n)
        .long()
        .reshape(out, in_features // m, n)
    )
    dense = torch.zeros(out, in_features // m, m, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, pos.to(values.device), values.reshape(out, in_features // m, n))
    mask = torch.zeros_like(dense, dtype=torch.bool).scatter_(-1, pos.to(values.device), True)
    return dense.reshape(out, in_features), mask.reshape(out, in_features)


def _pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    pad = (-codes.numel()) % per
    c = torch.cat([codes, codes.new_zeros(pad)]).reshape(-1, per).to(torch.int32)
    shifts = torch.arange(per, dtype=torch.int32, device=codes.device) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    codes = (packed.to(torch.int32)[:, None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:count].to(torch.uint8)


def density(mask: torch.Tensor) -> float:
    return float(mask.float().mean())
