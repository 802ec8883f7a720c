"""``inspect --sensitivity`` / ``--profile`` on a real demo:vit-digits W8A8 folder, against oracles.

Oracles and tolerances:

* float reference (every quantizer bypassed, float weights restored): the uncompressed demo model
  itself — same top-1 on the same samples (exact) and logits cosine ≥ 1 − 1e-6;
* all quantizers enabled: exactly the folder's model, so its top-1 is what ``edgecompress eval``
  prints for the same samples (± 0.01, eval's rounding);
* one 8-bit layer group alone: its cosine lies between the all-enabled value (minus 1e-4) and the
  float value (+ 1e-9), its top-1 within 2 samples of the float top-1; small independent errors add
  in energy (1 − cos ≈ ½‖δ‖²), so the groups' drops sum to the all-enabled drop within a factor 3;
* profile: the modules' mean times add up to the trace's total kernel time (within 1 %); kernels
  take at most the runs' wall time; < 5 % of the time is unmapped.
"""

from __future__ import annotations

import json
import re
import shutil
import sys

import pytest

from edgecompress import diagnostics as dg
from edgecompress.cli import main
from edgecompress.errors import UserError

SAMPLES = 32  # the recipe's eval samples: the sensitivity default reads them from recipe.yaml


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny demo ViT gains nothing from intra-op threads, and on a loaded machine two OpenMP
    threads make each of its small ops wait (measured: 1–3 s per batch instead of 0.06 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("diag") / "w8a8"
    sets = ["calibration.samples=16", f"eval.samples={SAMPLES}"]
    with pytest.MonkeyPatch.context() as mp:  # the PyTorch latency probe of compress: not under test
        mp.setattr(
            "edgecompress.job.LATENCY_TIMING",
            {"min_seconds": 0.1, "min_iters": 2, "warmup_s": 0.05, "max_seconds": 5.0},
        )
        assert (
            main(
                [
                    "compress",
                    "--model",
                    "demo:vit-digits",
                    "--no-export",
                    "--out",
                    str(out),
                    *[a for s in sets for a in ("--set", s)],
                ]
            )
            == 0
        )
    return out


@pytest.fixture(scope="module")
def sens(folder):
    assert main(["inspect", str(folder), "--sensitivity"]) == 0
    return json.loads((folder / "sensitivity.json").read_text())


@pytest.fixture(scope="module")
def prof(folder):
    assert main(["inspect", str(folder), "--profile", "--runs", "8", "--warmup", "2", "--threads", "1"]) == 0
    return json.loads((folder / "profile.json").read_text())


def test_sensitivity_against_the_float_model_and_eval(folder, sens, capsys):
    from edgecompress.data.metrics import evaluate
    from edgecompress.data.specs import load_data
    from edgecompress.models.loading import load_model

    assert sens["samples"] == SAMPLES and sens["data"] == "digits" and sens["metric"] == "top1"
    assert sens["groups_count"] == 6 * 5 + 1  # 6 blocks × (qkv, proj, fc1, fc2, attention) + head
    assert sens["float_weights"] == {"base model": 25}  # every Linear's float weight came back
    base = load_model("demo:vit-digits")
    base_top1 = evaluate(base, base.model, load_data("digits", base, "test", SAMPLES))[0]["top1"]
    assert sens["float"]["top1"] == pytest.approx(base_top1, abs=0.01)
    assert sens["float_vs_base_model"]["cosine_min"] >= 1 - 1e-6
    assert main(["eval", "--model", str(folder), "--samples", str(SAMPLES)]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sens["all_enabled"]["top1"] == pytest.approx(evaluated["top1"], abs=0.01)
    step = 100 / SAMPLES
    for g in sens["groups"]:
        assert sens["all_enabled"]["cosine"] - 1e-4 <= g["cosine"] <= sens["float"]["cosine"] + 1e-9, g
        assert abs(g["top1"] - sens["float"]["top1"]) <= 2 * step + 1e-6, g
        assert g["cosine_drop"] == pytest.approx(sens["float"]["cosine"] - g["cosine"], abs=1e-7)
    keys = [(-g["top1_drop"], -g["cosine_drop"]) for g in sens["groups"]]
    assert keys == sorted(keys) and [g["rank"] for g in sens["groups"]] == list(range(1, 32))
    total = sum(g["cosine_drop"] for g in sens["groups"])
    assert sens["all_enabled"]["cosine_drop"] / 3 <= total <= 3 * sens["all_enabled"]["cosine_drop"]
    att = next(g for g in sens["groups"] if g["group"] == "blocks.0.attn")
    assert att["kind"] == "attention" and {q["role"] for q in att["quantizers"]} == {
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_probs",
    }
    qkv = next(g for g in sens["groups"] if g["group"] == "blocks.0.attn.qkv")
    assert qkv["kind"] == "linear" and {q["role"] for q in qkv["quantizers"]} == {"weight", "linear_in"}


def test_profile_accounts_for_every_kernel(folder, prof):
    trace = json.loads((folder / "profile_trace.json").read_text())
    kernels = [e for e in trace if e["cat"] == "Node"]
    runs = [e for e in trace if e["cat"] == "Session" and e["name"] == "model_run"]
    assert len(runs) == prof["runs"] == 8 and prof["session"]["intra_op_num_threads"] == 1
    trace_ms = sum(e["dur"] for e in kernels) / len(runs) / 1e3
    assert sum(m["mean_ms"] for m in prof["modules"]) == pytest.approx(trace_ms, rel=0.01)
    assert prof["node_ms"] == pytest.approx(trace_ms, rel=0.01)
    assert prof["node_ms"] <= prof["run_ms"] * 1.001  # the sequential executor: kernels within the run
    assert prof["unmapped_ms"] < 0.05 * prof["node_ms"]
    mods = {m["module"]: m for m in prof["modules"]}
    for b in range(6):
        for sub in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "attn"):
            assert f"blocks.{b}.{sub}" in mods
    assert any("MatMul" in op for op in mods["blocks.0.mlp.fc1"]["op_types"])
    assert "exported to a temporary file" in prof["onnx"]  # the folder has no model.onnx


def test_report_links_and_files(folder, sens, prof):
    text = (folder / "report.md").read_text()
    assert text.count("## Diagnostics") == 1 and text.rstrip().endswith(dg.SECTION_END)
    section = text[text.index(dg.SECTION_START) :]
    links = set(re.findall(r"\]\(([^)]+)\)", section))
    assert links >= {
        "sensitivity.json",
        "sensitivity.png",
        "profile.json",
        "profile.png",
        "profile_trace.json",
    }
    for link in links:
        assert (folder / link).is_file(), link
    for name in ("sensitivity.png", "profile.png"):
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dg.update_report(folder)  # idempotent
    assert (folder / "report.md").read_text() == text
    assert "# edgecompress report" in text  # the compress report is kept above the section


def test_without_matplotlib_json_only(folder, sens, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    result = json.loads((copy / "sensitivity.json").read_text())
    result["notes"] = []
    dg._write_outputs(copy, "sensitivity", result, dg._sensitivity_chart)
    assert json.loads((copy / "sensitivity.json").read_text())["groups"] == sens["groups"]
    assert not (copy / "sensitivity.png").exists()  # the stale chart is removed, not left unmatched
    assert result["notes"] == [
        "sensitivity.png not written: the chart needs matplotlib (pip install matplotlib)"
    ]
    assert "pip install matplotlib" in (copy / "report.md").read_text()


def test_bad_inputs_exit_2(folder, tmp_path, capsys):
    assert main(["inspect", str(tmp_path), "--sensitivity"]) == 2
    assert main(["inspect", str(tmp_path / "missing"), "--profile"]) == 2
    copy = tmp_path / "corrupt"
    copy.mkdir()
    shutil.copy2(folder / "structure.json", copy / "structure.json")
    (copy / "model.onnx").write_bytes(b"not an onnx file")
    capsys.readouterr()
    assert main(["inspect", str(copy), "--profile"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a valid ONNX model" in err


def test_no_quantizers_is_a_user_error(tmp_path):
    from edgecompress.models.loading import load_model
    from edgecompress.structure import save

    loaded = load_model("demo:vit-digits")
    out = save(loaded.model, tmp_path / "plain", {"recipe.yaml": "eval: {samples: 4}\n"})
    with pytest.raises(UserError, match="no quantizers"):
        dg.sensitivity(out)


def test_module_of_scope():
    assert dg.module_of_scope("model.blocks.0.attn.qkv.input_chain.0") == "blocks.0.attn.qkv"
    assert dg.module_of_scope("model.blocks.0.attn.ec_attn.core") == "blocks.0.attn"
    assert dg.module_of_scope("model.encoder.layer.1.output.dense") == "encoder.layer.1.output.dense"
    assert dg.module_of_scope("model") == dg.ROOT
