"""Calibration: data → a :class:`~edgecompress.pipeline.Context`, and the hook context of passes.

Passes that need statistics use :func:`observe` / :func:`capture_inputs` / :func:`capture`, which
run the context's loop and always remove their hooks (``finally``). :func:`observe` and
:func:`capture` are padding-aware: they read each model call's ``attention_mask`` so padding tokens
stay out of the statistics (:func:`real_tokens`, :meth:`Captured.tokens`,
:meth:`Captured.attention_groups`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from edgecompress.data.samples import Batch
from edgecompress.errors import UserError
from edgecompress.pipeline import Context


def to_device(inputs, device: torch.device):
    """A model input (tensor, dict of tensors or :class:`Batch`) on ``device``."""
    if isinstance(inputs, Batch):
        return inputs.to(device)
    if isinstance(inputs, dict):
        return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in inputs.items()}
    return inputs.to(device) if torch.is_tensor(inputs) else inputs


def device_call(call: Callable, device: torch.device) -> Callable:
    """``call(model, inputs)`` that accepts a :class:`Batch` or raw inputs and moves them to ``device``."""

    def run(model: nn.Module, batch):
        inputs = batch.inputs if isinstance(batch, Batch) else batch
        return call(model, to_device(inputs, device))

    return run


def check_finite(batches: Sequence, what: str) -> None:
    if not batches:
        raise UserError(f"{what} data is empty")
    for b in batches:
        b = b.inputs if isinstance(b, Batch) else b
        for t in b.values() if isinstance(b, dict) else [b]:
            if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
                raise UserError(f"{what} data contains NaN or infinite values")


def head(inputs, n: int | None):
    """The first ``n`` samples of a model input (a tensor or a dict of tensors); all if ``n`` is None."""
    if n is None:
        return inputs
    if isinstance(inputs, dict):
        return {k: (v[:n] if torch.is_tensor(v) else v) for k, v in inputs.items()}
    return inputs[:n]


def example_run(ctx: Context) -> Callable[[nn.Module], object]:
    """One forward of a model on (the first two samples of) the context's example batch."""
    return lambda model: ctx.call(model, head(ctx.example_inputs[0], 2))


def make_forward_loop(batches: Sequence, call: Callable) -> Callable[[nn.Module], None]:
    """A loop running ``call(model, batch)`` on every batch in eval mode without gradients."""

    def forward_loop(model: nn.Module) -> None:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for b in tqdm(batches, desc="calibration", unit="batch", leave=False, disable=None):
                    call(model, b)
        finally:
            model.train(was_training)

    return forward_loop


def make_context(
    batches: Sequence,
    call: Callable[[nn.Module, object], object],
    device: torch.device,
    seed: int = 0,
    kind: str = "image",
    data: Callable[[str], object] | None = None,
    train=None,
) -> Context:
    """A :class:`Context` whose loop runs ``call(model, batch)`` on ``batches`` (raw inputs or
    :class:`Batch`) on ``device``; ``data(split)`` serves ``ctx.batches`` (training passes; without
    it every split is the calibration batches); ``train`` is the TrainConfig (default: its defaults)."""
    from edgecompress.train import TrainConfig

    check_finite(batches, "calibration")
    run = device_call(call, device)
    if data is None:
        as_batches = [b if isinstance(b, Batch) else Batch(b) for b in batches]

        def data(split: str) -> list[Batch]:
            return as_batches

    example = batches[0].inputs if isinstance(batches[0], Batch) else batches[0]
    return Context(
        example_inputs=(to_device(example, device),),
        forward_loop=make_forward_loop(batches, run),
        call=run,
        device=device,
        seed=seed,
        kind=kind,
        batches=data,
        train=train if train is not None else TrainConfig(),
    )


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


