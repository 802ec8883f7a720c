"""The script ``tests/test_train.py`` launches with ``torchrun --nproc_per_node 2`` (CPU, gloo).

It trains the tiny case of :func:`case` under DDP: once straight through, once interrupted right after
a checkpoint and resumed, and once with a batch too small to split. Rank 0 writes the final
parameters (safetensors) and a JSON summary into the folder given as the only argument.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgecompress.data.samples import Batch, SampleSet
from edgecompress.errors import UserError
from edgecompress.train import TrainConfig, fit

STEPS = 5
GLOBAL_BATCH = 7  # odd: shares of 4 and 3 rows; 23 samples make a last batch of 2 (one row per rank)


def _noise(batch: Batch, gen: torch.Generator) -> Batch:
    """An augmentation that draws from the data generator (every rank draws the same global noise)."""
    return Batch(batch.inputs + 0.01 * torch.randn(batch.inputs.shape, generator=gen), batch.labels)


def case(checkpoint_dir: str | None = None) -> tuple[nn.Module, SampleSet, TrainConfig]:
    """A 59 → 97 → 13 MLP (no dropout), 23 labelled samples, AdamW + cosine with warm-up, grad clip."""
    g = torch.Generator().manual_seed(5)
    data = SampleSet(torch.randn(23, 59, generator=g), torch.randint(0, 13, (23,), generator=g))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(59, 97), nn.GELU(), nn.Linear(97, 13))
    cfg = TrainConfig(
        steps=STEPS, lr=1e-2, weight_decay=0.01, warmup_steps=2, batch_size=GLOBAL_BATCH, grad_clip=1.0,
        log_every=1, checkpoint_every=2 if checkpoint_dir else 0, checkpoint_dir=checkpoint_dir,
    )  # fmt: skip
    return model, data, cfg


def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(model(batch.inputs), batch.labels)


def train(checkpoint_dir: str | None = None, stop_at: int | None = None):
    model, data, cfg = case(checkpoint_dir)

    def stop(step, *_):
        if step == stop_at:
            raise KeyboardInterrupt

    try:
        result = fit(model, loss_fn, data, cfg, augment=_noise, callback=stop)
    except KeyboardInterrupt:
        return model, None
    return model, result


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def main(out: Path) -> None:
    from safetensors.torch import save_file

    rank = int(os.environ["RANK"])
    straight, result = train()
    train(str(out / "ckpt"), stop_at=3)  # interrupted right after the checkpoint of step 2
    resumed, resumed_result = train(str(out / "ckpt"))
    model, data, cfg = case()
    try:
        fit(model, loss_fn, data, cfg.override(batch_size=1))
        small_batch_error = None
    except UserError as e:
        small_batch_error = str(e)
    if rank == 0:
        save_file(_params(straight), str(out / "straight.safetensors"))
        save_file(_params(resumed), str(out / "resumed.safetensors"))
        summary = {
            "world_size": result.world_size,
            "losses": result.losses,
            "resumed_from": resumed_result.resumed_from,
            "resumed_losses": resumed_result.losses,
            "small_batch_error": small_batch_error,
        }
        (out / "summary.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
