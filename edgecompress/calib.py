"""Calibration: data → ``forward_loop(model)`` callables, and activation capture helpers.

Passes that need statistics register hooks with :func:`observe` / :func:`capture_inputs`, which
run the context's loop and always remove their hooks (``finally``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from edgecompress.errors import UserError
from edgecompress.pipeline import Context


def make_context(
    batches: Sequence, call: Callable[[nn.Module, object], object], device: torch.device, seed: int = 0
) -> Context:
    """A :class:`Context` whose loop runs ``call(model, batch)`` on every batch without gradients."""
    if not batches:
        raise UserError("calibration data is empty")
    for b in batches:
        for t in b.values() if isinstance(b, dict) else [b]:
            if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
                raise UserError("calibration data contains NaN or infinite values")

    def forward_loop(model: nn.Module) -> None:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for b in tqdm(batches, desc="calibration", unit="batch", leave=False, disable=None):
                    call(model, b)
        finally:
            model.train(was_training)

    return Context(example_inputs=(batches[0],), forward_loop=forward_loop, device=device, seed=seed)


@dataclass
class ActivationStats:
    """Running min/max of a tensor stream and a bounded, seeded random sample of its values."""

    cap: int = 65536
    seed: int = 0
    lo: float = float("inf")
    hi: float = float("-inf")
    sample: torch.Tensor | None = None
    count: int = 0
    _gen: torch.Generator = field(default=None, repr=False)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().flatten()
        if not torch.isfinite(x).all():
            raise UserError("non-finite activations during calibration (NaN/inf in the model or data)")
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        self.count += x.numel()
        merged = x if self.sample is None else torch.cat([self.sample, x])
        if merged.numel() > self.cap:
            if self._gen is None:
                self._gen = torch.Generator().manual_seed(self.seed)
            merged = merged[torch.randperm(merged.numel(), generator=self._gen)[: self.cap]]
        self.sample = merged


def observe(
    model: nn.Module,
    names: Sequence[str],
    forward_loop: Callable[[nn.Module], None],
    cap: int = 65536,
    seed: int = 0,
) -> dict[str, ActivationStats]:
    """Statistics of the input of each named module over one run of ``forward_loop``."""
    stats = {n: ActivationStats(cap=cap, seed=seed) for n in names}
    hooks = []
    try:
        for n in names:
            hooks.append(
                model.get_submodule(n).register_forward_pre_hook(lambda m, a, s=stats[n]: s.update(a[0]))
            )
        forward_loop(model)
    finally:
        for h in hooks:
            h.remove()
    return stats


def capture_inputs(
    model: nn.Module, names: Sequence[str], forward_loop: Callable[[nn.Module], None]
) -> dict[str, list[torch.Tensor]]:
    """Every input tensor (first positional argument) of each named module over one loop run."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = []
    try:
        for n in names:
            hooks.append(
                model.get_submodule(n).register_forward_pre_hook(
                    lambda m, a, s=seen[n]: s.append(a[0].detach())
                )
            )
        forward_loop(model)
    finally:
        for h in hooks:
            h.remove()
    return seen
