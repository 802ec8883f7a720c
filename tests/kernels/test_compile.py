"""The kernels compile for H100 (sm_90) and A100 (sm_80) through Triton and ptxas, without a GPU.

The interpreter checks numerics but not compilation: this lowers every kernel as a launch on those
GPUs would (see aot_compile.py) and checks it uses tensor-core MMA, software-pipelined loads and, on
sm_90, no register spills. Cold Triton cache: about a minute on 2 cores; cached: seconds.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_kernels_compile_for_sm90_and_sm80():
    triton = pytest.importorskip("triton")
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (bin_dir / "ptxas").exists() or not (bin_dir / "ptxas-blackwell").exists():
        pytest.skip("triton's bundled ptxas is not available")
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "tests.kernels.aot_compile", "90", "80"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 22 and {r["cc"] for r in rows} == {90, 80}
    for r in rows:
        if "bucket" in r["kernel"]:
            continue
        assert r["mma"] == ("wgmma" if r["cc"] == 90 else "mma.sync"), r
        assert r["cp_async"], f"main loop not software-pipelined: {r}"
        if r["cc"] == 90:
            assert r["spill_bytes"] == 0, f"register spills: {r}"
