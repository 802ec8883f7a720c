"""Verification after every export: ONNX Runtime vs the PyTorch model on the same inputs.

The oracle is the model that was exported (float, or fake-quantized) run eagerly in PyTorch on the
model's evaluation data (digits / the built-in text; seeded synthetic inputs when the model has no
tokenizer). Thresholds, for the *same* graph in both runtimes:

* every model: mean cosine of the outputs ≥ :data:`COSINE_MIN` (0.999) — encoders compare
  their mean-pooled embeddings, as the fidelity metric does;
* classifiers (and causal LMs, per token): top-1 agreement ≥ :data:`TOP1_MIN` (99.5 %) over the
  samples whose reference decides its top-1: top-2 margin ≥ :data:`TOP1_MARGIN` (2 %) of that
  sample's logit range. Below that margin the two best classes are a near tie (random-weight
  models have almost only such samples: uniform W8A8 on a random ViT-S has cosine ≥ 0.9998 and
  96.9 % top-1), a flip there says nothing the cosine bounds do not; the excluded count is in
  the metrics (``top1_near_ties``), and with no decided sample there is no top-1 gate;
* float graphs (no Q/DQ): the same cosine bound on *every* sample, and max-abs error ≤
  :data:`FLOAT_REL_MAX` × max |output|;
* quantized graphs: no max-abs bound, and a sample may fall below cosine
  :data:`QUANTIZED_COSINE_MIN` (0.99) only as a rare outlier: at most ``1 + samples // 100`` of
  them (:func:`allowed_outliers`). The two runtimes compute the same graph with different float
  rounding (ORT's ``Log``/``Div``/``Gelu`` or an integer ``MatMulIntegerToFloat`` against
  PyTorch's float ops), so a value sitting on a quantization boundary can get the neighbouring
  code; at low bits that one step changes the next layers' inputs and can flip further codes
  downstream, on that sample only. Measured (demo:vit-digits ``adalog_w4a4``, 450 test images):
  with every ORT optimization off 7 images have cosine < 0.9999 (min 0.9967); with ORT's integer
  kernels 16 do, one of them at 0.942, and the top-1 agreement is still 100 %. A wrong export
  form moves every sample, which the mean and top-1 bounds catch.

A failed verification raises :class:`~edgecompress.errors.UserError` (exit code 2).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgecompress.errors import UserError
from edgecompress.export.forms import export_category
from edgecompress.export.inputs import as_batch, sample_batches
from edgecompress.export.runtime import ort_session, session_config
from edgecompress.models.loading import LoadedModel

COSINE_MIN = 0.999
QUANTIZED_COSINE_MIN = 0.99
TOP1_MIN = 99.5
TOP1_MARGIN = 0.02
FLOAT_REL_MAX = 1e-3
DEFAULT_SAMPLES = 64


def _static_batch(sess, fallback: int) -> tuple[int, bool]:
    dim = sess.get_inputs()[0].shape[0]
    return (dim, False) if isinstance(dim, int) and dim > 0 else (fallback, True)


def _pool(y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).float()  # [B, T, 1]
    return F.normalize((y * m).sum(1) / m.sum(1).clamp_min(1), dim=-1)  # [B, D]


def _compare(kind: str, ref: torch.Tensor, out: torch.Tensor, mask: torch.Tensor | None) -> dict:
    """Per-batch sums: cosine per sample, top-1 matches, max-abs error (padding tokens excluded)."""
    if mask is not None and ref.dim() == 3:
        keep = mask.bool().unsqueeze(-1)  # [B, T, 1]
        err = ((out - ref).abs() * keep).amax()
        scale = (ref.abs() * keep).amax()
    else:
        err, scale = (out - ref).abs().max(), ref.abs().max()
    if kind == "encoder":
        cos = (_pool(out, mask) * _pool(ref, mask)).sum(-1)
    else:
        cos = F.cosine_similarity(out.flatten(1).double(), ref.flatten(1).double(), dim=1)
    top = None
    if kind in ("image", "causal_lm"):
        agree = out.argmax(-1) == ref.argmax(-1)  # [B] or [B, T]
        decided = decided_top1(ref)
        if agree.dim() == 2:
            agree, decided = agree[mask.bool()], decided[mask.bool()]
        top = (int(agree[decided].sum()), int(decided.sum()), int((~decided).sum()))
    return {"cos": cos.float(), "err": float(err), "scale": float(scale), "top": top}


def decided_top1(ref: torch.Tensor) -> torch.Tensor:
    """Where the reference's top-1 is not a near tie: top-2 margin ≥ TOP1_MARGIN × logit range."""
    if ref.shape[-1] < 2:
        return torch.ones(ref.shape[:-1], dtype=torch.bool)
    best = ref.topk(2, dim=-1).values
    spread = ref.amax(-1) - ref.amin(-1)
    return (best[..., 0] - best[..., 1]) >= TOP1_MARGIN * spread


def allowed_outliers(samples: int) -> int:
    """How many samples of a quantized graph may have cosine < :data:`QUANTIZED_COSINE_MIN`."""
    return 1 + samples // 100


