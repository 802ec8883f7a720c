"""The one training helper every training pass calls: :func:`fit` under a frozen :class:`TrainConfig`.

``fit(model, loss_fn, data, cfg)`` runs ``cfg.steps`` optimizer steps (AdamW / Adam / SGD, warm-up then
a constant / cosine / linear LR factor, optional grad clipping and bf16 autocast), resumable from an
atomic safetensors checkpoint. Launched under ``torchrun`` it wraps the model in PyTorch's
``DistributedDataParallel`` and splits every global batch over the ranks so that the averaged gradient
equals the single-process gradient of that batch: the same code runs on one CPU core or many GPUs.
:func:`task_loss`, :func:`distill_loss` and :func:`default_loss` build the ``loss_fn(model, batch)``
callables the passes use.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from edgecompress.data.samples import Batch, SampleSet
from edgecompress.errors import UserError
from edgecompress.losses import default_loss, distill_loss, task_loss  # noqa: F401  (the public API)
from edgecompress.progress import Progress
from edgecompress.train_config import (  # noqa: F401  (re-exported: the public API)
    OPTIMIZERS,
    SCHEDULES,
    TrainConfig,
    default_optimizer,
    lr_factor,
)
from edgecompress.train_state import STATE_FORMAT, atomic_save, flatten, mismatch, read_state, unflatten

STATE_FILE = "train_state.safetensors"
NOT_IN_FINGERPRINT = ("log_every", "checkpoint_every", "checkpoint_dir")  # they do not change the weights

LossFn = Callable[[nn.Module, Batch], torch.Tensor]
Call = Callable[[nn.Module, object], torch.Tensor]


@dataclass
class FitResult:
    """``steps``: the step reached; ``seconds`` / ``samples_per_s``: this call only (not resumed steps)."""

    steps: int
    seconds: float
    samples_per_s: float
    losses: list[tuple[int, float]]  # (step, loss of that step's global batch) every log_every steps
    resumed_from: int | None
    world_size: int
    final_loss: float


# ---- ranks ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ranks:
    rank: int = 0
    world: int = 1


def process_rank() -> int:
    """This process's rank under torchrun (0 in a plain run): only rank 0 logs and writes files."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def broadcast_from_rank0(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` as rank 0 holds it, under torchrun (joining the process group); ``t`` itself in a plain
    run. For decisions every rank must share (e.g. which units a pruning pass keeps)."""
    ranks = _init_ranks(device)
    if ranks.world == 1:
        return t
    buf = t.to(device).clone()
    dist.broadcast(buf, 0)
    return buf.to(t.device)


def _destroy_at_exit() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _init_ranks(device: torch.device) -> _Ranks:
    """Join the default process group under torchrun (WORLD_SIZE > 1), creating it if nobody did.

    A group created here is kept for the rest of the process and destroyed at exit: re-creating one
    after destroying it is unreliable on torchrun's store, and a pipeline may call ``fit`` many times.
    A group the caller created is used as it is and never destroyed.
    """
    if dist.is_available() and dist.is_initialized():
        return _Ranks(dist.get_rank(), dist.get_world_size())
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _Ranks()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(_destroy_at_exit)
    return _Ranks(dist.get_rank(), dist.get_world_size())


def _share(batch: Batch, ranks: _Ranks) -> tuple[Batch, float]:
    """This rank's contiguous rows of a global batch (shares differ by at most one) and its loss scale.

    The scale ``local_rows * world / global_rows`` turns DDP's average of per-rank means into the
    mean over the global batch, so the gradient equals the single-process one.
    """
    n, w = len(batch), ranks.world
    if w == 1:
        return batch, 1.0
    if n < w:
        raise UserError(
            f"a batch of {n} samples cannot be split over {w} processes (batch_size >= world size)"
        )
    base, extra = divmod(n, w)
    start, size = ranks.rank * base + min(ranks.rank, extra), base + (ranks.rank < extra)
    return batch.rows(slice(start, start + size)), size * w / n


# ---- data ----------------------------------------------------------------------------------------


class _Stream:
    """The global batch of every step: a SampleSet reshuffled each epoch by one generator, or a cycled list."""

    def __init__(self, data, cfg: TrainConfig, augment, ranks: _Ranks):
        if len(data) == 0:
            raise UserError("the training data is empty")
        self.data, self.B, self.augment = data, cfg.batch_size, augment
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.perm: torch.Tensor | None = None
        self.sample_set = isinstance(data, SampleSet)
        self.per_epoch = math.ceil(len(data) / self.B) if self.sample_set else len(data)
        smallest = min(len(data) % self.B or self.B, len(data)) if self.sample_set else min(map(len, data))
        if ranks.world > smallest:
            raise UserError(
                f"batches of {smallest} samples cannot be split over {ranks.world} processes "
                "(batch_size and the last batch of an epoch must be >= world size)"
            )

    def get(self, step: int) -> Batch:
        k = step % self.per_epoch
        if self.sample_set:
            if k == 0 or self.perm is None:
                self.perm = torch.randperm(len(self.data), generator=self.gen)
            batch = self.data.batch(self.perm[k * self.B : (k + 1) * self.B])
        else:
            batch = self.data[k]
        return self.augment(batch, self.gen) if self.augment is not None else batch


# ---- checkpoint (safetensors + JSON skeleton, no pickle) -------------------------------------------


def _fingerprint(cfg: TrainConfig, named: list[tuple[str, nn.Parameter]], world: int) -> dict:
    keep = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IN_FINGERPRINT}
    params = [[n, list(p.shape)] for n, p in named]
    return json.loads(json.dumps({"config": keep, "params": params, "world_size": world}))


def _rng_states(device: torch.device, ranks: _Ranks) -> dict[str, torch.Tensor]:
    """Every rank's torch RNG state (dropout draws differ per rank: shares differ in size)."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    out = {}
    for kind, s in states.items():
        if ranks.world == 1:
            out[f"rng.{kind}.0"] = s
            continue
        comm = s.to(device if device.type == "cuda" else "cpu")
        parts = [torch.empty_like(comm) for _ in range(ranks.world)]
        dist.all_gather(parts, comm)
        out.update({f"rng.{kind}.{r}": p.cpu() for r, p in enumerate(parts)})
    return out


