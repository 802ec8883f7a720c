"""CLI: every bad input is one line on stderr, exit code 2, and no output folder (oracle: exact codes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from edgecompress.cli import main
from tests.conftest import tiny_timm

TINY_VIT = (
    "timm:vit_tiny_patch16_224?img_size=32&patch_size=8&embed_dim=48&depth=2&num_heads=4&num_classes=10"
)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    loaded = tiny_timm("vit_tiny_patch16_224")
    good = folder / "good.safetensors"
    save_file({k: v.contiguous() for k, v in loaded.model.state_dict().items()}, str(good))
    nan = {k: v.clone().contiguous() for k, v in loaded.model.state_dict().items()}
    nan["blocks.0.mlp.fc1.weight"][0, 0] = float("nan")
    save_file(nan, str(folder / "nan.safetensors"))
    (folder / "truncated.safetensors").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (folder / "garbage.safetensors").write_bytes(b"this is not a safetensors file at all")
    torch.save(loaded.model.state_dict(), folder / "weights.pt")
    (folder / "empty.txt").write_text("\n\n")
    (folder / "emptydir").mkdir()
    import numpy as np
    from PIL import Image

    for k in range(12):  # 12 class folders for a 10-class model
        (folder / "twelve" / f"c{k:02d}").mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), 20 * k, np.uint8)).save(folder / "twelve" / f"c{k:02d}" / "a.png")
    return folder


def _recipe(tmp_path, text: str) -> str:
    p = tmp_path / f"r{abs(hash(text))}.yaml"
    p.write_text(text)
    return str(p)


def _bad(tmp_path, ckpt):
    return {
        "unknown pass": (["--recipe", _recipe(tmp_path, "passes: [{pass: uniform_pt}]")], "unknown pass"),
        "unknown field": (
            ["--recipe", _recipe(tmp_path, "passes: [{pass: uniform_ptq, bits: 4}]")],
            "unknown field",
        ),
        "mistyped field": (
            ["--recipe", _recipe(tmp_path, "passes: [{pass: uniform_ptq, w_bits: x}]")],
            "expected int",
        ),
        "malformed yaml": (["--recipe", _recipe(tmp_path, "passes: [{pass: uniform_ptq")], "malformed YAML"),
        "missing recipe": (["--recipe", "no_such_recipe_anywhere"], "neither a file nor a shipped recipe"),
        "unknown spec": (["--model", "nosuch:thing"], "unknown model spec"),
        "unknown timm arch": (["--model", "timm:not_a_real_arch"], "timm has no architecture"),
        "missing hf dir": (["--model", f"hf:{tmp_path}/nothing"], "not a transformers model folder"),
        "unknown demo": (["--model", "demo:nope"], "unknown demo model"),
        "no local weights": (["--model", "timm:vit_tiny_patch16_224"], "no local pretrained weights"),
        "missing weights": (
            ["--model", TINY_VIT, "--checkpoint", str(ckpt / "absent.safetensors")],
            "checkpoint not found",
        ),
        "truncated weights": (
            ["--model", TINY_VIT, "--checkpoint", str(ckpt / "truncated.safetensors")],
            "not a valid safetensors",
        ),
        "not safetensors": (
            ["--model", TINY_VIT, "--checkpoint", str(ckpt / "garbage.safetensors")],
            "not a valid safetensors",
        ),
        "pickle weights": (["--model", TINY_VIT, "--checkpoint", str(ckpt / "weights.pt")], "pickle"),
        "weights do not fit": (
            [
                "--model",
                TINY_VIT.replace("depth=2", "depth=3"),
                "--checkpoint",
                str(ckpt / "good.safetensors"),
            ],
            "does not fit the model",
        ),
        "nan model": (["--model", TINY_VIT, "--checkpoint", str(ckpt / "nan.safetensors")], "non-finite"),
        "empty calibration folder": (["--calib", f"imagefolder:{ckpt / 'emptydir'}"], "no class sub-folders"),
        "empty text file": (
            ["--model", "demo:minilm", "--calib", f"text:{ckpt / 'empty.txt'}"],
            "contains no text",
        ),
        "data does not fit": (["--calib", "text"], "does not fit image model"),
        "more classes than outputs": (
            ["--model", TINY_VIT + "&pretrained=false", "--calib", f"imagefolder:{ckpt / 'twelve'}"],
            "has 12 class folders but the model has 10 outputs",
        ),
        "unknown data": (["--calib", "mnist"], "unknown data spec"),
        "impossible pass order": (
            ["--recipe", _recipe(tmp_path, "passes: [{pass: uniform_ptq}, {pass: adalog}]")],
            "passes[1] 'adalog' cannot follow passes[0] 'uniform_ptq'",
        ),
        "pass version": (
            ["--recipe", _recipe(tmp_path, "passes: [{pass: uniform_ptq, version: 9}]")],
            "uniform_ptq version 9",
        ),
        "unknown train field": (
            ["--recipe", _recipe(tmp_path, "train: {stepz: 3}\npasses: [{pass: uniform_ptq}]")],
            "train.stepz: unknown field",
        ),
        "bad train value": (
            ["--recipe", _recipe(tmp_path, "train: {lr: -1}\npasses: [{pass: uniform_ptq}]")],
            "train: lr",
        ),
        "recipe device without a GPU": (
            ["--recipe", _recipe(tmp_path, "device: cuda\npasses: [{pass: uniform_ptq}]")],
            "no CUDA GPU" if not torch.cuda.is_available() else "",
        ),
        "nm n >= m": (
            ["--recipe", _recipe(tmp_path, "passes: [{pass: nm_oneshot, n: 4, m: 4}]")],
            "0 < n < m",
        ),
        "step without t_max": (
            ["--recipe", _recipe(tmp_path, "passes: [{pass: step}]")],
            "t_max is required",
        ),
        "step t_max <= t_min": (
            ["--recipe", _recipe(tmp_path, "passes: [{pass: step, t_min: 5, t_max: 5}]")],
            "t_min < t_max",
        ),
        "unknown device": (
            ["--recipe", _recipe(tmp_path, "device: tpu\npasses: [{pass: uniform_ptq}]")],
            "device",
        ),
    }


CASES = [
    "unknown pass", "unknown field", "mistyped field", "malformed yaml", "missing recipe", "unknown spec",
    "unknown timm arch", "missing hf dir", "unknown demo", "no local weights", "missing weights",
    "truncated weights", "not safetensors", "pickle weights", "weights do not fit", "nan model",
    "empty calibration folder", "empty text file", "data does not fit", "more classes than outputs",
    "unknown data",
    "impossible pass order", "pass version", "unknown train field", "bad train value", "unknown device",
    "nm n >= m", "step without t_max", "step t_max <= t_min",
] + (["recipe device without a GPU"] if not torch.cuda.is_available() else [])  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line(case, tmp_path, tiny_ckpt, capsys):
    args, message = _bad(tmp_path, tiny_ckpt)[case]
    out = tmp_path / "out"
    code = main(["compress", *args, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("edgecompress: error:") and message in err[0], err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp leftovers


def test_existing_output_folder(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert main(["compress", "--out", str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_module_entry_point_exit_code(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgecompress",
            "compress",
            "--recipe",
            "nope_nope",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr


def test_unknown_argument_is_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compress", "--no-such-flag"])
    assert e.value.code == 2


def test_passes_lists_fields(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert (
        "uniform_ptq (quantize, version 1):" in out
        and "w_bits: int = 8" in out
        and "observer: minmax|percentile|mse" in out
    )


def test_compress_eval_inspect_on_tiny_model(tmp_path, tiny_ckpt, capsys):
    out = tmp_path / "run"
    args = ["--model", TINY_VIT, "--checkpoint", str(tiny_ckpt / "good.safetensors")]
    assert main(["compress", *args, "--out", str(out), "--set", "calibration.samples=8", "--no-export"]) == 0
    assert {p.name for p in out.iterdir()} >= {
        "model.safetensors",
        "structure.json",
        "recipe.yaml",
        "report.json",
        "report.md",
    }
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"] == {"data": "digits", "samples_requested": 8, "samples_used": 8}
    assert "Calibration: 8 samples of `digits`" in (out / "report.md").read_text()
    # every Linear (head included) is quantized; the rest is patch embedding and
    # position/class tokens: 85 % of this tiny ViT's weights, so no warning
    depth, width = 2, 48
    linears = depth * (width * 3 * width + width * width + 2 * width * 4 * width) + width * 10
    assert report["coverage"]["compressed"] == linears
    assert report["coverage"]["fraction"] > 0.5 and "coverage" not in " ".join(report["warnings"])
    # PyTorch latency: the bench method, both models alternated (same count), ≥ 3 s of timed calls
    lat = report["latency_ms"]
    assert lat["baseline"]["iterations"] == lat["compressed"]["iterations"] >= 5
    assert lat["method"]["min_seconds"] == 3.0
    timed_s = lat["baseline"]["mean_ms"] * lat["baseline"]["iterations"] / 1e3
    timed_s += lat["compressed"]["mean_ms"] * lat["compressed"]["iterations"] / 1e3
    assert timed_s >= 3.0 * 0.99
    for w in report["warnings"]:  # CoV warnings (a loaded machine) are printed, not only stored
        assert f"warning: {w}" in printed
    assert main(["inspect", str(out)]) == 0
    assert "blocks.0.attn.qkv" in capsys.readouterr().out
    assert main(["eval", "--model", str(out), "--samples", "50"]) == 0
    assert '"top1"' in capsys.readouterr().out
