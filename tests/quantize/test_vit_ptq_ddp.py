"""The AdaLog calibration under ``torchrun --nproc_per_node 2`` (CPU, gloo) against one process.

Oracle: the single-process output folder of the same command. Every unit's search sees only the
float model's inputs and runs on exactly one rank with one thread (as the single process does),
and the results travel as exact JSON, so the saved tensors must be bit-identical (tolerance 0);
the report must say that both ranks searched."""

from __future__ import annotations

from tests.sparsity.test_nm_ddp import one_and_two_processes

RECIPE = """
calibration: {data: digits, samples: 8}
eval: {samples: 16}
passes:
  - pass: adalog
    search_rounds: 1
    max_tokens: 96
    scoring: bf16
"""


def test_adalog_calibration_under_torchrun_equals_one_process(tmp_path):
    ra, rb = one_and_two_processes(tmp_path, RECIPE, "--no-export", atol=0.0)
    assert ra["info"]["profile"]["processes"] == 1 and rb["info"]["profile"]["processes"] == 2
    assert {u["rank"] for u in rb["info"]["profile"]["units"]} == {0, 1}
