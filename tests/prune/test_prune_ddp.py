"""``prune_structured`` with ``recover_steps`` under ``torchrun --nproc_per_node 2`` (CPU, gloo) against one
process (oracle: the single-process output folder). Both ranks keep the same units (rank 0's choice is
broadcast), so the folders have the same shapes; the fine-tuned tensors agree within 1e-4 (only the
summation order of the averaged gradients differs, as in tests/sparsity/test_nm_ddp.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.sparsity.test_nm_ddp import _compress

RECIPE = """
calibration: {data: digits, samples: 16}
eval: {samples: 32}
train: {data: digits, samples: 64, steps: 4, lr: 1.0e-3, batch_size: 16, seed: 3}
passes:
  - pass: prune_structured
    budget: {params: 0.4}
    round_to: 4
    curve_points: 3
    recover_steps: 4
"""


def test_prune_recovery_under_torchrun_equals_one_process(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.is_file():
        pytest.skip("torchrun is not installed")
    recipe = tmp_path / "prune.yaml"
    recipe.write_text(RECIPE)
    one = _compress([sys.executable, "-m", "edgecompress"], tmp_path / "one", recipe)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _compress(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "edgecompress"],
        tmp_path / "two",
        recipe,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    diffs = {k: float((a[k].float() - b[k].float()).abs().max()) for k in a}
    assert max(diffs.values()) <= 1e-4, sorted(diffs.items(), key=lambda kv: -kv[1])[:5]
    ra, rb = (
        json.loads((tmp_path / d / "report.json").read_text())["passes"][0]["info"] for d in ("one", "two")
    )
    assert [g["kept"] for g in ra["prune"]["groups"]] == [g["kept"] for g in rb["prune"]["groups"]]
    assert any(g["kept"] < g["units"] for g in ra["prune"]["groups"])
    assert rb["training"]["world_size"] == 2 and rb["training"]["steps"] == 4
