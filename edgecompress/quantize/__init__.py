"""Quantization: quantizers as pure functions, quantizer modules, and the PTQ passes."""
