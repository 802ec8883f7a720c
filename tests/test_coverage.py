"""The report says when the passes leave most of a model alone (oracle: exact parameter counts)."""

from __future__ import annotations

import timm
import torch

from edgecompress.calib import make_context
from edgecompress.job import coverage, coverage_warning
from edgecompress.pipeline import load_builtin_passes, run
from edgecompress.recipe import recipe_from_dict


def test_convnext_with_conv_mlps_warns_that_only_a_little_is_quantized():
    torch.manual_seed(0)
    # convnext_atto runs its MLPs as 1×1 convolutions: uniform_ptq only finds Linears (the head, ignored)
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=10).eval()
    load_builtin_passes()
    passes = recipe_from_dict({"passes": [{"pass": "uniform_ptq", "ignore": []}]}).passes
    batches = [torch.randn(2, 3, 64, 64)]
    ctx = make_context(batches, lambda m, x: m(x), torch.device("cpu"), 0, "image")
    model, _ = run(model, passes, ctx)
    cov = coverage(model)
    weights = [p for p in model.parameters() if p.dim() >= 2]
    assert cov["weights"] == sum(p.numel() for p in weights)
    assert cov["compressed"] == model.head.fc.weight.numel()  # the one Linear
    assert cov["untouched"][0] == "Conv2d"
    line = coverage_warning(cov)
    assert line and f"{cov['fraction'] * 100:.1f}%" in line and "Conv2d" in line


def test_no_warning_when_most_weights_are_compressed():
    assert coverage_warning({"fraction": 0.5, "untouched": ["Linear"]}) is None
    assert coverage_warning({"fraction": 0.49, "untouched": ["Linear"]}) is not None
