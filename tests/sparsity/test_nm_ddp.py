"""The same ``step`` recipe under ``torchrun --nproc_per_node 2`` (CPU, gloo) and in one process
(oracle: the single-process output folder; tolerance: max abs difference ≤ 1e-4 on every saved
tensor, weights ~1e-2 — only the summation order of the averaged gradients differs, and Adam's
division by √v amplifies it for weights with tiny gradients — and the same switch step)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.test_cli import TINY_VIT

RECIPE = """
calibration: {data: digits, samples: 16}
eval: {samples: 32}
train: {data: digits, samples: 64, steps: 8, lr: 1.0e-3, betas: [0.9, 0.9], batch_size: 16, seed: 3}
passes:
  - pass: step
    t_min: 1
    t_max: 4
"""


def _compress(cmd_prefix: list[str], out: Path, recipe: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["compress", "--model", TINY_VIT + "&pretrained=false", "--recipe", str(recipe), "--out", str(out)]
    args += list(extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd_prefix, *args], env=env, capture_output=True, text=True, timeout=600)


def one_and_two_processes(
    tmp_path: Path, recipe_text: str, *extra: str, atol: float = 1e-4
) -> tuple[dict, dict]:
    """Compress ``recipe_text`` (CLI args ``extra`` appended) in one process (``tmp_path/one``) and
    under ``torchrun --nproc_per_node 2`` (``tmp_path/two``): both succeed, only rank 0 prints, and
    every saved tensor has the same dtype and shape and agrees within ``atol`` (0: bit-identical).
    Returns both pass records (``report.json``'s first pass)."""
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.is_file():
        pytest.skip("torchrun is not installed")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text)
    one = _compress([sys.executable, "-m", "edgecompress"], tmp_path / "one", recipe, *extra)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _compress(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "edgecompress"],
        tmp_path / "two",
        recipe,
        *extra,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("compress time") == 1  # rank 0 alone prints and writes
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    diffs = {k: float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a}
    assert max(diffs.values()) <= atol, sorted(diffs.items(), key=lambda kv: -kv[1])[:5]
    ra, rb = (json.loads((tmp_path / d / "report.json").read_text())["passes"][0] for d in ("one", "two"))
    return ra, rb


def test_step_recipe_under_torchrun_equals_one_process(tmp_path):
    ra, rb = one_and_two_processes(tmp_path, RECIPE)
    assert ra["info"]["switch_step"] == rb["info"]["switch_step"]
    assert rb["info"]["training"]["world_size"] == 2
