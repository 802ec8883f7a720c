"""The ``seer_attention`` recipe under ``torchrun --nproc_per_node 2`` (CPU, gloo) and in one process
(oracle: the single-process output folder; tolerance: max abs difference ≤ 1e-5 on every saved
tensor — the gates start at the identity, steps of lr 1e-2 move them by ~1e-1, and only the
summation order of the averaged gradients differs — and the same held-out KL to 4 decimals)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from tests.sparsity.test_nm_ddp import one_and_two_processes

RECIPE = """
calibration: {data: digits, samples: 8}
eval: {samples: 8}
train: {data: digits, samples: 16, steps: 2, lr: 1.0e-2, batch_size: 8, seed: 3}
passes:
  - pass: seer_attention
    block: 16
    lr: null
"""


def test_seer_recipe_under_torchrun_equals_one_process(tmp_path):
    ra, rb = one_and_two_processes(tmp_path, RECIPE, atol=1e-5)
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    k_weight = a[
        "blocks.0.attn.ec_attn.core.gate.k_weight"
    ]  # [Hkv, 3D, D], identity on the avg part at start
    start = torch.zeros_like(k_weight)
    start[:, -k_weight.shape[-1] :] = torch.eye(k_weight.shape[-1])
    assert float((k_weight - start).abs().max()) > 1e-3  # the gates did move
    assert rb["info"]["training"]["world_size"] == 2 and ra["info"]["training"]["world_size"] == 1
    kl_one, kl_two = (r["info"]["seer"]["kl_held_out"]["after"] for r in (ra, rb))
    assert round(kl_one, 4) == round(kl_two, 4)