def real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The values of ``x`` at real (unpadded) tokens where ``mask`` (``[b, N]``, 1 = real) fits it:
    ``[b, N, ·]`` token rows, ``[b, H, N, D]`` per-head rows and ``[b, H, N, N]`` attention
    probabilities (real query rows × real key columns); anything else unchanged (flattened)."""
    if mask is None or mask.dim() != 2:
        return x.reshape(-1)
    b, n = mask.shape
    keep = mask.bool()
    if x.dim() == 3 and tuple(x.shape[:2]) == (b, n):
        return x[keep].reshape(-1)
    if x.dim() == 4 and x.shape[0] == b and x.shape[2] == n:
        if x.shape[3] == n:  # probabilities: masked keys have probability ~0 and would skew the sample
            return torch.cat([x[i][:, keep[i]][:, :, keep[i]].reshape(-1) for i in range(b)])
        return x.transpose(1, 2)[keep].reshape(-1)
    return x.reshape(-1)


def observe(
    model: nn.Module,
    names: Sequence[str],
    forward_loop: Callable[[nn.Module], None],
    cap: int = 65536,
    seed: int = 0,
    outputs: frozenset[str] = frozenset(),
) -> dict[str, ActivationStats]:
    """Statistics of the input of each named module (its output for the names in ``outputs``) over
    one run of ``forward_loop``; padding tokens of text batches (the call's ``attention_mask``)
    are left out (:func:`real_tokens`)."""
    stats = {n: ActivationStats(cap=cap, seed=seed) for n in names}
    hooks = []
    with tracking_mask(model) as current:
        try:
            for n in names:
                mod, s = model.get_submodule(n), stats[n]
                if n in outputs:
                    hook = mod.register_forward_hook(
                        lambda m, a, y, s=s: s.update(real_tokens(y, current["mask"]))
                    )
                else:
                    hook = mod.register_forward_pre_hook(
                        lambda m, a, s=s: s.update(real_tokens(a[0], current["mask"]))
                    )
                hooks.append(hook)
            forward_loop(model)
        finally:
            for h in hooks:
                h.remove()
    return stats


@contextlib.contextmanager
def tracking_mask(model: nn.Module):
    """Yields ``{"mask": ...}``, the ``attention_mask`` of the model call in progress (None without one)."""
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def on_call(_m, args, kwargs):
        current["mask"] = _batch_info(args, kwargs)[1]

    hook = model.register_forward_pre_hook(on_call, with_kwargs=True)
    try:
        yield current
    finally:
        hook.remove()


def token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Rows ``[T, K]`` of a ``[b, N, K]`` (or any ``[..., K]``) tensor, without the padding tokens where
    ``mask`` (``[b, N]``, 1 = real) fits it."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


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


def _batch_info(args, kwargs) -> tuple[int, torch.Tensor | None]:
    """Batch size of a model call and its ``attention_mask`` (text models), if any."""
    mask = kwargs.get("attention_mask")
    for t in list(args) + list(kwargs.values()):
        if torch.is_tensor(t) and t.dim() > 0:
            return int(t.shape[0]), mask
    return 1, mask


@dataclass
class Captured:
    """Per-call inputs of the captured modules and the matching attention masks (or None)."""

    inputs: dict[str, list[torch.Tensor]]
    masks: list[torch.Tensor | None]

    def tokens(self, name: str) -> torch.Tensor:
        """Rows ``[T, K]`` of a Linear's input, without padding tokens where a mask says so."""
        rows = []
        for i, t in enumerate(self.inputs[name]):
            rows.append(token_rows(t, self.masks[i] if i < len(self.masks) else None))
        return torch.cat(rows)

    def attention_groups(self, names: list[str]) -> list[tuple[torch.Tensor, ...]]:
        """The attention operands ``names`` (q, k, v, probs: ``[b, H, N, ·]`` per call) grouped by
        shape: tuples of ``[B_g, H, N_g, ·]``, smallest first. Where a call has an attention mask
        ``[b, N]``, each sample keeps only its real tokens (rows of q, k, v; rows and columns of
        the probabilities) and samples with equal token counts are stacked."""
        groups: dict[tuple, list[tuple[torch.Tensor, ...]]] = {}
        for i, ts in enumerate(zip(*(self.inputs[n] for n in names))):
            m = self.masks[i] if i < len(self.masks) else None
            if m is None or not _mask_fits(m, ts):
                groups.setdefault(tuple(t.shape[1:] for t in ts), []).append(ts)
                continue
            for j, keep in enumerate(m.bool()):
                if keep.any():
                    part = tuple(t[j : j + 1, :, keep] for t in ts[:-1]) + (
                        ts[-1][j : j + 1, :, keep][..., keep],
                    )
                    groups.setdefault(tuple(t.shape[1:] for t in part), []).append(part)
        return [tuple(torch.cat(p) for p in zip(*groups[key])) for key in sorted(groups)]


def _mask_fits(mask: torch.Tensor, ts: tuple[torch.Tensor, ...]) -> bool:
    """A ``[b, N]`` mask applies to q, k, v ``[b, H, N, D]`` and probabilities ``[b, H, N, N]``."""
    if mask.dim() != 2:
        return False
    b, n = mask.shape
    return all(t.dim() == 4 and t.shape[0] == b and t.shape[2] == n for t in ts) and ts[-1].shape[3] == n


def capture(
    model: nn.Module, names: list[str], forward_loop: Callable[[nn.Module], None], max_samples: int
) -> Captured:
    """Inputs of each named module over the loop (one tensor per call), limited to the first
    ``max_samples`` samples (a module called once per model call; Swin windows stay batch-major)."""
    calls: list[tuple[int, torch.Tensor | None]] = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: calls.append(_batch_info(a, kw)), with_kwargs=True
    )
    try:
        seen = capture_inputs(model, names, forward_loop)
    finally:
        hook.remove()
    sizes = [b for b, _ in calls]
    masks = _first_samples([m if m is not None else torch.empty(b, 0) for b, m in calls], sizes, max_samples)
    masks = [m if m.numel() else None for m in masks]
    return Captured({n: _first_samples(ts, sizes, max_samples) for n, ts in seen.items()}, masks)


def _first_samples(ts: list[torch.Tensor], sizes: list[int], max_samples: int) -> list[torch.Tensor]:
    if len(ts) != len(sizes):  # not once per model call: keep everything
        return ts
    out, left = [], max_samples
    for t, b in zip(ts, sizes):
        if left <= 0:
            break
        take = min(b, left)
        out.append(t if take == b else t[: t.shape[0] * take // b])
        left -= take
    return out
