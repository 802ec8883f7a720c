"""Kernel tests run the real Triton kernels on CPU through Triton's interpreter.

TRITON_INTERPRET must be set before triton decorates the kernels, i.e. before `edgecompress.kernels`
is imported, so it is set here (setdefault: `TRITON_INTERPRET=0 pytest tests/kernels` on a GPU machine
runs the same tests compiled, on CUDA tensors, plus the `gpu`-marked ones).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device() -> torch.device:
    """Where the kernel tests put their tensors so that the Triton path (not the reference) runs."""
    pytest.importorskip("triton")
    from edgecompress.kernels import ops

    if ops.INTERPRET:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    pytest.fail(
        "edgecompress.kernels was imported without TRITON_INTERPRET=1 and there is no GPU, so the "
        "kernels cannot run; run `TRITON_INTERPRET=1 pytest tests/kernels`"
    )
