"""The training configuration: :class:`TrainConfig` (a recipe's ``train:`` section), its checks,
the LR schedule (:func:`lr_factor`) and the default optimizer (:func:`default_optimizer`).

:mod:`edgecompress.train` re-exports all of them; :func:`~edgecompress.train.fit` runs a config.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine", "linear")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _betas_ok(b) -> bool:
    return isinstance(b, (tuple, list)) and len(b) == 2 and all(_is_num(x) and 0 <= x < 1 for x in b)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (a recipe's ``train:`` section; pass fields override it).

    ``batch_size`` is the GLOBAL batch: under torchrun each rank takes its share of it. ``warmup_steps``
    may exceed ``steps`` (the warm-up is then cut short). Bad values raise ``ValueError("field: why")``.
    """

    steps: int = 1000
    lr: float = 1e-4
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = 0
    batch_size: int = 32
    grad_clip: float | None = None  # max global grad norm
    bf16: bool = False  # torch.autocast(device_type, dtype=torch.bfloat16) around forward + loss
    seed: int = 0  # seeds the data generator only (shuffle, augmentation); the caller seeds torch
    log_every: int = 10
    checkpoint_every: int = 0  # 0 = no checkpoints
    checkpoint_dir: str | None = None

    def __post_init__(self) -> None:
        for name, ok, why in _checks(self):
            if not ok:
                raise ValueError(f"{name}: {why}, got {getattr(self, name)!r}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    def override(self, **kw) -> TrainConfig:
        """A copy with the fields in ``kw`` whose value is not ``None`` replaced (re-validated)."""
        names = {f.name for f in dataclasses.fields(self)}
        for k in kw:
            if k not in names:
                raise ValueError(f"{k}: not a TrainConfig field (fields: {', '.join(sorted(names))})")
        return dataclasses.replace(self, **{k: v for k, v in kw.items() if v is not None})


def _checks(c: TrainConfig) -> list[tuple[str, bool, str]]:
    ckpt = c.checkpoint_every
    return [
        ("steps", _is_int(c.steps) and c.steps >= 1, "must be an integer >= 1"),
        ("lr", _is_num(c.lr) and c.lr > 0, "must be a finite number > 0"),
        ("optimizer", c.optimizer in OPTIMIZERS, f"must be one of {', '.join(OPTIMIZERS)}"),
        ("betas", _betas_ok(c.betas), "must be two numbers in [0, 1)"),
        ("eps", _is_num(c.eps) and c.eps > 0, "must be a finite number > 0"),
        ("momentum", _is_num(c.momentum) and 0 <= c.momentum < 1, "must be a number in [0, 1)"),
        ("weight_decay", _is_num(c.weight_decay) and c.weight_decay >= 0, "must be a finite number >= 0"),
        ("schedule", c.schedule in SCHEDULES, f"must be one of {', '.join(SCHEDULES)}"),
        ("warmup_steps", _is_int(c.warmup_steps) and c.warmup_steps >= 0, "must be an integer >= 0"),
        ("batch_size", _is_int(c.batch_size) and c.batch_size >= 1, "must be an integer >= 1"),
        (
            "grad_clip",
            c.grad_clip is None or (_is_num(c.grad_clip) and c.grad_clip > 0),
            "must be > 0 or null",
        ),
        ("bf16", isinstance(c.bf16, bool), "must be true or false"),
        ("seed", _is_int(c.seed) and c.seed >= 0, "must be an integer >= 0"),
        ("log_every", _is_int(c.log_every) and c.log_every >= 1, "must be an integer >= 1"),
        ("checkpoint_every", _is_int(ckpt) and ckpt >= 0, "must be an integer >= 0 (0: no checkpoints)"),
        ("checkpoint_dir", c.checkpoint_dir is None or isinstance(c.checkpoint_dir, str), "must be a path"),
        (
            "checkpoint_dir",
            (_is_int(ckpt) and ckpt > 0) == (c.checkpoint_dir is not None),
            "set it together with checkpoint_every > 0",
        ),
    ]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The LR multiplier at 0-based ``step``: linear warm-up times the schedule's decay."""
    w = cfg.warmup_steps
    warm = min(1.0, (step + 1) / w) if w > 0 else 1.0
    if cfg.schedule == "cosine":
        return warm * 0.5 * (1 + math.cos(math.pi * min(1.0, step / cfg.steps)))
    if cfg.schedule == "linear":
        return warm * max(0.0, 1 - step / cfg.steps)
    return warm


def default_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
