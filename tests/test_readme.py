"""The README's command blocks run as written, in order, in a fresh folder (oracle: exit codes)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BIN = Path(sys.executable).parent

# lines of the "Use" block that are not run here, and why (each is covered elsewhere)
NOT_RUN = {
    "deit_small_patch16_224": "needs an ImageNet folder and DeiT weights on disk",
    "--recipe step_2to4": "training: the shipped recipe runs in test_shipped_recipes (quick settings)",
    "torchrun": "training under torchrun: tests/sparsity/test_nm_ddp.py",
    "train-demo": "trains for ~18 minutes: tests/test_demo.py runs a short training",
}


def block(title: str) -> list[str]:
    """The command lines of the first bash block after the ``## {title}`` heading."""
    text = README.read_text()
    section = text[text.index(f"## {title}") :]
    body = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in body.splitlines() if line.strip()]


def run_line(line: str, cwd: Path) -> subprocess.CompletedProcess:
    argv = shlex.split(line)
    assert argv[0].startswith(".venv/bin/"), line
    argv[0] = str(BIN / argv[0].removeprefix(".venv/bin/"))
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=900)


def test_deploy_block_runs_as_written(tmp_path):
    lines = block("Deploy: ONNX, TensorRT, latency")
    assert len(lines) == 6
    printed = {}
    for line in lines:
        r = run_line(line, tmp_path)
        printed[line.split()[1]] = r.stdout
        if "--format tensorrt" in line and not torch.cuda.is_available():
            # without TensorRT and a GPU: one line, exit 2, and no file left behind
            assert r.returncode == 2 and r.stderr.count("\n") == 1 and "TensorRT" in r.stderr, r.stderr
            assert not (tmp_path / "runs/w8a8/model-tensorrt.onnx").exists()
            continue
        assert r.returncode == 0, (line, r.stderr[-2000:])
        assert "Traceback" not in r.stderr
    assert (tmp_path / "runs/w8a8/model-b8.onnx").is_file()
    assert (tmp_path / "runs/w8a8/model-b8.verification.json").is_file()
    assert not list(tmp_path.rglob(".*partial*"))  # no temporary export folders left
    assert "no departure: every segment agrees" in printed["export"], printed["export"]
    assert (tmp_path / "runs/w8a8/dbg.compare.json").is_file()
    # both timed on the same inputs, and labelled with them
    assert printed["bench"].count("[onnxruntime, pixel_values 8×1×8×8]") == 2, printed["bench"]
    assert "speed-up of runs/w8a8/model-b8.onnx over runs/demo-vit-digits-b8.onnx" in printed["bench"]


@pytest.mark.slow
def test_use_block_runs_as_written(tmp_path):
    for line in block("Use"):
        if any(key in line for key in NOT_RUN):
            continue
        r = run_line(line, tmp_path)
        assert r.returncode == 0, (line, r.stderr[-2000:])
    run = tmp_path / "runs/minilm-w8a8"
    assert (run / "model.safetensors").is_file()
    # issue 12: compress's own INT8 export of MiniLM verifies (unchanged bounds) and is ≥ 3.5× smaller
    report = json.loads((run / "report.json").read_text())
    assert report["deploy"]["export"]["verification"]["passed"], report["warnings"]
    assert report["size_bytes"]["baseline"] >= 3.5 * report["size_bytes"]["compressed"]
    assert (run / "model.onnx").stat().st_size * 3.5 <= report["size_bytes"]["baseline"]
    assert report["deploy"]["bench"]["speedup"] > 0
