"""Deployment: PyTorch → ONNX (INT8 Q/DQ for uniform quantizers, table lookups for log/TanQ),
verification against eager PyTorch, TensorRT readiness checks and engine build.

* :func:`edgecompress.export.deploy.export_verified` — export → check → verify → JSON (CLI, job);
* :func:`edgecompress.export.onnx.export_onnx` — the export alone;
* :func:`edgecompress.export.verify.verify_onnx` — ONNX Runtime vs PyTorch on the eval data;
* :func:`edgecompress.export.tensorrt.check_tensorrt_ready` / ``build_engine`` (build unverified);
* :mod:`edgecompress.export.forms` / :mod:`edgecompress.export.lut` — what each quantizer becomes.

Submodules are imported on use, so ``import edgecompress`` needs neither onnx nor onnxruntime.
"""
