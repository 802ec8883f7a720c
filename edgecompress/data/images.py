"""Image data: scikit-learn's digits (offline, fixed split) and ImageNet-style class folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgecompress.errors import UserError

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.25
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def digits_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 real 8×8 digits as ``([N, 1, 8, 8]`` floats in [0, 1], ``[N]`` labels).

    The split is fixed: a stratified 75/25 split with seed 0 (1,347 train / 450 test images).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise UserError(f"digits split must be 'train' or 'test', got {split!r}")
    ds = load_digits()
    idx = np.arange(len(ds.target))
    train_idx, test_idx = train_test_split(
        idx, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=ds.target
    )
    sel = train_idx if split == "train" else test_idx
    images = torch.tensor(ds.images[sel] / 16.0, dtype=torch.float32).unsqueeze(1)  # [N, 1, 8, 8]
    return images, torch.tensor(ds.target[sel], dtype=torch.long)


def fit_images(images: torch.Tensor, input_size: tuple[int, int, int], mean, std) -> torch.Tensor:
    """Resize ``[N, C, H, W]`` images in [0, 1] to ``input_size`` (C, H, W), replicate channels, normalize."""
    c, h, w = input_size
    if images.shape[-2:] != (h, w):
        images = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False)
    if images.shape[1] != c:
        if images.shape[1] != 1:
            raise UserError(f"cannot map {images.shape[1]}-channel images to a {c}-channel model")
        images = images.expand(-1, c, -1, -1)
    mean_t = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return ((images - mean_t) / std_t).contiguous()


def imagefolder(path: str, input_size: tuple[int, int, int], mean, std, crop_pct: float = 0.875):
    """ImageNet-style ``root/<class>/<image>`` folders → (``[N, C, H, W]`` normalized, labels, classes).

    Preprocessing follows timm's eval transform: resize the short side to ``H / crop_pct``
    (bicubic), centre-crop ``H × W``, normalize with the model's mean/std.
    """
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import functional as TF

    root = Path(path)
    if not root.is_dir():
        raise UserError(f"imagefolder: {path} is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"imagefolder: {path} has no class sub-folders")
    c, h, w = input_size
    xs, ys = [], []
    for label, cls in enumerate(classes):
        for f in sorted((root / cls).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                img = Image.open(f).convert("RGB" if c == 3 else "L")
            except (UnidentifiedImageError, OSError) as e:
                raise UserError(f"imagefolder: cannot read image {f}: {e}") from None
            img = TF.resize(img, int(round(h / crop_pct)), interpolation=TF.InterpolationMode.BICUBIC)
            img = TF.center_crop(img, [h, w])
            xs.append(TF.normalize(TF.to_tensor(img), mean, std))
            ys.append(label)
    if not xs:
        raise UserError(f"imagefolder: no images found under {path}")
    return torch.stack(xs), torch.tensor(ys), classes
