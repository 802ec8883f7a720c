"""``--device cuda`` really runs there (GPU machines only; oracle: the same recipe on the CPU, within the
quantization step). Without CUDA, asking for it is a one-line error (tests/test_cli.py)."""

from __future__ import annotations

import json

import pytest
import torch

from edgecompress.cli import main
from tests.test_cli import TINY_VIT

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("recipe", ["uniform_w8a8", "adalog_w4a4"])
def test_compress_on_cuda_matches_cpu(recipe, tmp_path):
    reports = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        args = ["--model", TINY_VIT + "&pretrained=false", "--recipe", recipe, "--out", str(out)]
        args += ["--set", "calibration.samples=8", "--set", "eval.samples=64", "--device", device]
        assert main(["compress", *args]) == 0
        reports[device] = json.loads((out / "report.json").read_text())
    cpu, gpu = (reports[d]["metrics"]["compressed"]["top1_agreement"] for d in ("cpu", "cuda"))
    assert abs(cpu - gpu) <= 5.0  # float reductions differ on the GPU; a code may flip on a few samples
    assert "cuda" in reports["cuda"]["latency_ms"]["note"]
