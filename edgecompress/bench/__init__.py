"""Latency measurement: :mod:`~edgecompress.bench.timing` (the method), :mod:`~edgecompress.bench.env`
(the environment captured with every number), :mod:`~edgecompress.bench.backends` (torch,
onnxruntime, tensorrt) and :mod:`~edgecompress.bench.run` (``edgecompress bench``)."""
