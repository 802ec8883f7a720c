"""The ``seer_attention`` recipe under ``torchrun --nproc_per_node 2`` (CPU, gloo) and in one process
(oracle: the single-process output folder; tolerance: max abs difference ≤ 1e-5 on every saved
tensor — the gates start at the identity, steps of lr 1e-2 move them by ~1e-1, and only the
summation order of the averaged gradients differs — and the same held-out KL to 4 decimals)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_cli import TINY_VIT

RECIPE = """
calibration: {data: digits, samples: 8}
eval: {samples: 16}
train: {data: digits, samples: 32, steps: 4, lr: 1.0e-2, batch_size: 8, seed: 3}
passes:
  - pass: seer_attention
    block: 16
    lr: null
"""


def _compress(cmd_prefix: list[str], out: Path, recipe: Path) -> subprocess.CompletedProcess:
    args = ["compress", "--model", TINY_VIT + "&pretrained=false", "--recipe", str(recipe), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*cmd_prefix, *args, "--no-export"], env=env, capture_output=True, text=True, timeout=600
    )


def test_seer_recipe_under_torchrun_equals_one_process(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.is_file():
        pytest.skip("torchrun is not installed")
    recipe = tmp_path / "seer.yaml"
    recipe.write_text(RECIPE)
    one = _compress([sys.executable, "-m", "edgecompress"], tmp_path / "one", recipe)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _compress(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "edgecompress"],
        tmp_path / "two",
        recipe,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("compress time") == 1  # rank 0 alone prints and writes
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    assert a.keys() == b.keys() and any(".gate." in k for k in a)
    diffs = {k: float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].numel()}
    assert max(diffs.values()) <= 1e-5, sorted(diffs.items(), key=lambda kv: -kv[1])[:5]
    k_weight = a[
        "blocks.0.attn.ec_attn.core.gate.k_weight"
    ]  # [Hkv, 3D, D], identity on the avg part at start
    start = torch.zeros_like(k_weight)
    start[:, -k_weight.shape[-1] :] = torch.eye(k_weight.shape[-1])
    assert float((k_weight - start).abs().max()) > 1e-3  # the gates did move
    ra, rb = (
        json.loads((tmp_path / d / "report.json").read_text())["passes"][0]["info"] for d in ("one", "two")
    )
    assert rb["training"]["world_size"] == 2 and ra["training"]["world_size"] == 1
    assert round(ra["seer"]["kl_held_out"]["after"], 4) == round(rb["seer"]["kl_held_out"]["after"], 4)
