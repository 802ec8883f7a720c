"""``prune_structured`` with ``recover_steps`` under ``torchrun --nproc_per_node 2`` (CPU, gloo) against one
process (oracle: the single-process output folder). Both ranks keep the same units (rank 0's choice is
broadcast), so the folders have the same shapes; the fine-tuned tensors agree within 1e-4 (only the
summation order of the averaged gradients differs, as in tests/sparsity/test_nm_ddp.py)."""

from __future__ import annotations

from tests.sparsity.test_nm_ddp import one_and_two_processes

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
    ra, rb = (r["info"] for r in one_and_two_processes(tmp_path, RECIPE))
    assert [g["kept"] for g in ra["prune"]["groups"]] == [g["kept"] for g in rb["prune"]["groups"]]
    assert any(g["kept"] < g["units"] for g in ra["prune"]["groups"])
    assert rb["training"]["world_size"] == 2 and rb["training"]["steps"] == 4
