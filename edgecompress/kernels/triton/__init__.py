"""Triton kernels, one op per file; imported by ``edgecompress.kernels.ops`` only when triton imports."""
