"""The ``acm`` pass under ``torchrun --nproc_per_node 2`` (CPU, gloo) and in one process.

Phases I (distillation) and II (gate pre-training) are deterministic given the data, so the two
runs must agree on every saved tensor (oracle: the single-process output folder; tolerance: max abs
difference ≤ 1e-4, weights ~1e-1 — only the summation order of the averaged gradients differs).
Phase III samples Gumbel noise per rank, so it runs here (under DDP: the budget, entropy and
diversity terms on each rank's shard) with a learning rate of 1e-12, which keeps its update below
the tolerance; the test still fails if phase III breaks under DDP or if ranks disagree.
"""

from __future__ import annotations

from safetensors.torch import load_file

from tests.sparsity.test_nm_ddp import one_and_two_processes

RECIPE = """
calibration: {data: digits, samples: 16}
eval: {samples: 32}
train: {data: digits, samples: 64, steps: 2, lr: 1.0e-12, batch_size: 16, seed: 3}
passes:
  - pass: acm
    n_learners: 4
    distill_steps: 4
    gate_steps: 4
"""


def test_acm_under_torchrun_equals_one_process(tmp_path):
    ra, rb = one_and_two_processes(tmp_path, RECIPE)  # every saved tensor within 1e-4
    assert any(".gate." in k for k in load_file(str(tmp_path / "two" / "model.safetensors")))
    phases = rb["info"]["training"]
    assert set(phases) == {"distill", "gates", "end_to_end"} and all(p["steps"] for p in phases.values())
    assert all(p["world_size"] == 2 for p in phases.values())
    la, lb = (r["info"]["training"]["distill"]["final_loss"] for r in (ra, rb))
    assert abs(la - lb) <= 1e-4 * max(abs(la), 1e-6) + 1e-7, (la, lb)