# ---- the loop ------------------------------------------------------------------------------------


@dataclass
class _Run:
    """One fit call's state; its methods are the steps of :func:`fit`."""

    model: nn.Module
    ddp: nn.Module  # the model the loss sees: DDP-wrapped under torchrun, else ``model``
    named: list[tuple[str, nn.Parameter]]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    stream: _Stream
    cfg: TrainConfig
    device: torch.device
    ranks: _Ranks
    losses: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    last_loss: float = float("nan")

    def step(self, s: int, loss_fn: LossFn) -> int:
        """Run 0-based step ``s``; return the number of global samples it used."""
        batch = self.stream.get(s)
        local, scale = _share(batch, self.ranks)
        local = local.to(self.device)
        self.opt.zero_grad(set_to_none=True)
        amp = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if self.cfg.bf16
            else contextlib.nullcontext()
        )
        with amp:
            loss = loss_fn(self.ddp, local)
        if not torch.is_tensor(loss) or loss.dim() != 0:
            raise ValueError("loss_fn must return a scalar tensor (a mean over the batch's samples)")
        if scale != 1.0:
            loss = loss * scale
        self.last_loss = self._mean_over_ranks(loss.detach())  # every rank sees it: all raise together
        if not math.isfinite(self.last_loss):
            raise UserError(
                f"training loss is {self.last_loss} at step {s + 1} (try a lower lr or grad_clip)"
            )
        loss.backward()
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([p for _, p in self.named], self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        if (s + 1) % self.cfg.log_every == 0:
            self.losses.append((s + 1, self.last_loss))
        return len(batch)

    def _mean_over_ranks(self, loss: torch.Tensor) -> float:
        if self.ranks.world == 1:
            return float(loss)
        t = loss.float().reshape(1).clone()
        dist.all_reduce(t)  # the scaled per-rank losses sum to world x the global-batch mean
        return float(t) / self.ranks.world

    def path(self) -> Path:
        return Path(self.cfg.checkpoint_dir) / STATE_FILE

    def save(self, step: int) -> None:
        """Rank 0 writes the whole train state atomically; every rank contributes its RNG state."""
        rng = _rng_states(self.device, self.ranks)
        if self.ranks.rank == 0:
            tensors = {f"param.{n}": p.detach().to("cpu", copy=True) for n, p in self.named}
            tensors.update(
                {f"buffer.{n}": b.detach().to("cpu", copy=True) for n, b in self.model.named_buffers()}
            )
            tensors.update(rng, **{"data.generator": self.stream.gen.get_state()})
            if self.stream.perm is not None:
                tensors["data.perm"] = self.stream.perm.clone()
            meta = {
                "fingerprint": json.dumps(_fingerprint(self.cfg, self.named, self.ranks.world)),
                "optimizer": json.dumps(flatten(self.opt.state_dict(), "optim", tensors)),
                "scheduler": json.dumps(flatten(self.sched.state_dict(), "sched", tensors)),
                "losses": json.dumps(self.losses),
                "run": json.dumps({"format": STATE_FORMAT, "step": step, "last_loss": self.last_loss}),
            }
            atomic_save({k: v.contiguous() for k, v in tensors.items()}, meta, self.path())
        if self.ranks.world > 1:
            dist.barrier()

    def resume(self) -> int | None:
        """Load the checkpoint if there is one; return its step (``None``: starting fresh)."""
        if not self.cfg.checkpoint_dir or not self.path().is_file():
            return None
        info, t = read_state(self.path())
        why = mismatch(info["fingerprint"], _fingerprint(self.cfg, self.named, self.ranks.world))
        if why:
            raise UserError(
                f"checkpoint {self.path()} is from a different run ({why}); delete it or change checkpoint_dir"
            )
        try:
            self._load(info, t)
        except (KeyError, RuntimeError, ValueError) as e:
            raise UserError(
                f"checkpoint {self.path()} is corrupt or incomplete ({str(e)[:120]}); delete it"
            ) from None
        self.losses, self.last_loss = [tuple(x) for x in info["losses"]], info["run"]["last_loss"]
        return int(info["run"]["step"])

    def _load(self, info: dict, t: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.named:
                p.copy_(t[f"param.{n}"])
            for n, b in self.model.named_buffers():
                b.copy_(t[f"buffer.{n}"])
        self.opt.load_state_dict(unflatten(info["optimizer"], t))
        self.sched.load_state_dict(unflatten(info["scheduler"], t))
        self.stream.gen.set_state(t["data.generator"])
        self.stream.perm = t.get("data.perm")
        torch.set_rng_state(t[f"rng.cpu.{self.ranks.rank}"])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(t[f"rng.cuda.{self.ranks.rank}"], self.device)


def _named_trained(model: nn.Module, params: Iterable[nn.Parameter] | None) -> list[tuple[str, nn.Parameter]]:
    named = list(model.named_parameters())
    if params is None:
        out = [(n, p) for n, p in named if p.requires_grad]
    else:
        name_of = {p: n for n, p in named}
        chosen = list(dict.fromkeys(params))
        if any(p not in name_of for p in chosen):
            raise ValueError("params must be parameters of the model")
        out = [(name_of[p], p) for p in chosen]
    if not out:
        raise ValueError("nothing to train: no parameter requires grad (or params is empty)")
    return out


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    data: SampleSet | Sequence[Batch],
    cfg: TrainConfig,
    params: Iterable[nn.Parameter] | None = None,
    make_optimizer: Callable[[list[nn.Parameter], TrainConfig], torch.optim.Optimizer] | None = None,
    augment: Callable[[Batch, torch.Generator], Batch] | None = None,
    callback: Callable[[int, nn.Module, torch.optim.Optimizer, float], None] | None = None,
    device: torch.device | None = None,
    desc: str = "train",
) -> FitResult:
    """Train ``params`` (default: every parameter with requires_grad) of ``model`` for ``cfg.steps`` steps.

    ``loss_fn(model, batch)`` must return the MEAN over the batch's samples. A SampleSet is reshuffled
    each epoch by one generator seeded with ``cfg.seed``, which ``augment(batch, gen)`` also draws
    from; a list of batches is cycled in order. The global torch RNG is NOT reseeded (the caller seeds
    it; dropout draws from it). ``callback(step, model, optimizer, loss)`` (the unwrapped model) runs
    after each step (counted from 1) and before that step's checkpoint, so state it changes in the
    model is saved; state it keeps elsewhere is not. Checkpoints hold the trained parameters and all buffers, optimizer, scheduler,
    data generator and RNG states: a resumed run ends bit-identical to an uninterrupted one (same world
    size; every rank reads the file, so multi-node runs need a shared ``checkpoint_dir``).

    Under torchrun (WORLD_SIZE > 1) the model is wrapped in DDP with ``find_unused_parameters=True``
    (trained subsets and unused heads are common), every rank builds the same global batch and trains
    on its share; only rank 0 shows progress and writes checkpoints.
    """
    named = _named_trained(model, params)
    device = device or named[0][1].device
    flags, was_training = [(p, p.requires_grad) for p in model.parameters()], model.training
    ranks = _init_ranks(device)
    try:
        trained = {p for _, p in named}
        for p in model.parameters():
            p.requires_grad_(p in trained)
        model.train()
        return _fit(model, loss_fn, data, cfg, named, make_optimizer, augment, callback, device, desc, ranks)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _fit(
    model, loss_fn, data, cfg, named, make_optimizer, augment, callback, device, desc, ranks
) -> FitResult:
    opt = (make_optimizer or default_optimizer)([p for _, p in named], cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    ddp = model
    if ranks.world > 1:
        ids = [device] if device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
    run = _Run(model, ddp, named, opt, sched, _Stream(data, cfg, augment, ranks), cfg, device, ranks)
    resumed = run.resume()
    start, seen, t0 = resumed or 0, 0, time.perf_counter()
    bar = tqdm(
        total=cfg.steps, initial=start, desc=desc, unit="step", disable=None if ranks.rank == 0 else True
    )
    # no terminal (a log file, CI): tqdm is off, so throttled progress lines with ETA instead
    lines = Progress(f"{desc}, training step", cfg.steps - start) if bar.disable and ranks.rank == 0 else None
    with bar:
        for s in range(start, cfg.steps):
            seen += run.step(s, loss_fn)
            rate = seen / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{run.last_loss:.4f}", samples_s=f"{rate:.0f}", refresh=False)
            bar.update()
            if lines is not None:
                lines.step(f"loss {run.last_loss:.4f}, {rate:.0f} samples/s")
            if callback is not None:
                callback(s + 1, model, opt, run.last_loss)
            if cfg.checkpoint_every and ((s + 1) % cfg.checkpoint_every == 0 or s + 1 == cfg.steps):
                run.save(s + 1)
    seconds = time.perf_counter() - t0
    return FitResult(
        cfg.steps, seconds, seen / max(seconds, 1e-9), run.losses, resumed, ranks.world, run.last_loss
    )
