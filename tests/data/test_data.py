"""Data specs (oracle: known dataset sizes, exact shapes and normalization)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from edgecompress.data.images import digits_split, fit_images, imagefolder
from edgecompress.data.text import builtin_texts, load_texts
from edgecompress.errors import UserError


def test_digits_split_is_fixed_and_disjoint():
    xtr, ytr = digits_split("train")
    xte, yte = digits_split("test")
    assert xtr.shape == (1347, 1, 8, 8) and xte.shape == (450, 1, 8, 8)
    assert float(xtr.min()) == 0.0 and float(xtr.max()) == 1.0
    assert torch.equal(digits_split("test")[0], xte)  # deterministic
    total = torch.bincount(torch.cat([ytr, yte])).float()
    assert bool(((torch.bincount(yte) - 0.25 * total).abs() <= 1).all())  # stratified 25% per class
    flat_tr = {tuple(x.flatten().tolist()) for x in xtr}
    overlap = sum(tuple(x.flatten().tolist()) in flat_tr for x in xte)
    assert overlap <= 5  # the raw set has a few duplicate images, but the split itself is disjoint


def test_fit_images_resizes_replicates_normalizes():
    x = torch.rand(3, 1, 8, 8)
    y = fit_images(x, (3, 32, 40), (0.5, 0.4, 0.3), (0.5, 0.25, 0.2))
    assert y.shape == (3, 3, 32, 40)
    const = fit_images(torch.ones(1, 1, 8, 8), (3, 16, 16), (0.5, 0.4, 0.3), (0.5, 0.25, 0.2))
    torch.testing.assert_close(const[0, :, 0, 0], torch.tensor([1.0, 2.4, 3.5]))
    with pytest.raises(UserError, match="cannot map 2-channel"):
        fit_images(torch.rand(1, 2, 8, 8), (3, 8, 8), (0,) * 3, (1,) * 3)


def test_imagefolder_reads_classes_in_order(tmp_path):
    rng = np.random.default_rng(0)
    for cls, n in (("cat", 2), ("dog", 3)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(
                tmp_path / cls / f"{i}.png"
            )
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    x, y, classes = imagefolder(str(tmp_path), (3, 16, 16), (0.5,) * 3, (0.5,) * 3)
    assert classes == ["cat", "dog"] and y.tolist() == [0, 0, 1, 1, 1] and x.shape == (5, 3, 16, 16)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    (tmp_path / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read image"):
        imagefolder(str(tmp_path), (3, 16, 16), (0.5,) * 3, (0.5,) * 3)


def test_builtin_text_is_real_deterministic_english():
    texts = builtin_texts()
    assert len(texts) >= 200
    assert texts == builtin_texts()
    assert all(8 <= len(t.split()) <= 80 for t in texts)
    train, test = load_texts("text", "train"), load_texts("text", "test")
    assert not set(train) & set(test) and len(train) + len(test) == len(texts)


def test_builtin_text_ignores_what_was_imported_before():
    """Oracle: the set built in a fresh interpreter; one that first imports submodules of the source
    modules (``logging.handlers``, ``unittest.mock``, ...) must build the same list (it used to grow)."""
    import subprocess
    import sys

    code = (
        "import json{}; from edgecompress.data.text import builtin_texts; print(json.dumps(builtin_texts()))"
    )
    extra = ", logging.handlers, unittest.mock, json.tool, email.mime.text, http.cookies, concurrent.futures"
    fresh, loaded = (
        subprocess.run(
            [sys.executable, "-c", code.format(e)], capture_output=True, text=True, check=True
        ).stdout
        for e in ("", extra)
    )
    assert fresh == loaded and len(fresh) > 1000


def test_text_file(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("first line\n\n  second line  \n")
    assert load_texts(f"text:{p}", "test") == ["first line", "second line"]
    with pytest.raises(UserError, match="text file not found"):
        load_texts(f"text:{tmp_path}/none.txt", "test")
