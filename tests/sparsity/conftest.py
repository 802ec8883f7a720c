"""Fixtures of the sparsity tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def kernel_device() -> torch.device:
    """Where ``edgecompress.kernels.acm_mlp`` runs its Triton kernel (interpreter on CPU, or CUDA)."""
    from edgecompress.kernels import ops

    if not ops.HAS_TRITON:
        pytest.skip("triton is not installed")
    if ops.INTERPRET:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    pytest.skip("the Triton kernel needs TRITON_INTERPRET=1 (set before import) or a CUDA GPU")
