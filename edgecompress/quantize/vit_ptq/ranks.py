"""Calibration units across torchrun processes: which rank searches which unit, and the exchange.

Every unit's search needs only the float model's inputs to that unit (the papers' protocol: all
searches see full-precision inputs), so under ``torchrun --nproc_per_node N`` every rank walks the
blocks in the same order and does the same cheap work — capture, token subsampling (one seeded
generator), the post-LN reparameterization fold (which later captures see) — and runs only the
searches of the units it owns. The owner of each unit is decided greedily from an estimate of its
cost (:func:`unit_cost`, from shapes alone, so every rank computes the same assignment without
talking); at the end every rank's results are gathered by every rank (``all_gather`` of their JSON
text: numbers in ``repr`` form round-trip exactly, and nothing is pickled), so all ranks hold the
same model, install it the same way, and rank 0 writes it. The process group is the one of
:func:`edgecompress.train._init_ranks` (gloo on CPU, nccl on CUDA); the exchange itself runs on a
gloo subgroup with a long timeout (:func:`exchange_group`). One process needs no group at all.
"""

from __future__ import annotations

import dataclasses
import datetime
import json

import torch
import torch.distributed as dist

MIN_HEAD_MACS = 2**18
# Relative costs for the assignment, in ns per input element and candidate on one core of this
# CPU with bf16 scoring (measured): a multiply-add of the candidate product, the uniform and the
# AdaLog candidate quantization (one fused pass each; the AdaLog table lookup is the larger).
MAC, UNIFORM, LOG = 0.0016, 0.85, 2.5


class Assigner:
    """Greedy longest-first by arrival: each unit goes to the rank with the least estimated work."""

    def __init__(self, world: int):
        self.load = [0.0] * world

    def owner(self, cost: float) -> int:
        rank = min(range(len(self.load)), key=lambda r: (self.load[r], r))
        self.load[rank] += cost
        return rank


def linear_macs(t: int, k: int, o: int) -> float:
    """Multiply-adds of one input candidate's product (the larger of a Linear's two searches)."""
    return t * k * min(k, o)


def attention_macs(shapes: list[tuple[int, int, int, int]]) -> float:
    """Multiply-adds of one Q candidate's products over groups of ``(B, H, N, D)``; 0 when the
    per-head matrices are smaller than :data:`MIN_HEAD_MACS` (batched tiny products gain nothing
    in bf16: measured 0.75× the fp32 rate at MiniLM's 40×32×32, 4.4× at DeiT-S's 197×64×64)."""
    if min(n * d * min(d, n) for _, _, n, d in shapes) < MIN_HEAD_MACS:
        return 0.0
    return sum(b * h * n * d * min(d, n) for b, h, n, d in shapes)


def linear_cost(t: int, k: int, o: int, log_input: bool = False) -> float:
    """Estimated seconds-like cost of one Linear search: per candidate (768 or, for AdaLog's joint
    search, 896), the input ``T·K·(quantize + min(K, O)·MAC)`` and the weight ``O·K·min(K, T)·MAC``."""
    quant, cands = (LOG, 896) if log_input else (UNIFORM, 768)
    return cands * t * k * (quant + min(k, o) * MAC) + 768 * o * k * min(k, t) * MAC


def attention_cost(shapes: list[tuple[int, int, int, int]], log_probs: bool = True) -> float:
    """Estimated cost of the two matmul searches over groups of ``(B, H, N, D)``: Q and K (768
    candidates, the smaller of D and N reduced), V (768, N reduced) and the softmax (128, D)."""
    tot = 0.0
    for b, h, n, d in shapes:
        tot += 768 * b * h * n * d * (3 * UNIFORM + (2 * min(d, n) + n) * MAC)
        tot += 128 * b * h * n * n * ((LOG if log_probs else UNIFORM) + d * MAC)
    return tot


# --- JSON encoding of search results (tensors as nested lists with their dtype) --------------------


def _encode(v):
    if torch.is_tensor(v):
        return {"__tensor__": v.detach().cpu().tolist(), "dtype": str(v.dtype).removeprefix("torch.")}
    if isinstance(v, dict):
        return {k: _encode(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_encode(x) for x in v]
    return v


def _decode(v, device: torch.device):
    if isinstance(v, dict) and "__tensor__" in v:
        return torch.tensor(v["__tensor__"], dtype=getattr(torch, v["dtype"]), device=device)
    if isinstance(v, dict):
        return {k: _decode(x, device) for k, x in v.items()}
    if isinstance(v, list):
        return [_decode(x, device) for x in v]
    return v


def to_json(results: dict[int, dict]) -> str:
    """``{unit index: {name: dataclass}}`` → JSON text."""
    return json.dumps(
        {str(i): {k: _encode(dataclasses.asdict(p)) for k, p in r.items()} for i, r in results.items()}
    )


def from_json(text: str, types: dict[str, type], device: torch.device) -> dict[int, dict]:
    """Inverse of :func:`to_json`; ``types`` maps each name to its dataclass."""
    raw = json.loads(text)
    return {int(i): {k: types[k](**_decode(p, device)) for k, p in r.items()} for i, r in raw.items()}


EXCHANGE_TIMEOUT = datetime.timedelta(hours=48)


def exchange_group(world: int):
    """A gloo group over all ranks for the final exchange (collective: every rank calls it, in the
    same place). Its own timeout: ranks finish their searches at different times, and the default
    group's (30 min for gloo, 10 for nccl) is shorter than a long CPU calibration's imbalance.
    The results are a few MB of text, so CPU tensors over gloo serve CPU and GPU runs alike."""
    return dist.new_group(backend="gloo", timeout=EXCHANGE_TIMEOUT) if world > 1 else None


def gather_results(
    mine: dict[int, dict], types: dict[str, type], group, device: torch.device
) -> dict[int, dict]:
    """Every rank's results on every rank (two ``all_gather`` calls over ``group``: sizes, then
    padded bytes); ``group`` None (one process) returns ``mine``."""
    if group is None:
        return mine
    world = dist.get_world_size(group)
    data = torch.frombuffer(bytearray(to_json(mine).encode()), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64), group=group)
    top = int(max(s.item() for s in sizes))
    padded = torch.zeros(top, dtype=torch.uint8)
    padded[: data.numel()] = data
    parts = [torch.empty(top, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    merged: dict[int, dict] = {}
    for part, size in zip(parts, sizes):
        merged.update(from_json(part[: int(size.item())].numpy().tobytes().decode(), types, device))
    return merged
