"""Graph inputs for export, verification and benchmarks: named tensors that fit a loaded model.

Images: ``pixel_values [B, C, H, W]``. Text: ``input_ids``, ``attention_mask`` (and
``token_type_ids`` when the tokenizer or config has them), ``[B, T]``. Real data (digits, the
built-in text) when the model can take it, else seeded synthetic tensors of the same form.
"""

from __future__ import annotations

import torch

from edgecompress.models.loading import LoadedModel

SYNTH_ID_RANGE = (100, 1000)  # token ids below every vocabulary size we meet


def input_names(loaded: LoadedModel) -> list[str]:
    """Graph input names in call order."""
    if loaded.kind == "image":
        return ["pixel_values"]
    names = ["input_ids", "attention_mask"]
    cfg = getattr(loaded.model, "config", None)
    if getattr(cfg, "type_vocab_size", 0) and loaded.kind == "encoder":
        names.append("token_type_ids")
    return names


def output_name(loaded: LoadedModel) -> str:
    return "last_hidden_state" if loaded.kind == "encoder" else "logits"


def as_tuple(loaded: LoadedModel, batch) -> tuple[torch.Tensor, ...]:
    """A model-ready batch (tensor or dict) → the graph's positional inputs."""
    if loaded.kind == "image":
        return (batch,)
    out = []
    for name in input_names(loaded):
        t = batch.get(name)
        out.append(torch.zeros_like(batch["input_ids"]) if t is None else t)
    return tuple(out)


def as_batch(loaded: LoadedModel, tensors: tuple[torch.Tensor, ...]):
    """Inverse of :func:`as_tuple`."""
    return tensors[0] if loaded.kind == "image" else dict(zip(input_names(loaded), tensors))


def synthetic(loaded: LoadedModel, batch: int, seq: int = 128, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded random inputs of the model's form (images ~ N(0, 1); token ids in a range every
    vocabulary has; full masks). ``seq`` is capped at the model's ``max_position_embeddings``."""
    gen = torch.Generator().manual_seed(seed)
    if loaded.kind == "image":
        c, h, w = tuple(loaded.data_cfg.get("input_size", (3, 224, 224)))
        return (torch.randn(batch, c, h, w, generator=gen),)
    cfg = getattr(loaded.model, "config", None)
    seq = min(seq, getattr(cfg, "max_position_embeddings", seq) or seq)
    hi = min(SYNTH_ID_RANGE[1], getattr(cfg, "vocab_size", SYNTH_ID_RANGE[1]) or SYNTH_ID_RANGE[1])
    ids = torch.randint(min(SYNTH_ID_RANGE[0], hi - 1), hi, (batch, seq), generator=gen)
    tensors = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": torch.zeros_like(ids),
    }
    return tuple(tensors[n] for n in input_names(loaded))


def _can_use_real_data(loaded: LoadedModel) -> bool:
    return loaded.kind == "image" or bool(loaded.tokenizer_dir)


def sample_batches(
    loaded: LoadedModel, samples: int, batch: int, data: str | None = None
) -> tuple[list[tuple[torch.Tensor, ...]], list[int]]:
    """Up to ``samples`` real samples (eval split) in batches of exactly ``batch`` rows, and how
    many rows of each are real (the last batch is padded by repeating its last row).

    Falls back to seeded synthetic inputs when the model has no matching data (no tokenizer).
    """
    from edgecompress.data.specs import load_data

    if not _can_use_real_data(loaded):
        n = max(1, -(-samples // batch))
        return [synthetic(loaded, batch, seed=i) for i in range(n)], [batch] * n
    got = load_data(data, loaded, "test", samples, batch)
    tuples = [as_tuple(loaded, b) for b in got.batches]
    return [pad_batch(t, batch) for t in tuples], [min(batch, t[0].shape[0]) for t in tuples]


def pad_batch(tensors: tuple[torch.Tensor, ...], batch: int) -> tuple[torch.Tensor, ...]:
    """Repeat the last row until the batch has ``batch`` rows (for static-batch graphs)."""
    n = tensors[0].shape[0]
    if n >= batch:
        return tuple(t[:batch] for t in tensors)
    return tuple(torch.cat([t, t[-1:].expand(batch - n, *t.shape[1:])]) for t in tensors)
