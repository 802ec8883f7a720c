"""Shared by the kernels: the interpreter switch, the dot/cast numerics helpers, attention tile configs.

Under ``TRITON_INTERPRET=1`` (read once, at import, like ``triton.jit`` does) kernels are launched
directly with one small config; on a GPU they go through ``triton.autotune`` over the configs below
(chosen for Hopper/Ampere: 64-wide tiles for 64-blocks, 128x64 for 128-blocks, fewer stages for
head dim 256 so shared memory fits; configs that do not fit are skipped by the autotuner).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4 reads the variable through its knobs
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


INTERPRET = _interpreting()

# Triton 3.9's interpreter multiplies bfloat16 operands of tl.dot as their raw uint16 bits (numpy has
# no bfloat16) and truncates float32 -> bfloat16 casts instead of rounding to nearest even. Under the
# interpreter, bf16 products are therefore taken in float32 after an exact upcast and bf16 casts round
# explicitly first, so the interpreter reproduces the GPU's numerics.
_INTERP_BF16 = "interp_bf16"


def numerics(dtype: torch.dtype) -> str:
    """The NUMERICS constexpr of ``dot`` and ``cast``: IEEE for float32 (no TF32), default otherwise."""
    if dtype == torch.float32:
        return "ieee"
    return _INTERP_BF16 if INTERPRET and dtype == torch.bfloat16 else "tf32"


@triton.jit
def dot(a, b, acc, NUMERICS: tl.constexpr):
    """acc + a @ b with float32 accumulation; see ``numerics``."""
    if NUMERICS == "interp_bf16":
        res = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        res = tl.dot(a, b, acc, input_precision=NUMERICS)
    return res


@triton.jit
def cast(x, dtype: tl.constexpr, NUMERICS: tl.constexpr):
    """float32 -> dtype with round-to-nearest-even (the GPU default; emulated under the interpreter)."""
    if NUMERICS == "interp_bf16":
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)  # exactly representable in bf16 now
    return x.to(dtype)


def head_dim_pad(d: int) -> int:
    """Head dim rounded up to a power of two >= 16 (tl.dot and tl.arange need it)."""
    return max(16, triton.next_power_of_2(d))


def attention_configs() -> list[triton.Config]:
    shapes = [  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
        (32, 32, 2, 3),
        (32, 32, 4, 3),
        (64, 32, 4, 2),
        (64, 64, 4, 2),
        (64, 64, 4, 3),
        (64, 64, 4, 4),
        (64, 64, 8, 3),
        (128, 32, 8, 2),
        (128, 64, 8, 2),
        (128, 64, 8, 3),
        (128, 128, 8, 2),
    ]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def launch_config(block: int) -> dict:
    """The single config used by the interpreter: small tiles that still exercise sub-tiling."""
    return {"BLOCK_M": min(block, 64), "BLOCK_N": 32}
