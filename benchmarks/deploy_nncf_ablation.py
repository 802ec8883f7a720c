"""Where NNCF's INT8 fidelity on MiniLM comes from: NNCF's own steps switched off one at a time.

    PYTHONPATH=.:NNCF_SITE python benchmarks/deploy_nncf_ablation.py --work DIR [--samples 64]

Reads ``DIR/minilm-fp32.onnx`` (written by ``benchmarks/deploy.py --stage prepare --work DIR``),
quantizes it with ``nncf.quantize`` (``model_type=TRANSFORMER``, the same 32 calibration texts as
``deploy.py``) with its defaults, with SmoothQuant off (``smooth_quant_alphas.matmul = -1``), with
bias correction off (``disable_bias_correction``), and with both off, and measures each against
the FP32 file with ``deploy_variants.fidelity`` (mean-pooled embedding cosine on the built-in test
texts, OpenVINO f32). Untimed. Prints a table and writes ``DIR/nncf-ablation.json`` (merge it into
the deploy results by hand, with the command).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from deploy_variants import _calibration, _feeds, fidelity  # noqa: E402

from edgecompress.bench.env import machine_tag  # noqa: E402
from edgecompress.export.openvino import openvino  # noqa: E402
from edgecompress.models.loading import load_model  # noqa: E402

SETTINGS = {
    "nncf-default": {},
    "nncf-no-smoothquant": {"smooth_quant": False},
    "nncf-no-bias-correction": {"bias_correction": False},
    "nncf-neither": {"smooth_quant": False, "bias_correction": False},
}


def quantize(
    fp32: Path, feeds: list, out: Path, smooth_quant: bool = True, bias_correction: bool = True
) -> Path:
    import nncf

    ov = openvino()
    advanced = nncf.AdvancedQuantizationParameters(
        smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=0.95 if smooth_quant else -1),
        disable_bias_correction=not bias_correction,
    )
    model = ov.Core().read_model(str(fp32))
    q = nncf.quantize(
        model, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(feeds),
        advanced_parameters=advanced,
    )  # fmt: skip
    ov.save_model(q, str(out), compress_to_fp16=False)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--samples", type=int, default=64)
    args = p.parse_args()
    import nncf

    loaded = load_model("demo:minilm")
    feeds = _feeds(loaded, _calibration(loaded))
    fp32 = args.work / "minilm-fp32.onnx"
    rows = {}
    for name, kw in SETTINGS.items():
        path = quantize(fp32, feeds, args.work / f"minilm-{name}.xml", **kw)
        fid = fidelity(loaded, {"fp32": fp32, "nncf": path}, ["fp32", "ov-nncf"], args.samples)
        rows[name] = {"settings": kw or "NNCF defaults", **fid["ov-nncf"]}
        print(
            f"{name:<26} cosine mean {rows[name]['cosine_mean']}  min {rows[name]['cosine_min']}", flush=True
        )
    out = {
        "what": "NNCF INT8 on MiniLM with its steps switched off one at a time (fidelity vs FP32 ONNX)",
        "machine": machine_tag(),
        "date": datetime.date.today().isoformat(),
        "nncf": nncf.__version__,
        "command": " ".join(["python", *sys.argv]),
        "rows": rows,
    }
    (args.work / "nncf-ablation.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
