"""Samples in memory: :class:`Batch` (model-ready inputs + optional labels) and :class:`SampleSet`.

A training pass gets its data as a :class:`SampleSet` (every sample of one split, so that
:func:`edgecompress.train.fit` can reshuffle each epoch with one seeded generator) or as a plain list of
:class:`Batch` objects. Text inputs are tokenizer dicts of ``[N, T]`` tensors padded to a common width;
:meth:`Batch.rows` trims a subset back to the width of its longest text, so a batch taken from a
``SampleSet`` holds the same tensors as a tokenizer call with ``padding=True`` on just those texts.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from edgecompress.errors import UserError

Inputs = torch.Tensor | dict[str, torch.Tensor]


def _rows_of(inputs: Inputs) -> int:
    first = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs
    return int(first.shape[0])


def _as_index(index) -> slice | torch.Tensor:
    """A slice stays a slice (views, no copy); anything else becomes a 1-D LongTensor of row indices."""
    if isinstance(index, slice):
        return index
    index = torch.as_tensor(index)
    if index.dim() != 1 or index.dtype in (torch.bool, torch.float16, torch.float32, torch.float64):
        raise ValueError(
            f"rows() takes a slice or a 1-D tensor of integer indices, got {index.dtype} {index.shape}"
        )
    return index.long()


def _trim(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the leading and trailing columns where ``attention_mask`` is 0 in every row.

    Only the ends are trimmed (left or right padding); an all-zero column in the middle, which no
    tokenizer produces, is kept. Every value shaped like the mask is trimmed; other values are kept.
    """
    mask = inputs.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return inputs
    used = torch.nonzero(mask.ne(0).any(0)).flatten()
    lo, hi = (int(used[0]), int(used[-1]) + 1) if len(used) else (0, 0)
    if (lo, hi) == (0, mask.shape[1]):
        return inputs
    shape = mask.shape
    return {k: v[:, lo:hi].contiguous() if v.shape[:2] == shape else v for k, v in inputs.items()}


@dataclass(frozen=True)
class Batch:
    """Model-ready inputs (images ``[B, C, H, W]`` or a tokenizer dict of ``[B, T]``) and optional labels.

    ``labels`` is ``[B]`` class ids, or ``None`` (no labels: training distills from a teacher).
    A tokenizer's ``BatchEncoding`` (a mapping, not a dict) is stored as a plain dict.
    """

    inputs: Inputs
    labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if isinstance(self.inputs, Mapping) and not isinstance(self.inputs, dict):
            object.__setattr__(self, "inputs", dict(self.inputs))

    def __len__(self) -> int:
        return _rows_of(self.inputs)

    def rows(self, index) -> Batch:
        """The samples at ``index`` (a slice or 1-D indices); text is trimmed to its longest kept row."""
        index = _as_index(index)
        if isinstance(self.inputs, dict):
            inputs = _trim({k: v[index] for k, v in self.inputs.items()})
        else:
            inputs = self.inputs[index]
        return Batch(inputs, None if self.labels is None else self.labels[index])

    def to(self, device) -> Batch:
        if isinstance(self.inputs, dict):
            inputs = {k: v.to(device) for k, v in self.inputs.items()}
        else:
            inputs = self.inputs.to(device)
        return Batch(inputs, None if self.labels is None else self.labels.to(device))


def _check_samples(inputs, labels, batch_size) -> None:
    values = list(inputs.values()) if isinstance(inputs, dict) else [inputs]
    if not values or not all(torch.is_tensor(v) and v.dim() >= 1 for v in values):
        raise UserError("samples must be a tensor or a dict of tensors, each with a sample dimension")
    sizes = {int(v.shape[0]) for v in values} | ({int(labels.shape[0])} if labels is not None else set())
    if len(sizes) != 1:
        raise UserError(f"samples disagree on their count: {sorted(sizes)} (inputs and labels must match)")
    if sizes == {0}:
        raise UserError("the sample set is empty")
    if labels is not None and labels.dim() != 1:
        raise UserError(f"labels must be a 1-D tensor of class ids, got shape {tuple(labels.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be an integer >= 1, got {batch_size!r}")


class SampleSet:
    """All samples of one split in memory (inputs padded to a common width for text), iterable in batches.

    Iteration is sequential (no shuffling: evaluation order); :func:`edgecompress.train.fit` draws its own
    shuffled batches through :meth:`batch` with ``TrainConfig.batch_size``, not this ``batch_size``.
    """

    def __init__(self, inputs: Inputs | Mapping, labels: torch.Tensor | None = None, batch_size: int = 32):
        if isinstance(inputs, Mapping):
            inputs = dict(inputs)
        _check_samples(inputs, labels, batch_size)
        self._all = Batch(inputs, labels)
        self.batch_size = batch_size

    @property
    def inputs(self) -> Inputs:
        return self._all.inputs

    @property
    def labels(self) -> torch.Tensor | None:
        return self._all.labels

    def __len__(self) -> int:
        return len(self._all)

    def __iter__(self) -> Iterator[Batch]:
        for start in range(0, len(self), self.batch_size):
            yield self._all.rows(slice(start, start + self.batch_size))

    def __repr__(self) -> str:
        return (
            f"SampleSet({len(self)} samples, batch_size={self.batch_size}, labels={self.labels is not None})"
        )

    def batch(self, index) -> Batch:
        """The samples at ``index`` as one :class:`Batch` (see :meth:`Batch.rows`)."""
        return self._all.rows(index)

    def with_batch_size(self, n: int) -> SampleSet:
        """The same samples (shared tensors, no copy) iterated in batches of ``n``."""
        return SampleSet(self.inputs, self.labels, n)