def _judge(kind: str, metrics: dict, quantized: bool) -> list[str]:
    fails = []
    if metrics["cosine_mean"] < COSINE_MIN:
        fails.append(f"cosine_mean {metrics['cosine_mean']:.6f} < {COSINE_MIN}")
    if not quantized and metrics["cosine_min"] < COSINE_MIN:
        fails.append(f"cosine_min {metrics['cosine_min']:.6f} < {COSINE_MIN}")
    outliers, allowed = metrics["samples_below_cosine_floor"], allowed_outliers(metrics["samples"])
    if quantized and outliers > allowed:
        fails.append(
            f"{outliers} of {metrics['samples']} samples have cosine < {QUANTIZED_COSINE_MIN} (allowed {allowed})"
        )
    if "top1_agreement" in metrics and metrics["top1_agreement"] < TOP1_MIN:
        fails.append(f"top1_agreement {metrics['top1_agreement']}% < {TOP1_MIN}%")
    if not quantized and metrics["max_abs_error"] > FLOAT_REL_MAX * max(metrics["max_abs_output"], 1.0):
        fails.append(f"max_abs_error {metrics['max_abs_error']:.3g} > {FLOAT_REL_MAX} × max|output|")
    return fails


def _run_all(loaded: LoadedModel, sess, batches, rows) -> list[dict]:
    names = [i.name for i in sess.get_inputs()]
    parts = []
    loaded.model.eval()
    with torch.no_grad():
        for tensors, n in zip(batches, rows):
            ref = loaded.call(loaded.model, as_batch(loaded, tensors)).float()[:n]
            feed = {name: t.numpy() for name, t in zip(names, tensors)}
            out = torch.from_numpy(np.asarray(sess.run(None, feed)[0])).float()[:n]
            mask = None if loaded.kind == "image" else tensors[1][:n]
            parts.append(_compare(loaded.kind, ref, out, mask))
    return parts


def verify_onnx(
    loaded: LoadedModel,
    path: str | Path,
    samples: int = DEFAULT_SAMPLES,
    data: str | None = None,
    batch: int = 8,
    threads: int | None = None,
    integer_kernels: bool = True,
) -> dict:
    """Run ``path`` in ONNX Runtime and ``loaded.model`` in PyTorch on the same inputs; never raises
    on a mismatch (see :func:`check_verification`), returns the metrics and the verdict.
    ``integer_kernels=False``: ORT computes the graph's Q/DQ in float (see ``ort_session``)."""
    t0 = time.perf_counter()
    sess = ort_session(path, threads, integer_kernels=integer_kernels)
    b, dynamic = _static_batch(sess, batch)
    batches, rows = sample_batches(loaded, samples, b, data)
    parts = _run_all(loaded, sess, batches, rows)
    cos = torch.cat([p["cos"] for p in parts])
    metrics = {
        "samples": int(sum(rows)),
        "cosine_min": round(float(cos.min()), 6),
        "samples_below_cosine_floor": int((cos < QUANTIZED_COSINE_MIN).sum()),
        "cosine_mean": round(float(cos.mean()), 6),
        "max_abs_error": float(max(p["err"] for p in parts)),
        "max_abs_output": float(max(p["scale"] for p in parts)),
    }
    tops = [p["top"] for p in parts if p["top"] is not None]
    if tops:
        decided = sum(n for _, n, _ in tops)
        metrics["top1_near_ties"] = sum(t for _, _, t in tops)
        if decided:
            metrics["top1_agreement"] = round(100.0 * sum(a for a, _, _ in tops) / decided, 3)
    quantized = export_category(loaded.model) == "quantized"
    fails = _judge(loaded.kind, metrics, quantized)
    return {
        "onnx": str(path),
        "reference": "PyTorch eager (the exported model, fake-quantized if compressed)",
        "data": "synthetic"
        if loaded.kind != "image" and not loaded.tokenizer_dir
        else (data or "default eval data"),
        "batch": "dynamic" if dynamic else b,
        "quantized_graph": quantized,
        "thresholds": {
            "cosine_mean": COSINE_MIN,
            "cosine_min": None if quantized else COSINE_MIN,
            "cosine_floor": QUANTIZED_COSINE_MIN if quantized else None,
            "samples_below_floor_allowed": allowed_outliers(int(sum(rows))) if quantized else None,
            "top1_agreement": TOP1_MIN,
            "top1_margin": TOP1_MARGIN,
            "float_rel_max_abs": FLOAT_REL_MAX,
        },
        "metrics": metrics,
        "passed": not fails,
        "failures": fails,
        "ort_session": session_config(path, threads, integer_kernels=integer_kernels),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def write_verification(result: dict, json_path: str | Path) -> Path:
    json_path = Path(json_path)
    json_path.write_text(json.dumps(result, indent=1, default=str))
    return json_path


def check_verification(result: dict) -> None:
    """Raise a one-line :class:`UserError` when ``result`` failed."""
    if not result["passed"]:
        raise UserError(f"ONNX verification failed for {result['onnx']}: {'; '.join(result['failures'])}")
