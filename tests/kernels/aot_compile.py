"""Compile the Triton kernels ahead of time for real GPU targets, without a GPU.

    TRITON_INTERPRET=0 python -m tests.kernels.aot_compile 90 80

Lowers every kernel (representative constexprs, bf16) through Triton and ptxas for each compute
capability given, as a launch on that GPU would, and prints one JSON line per kernel: the MMA
instructions used, whether loads were pipelined (cp.async), shared memory and ptxas register/spill
counts. Pointers and strides carry Triton's usual divisibility-by-16 specialisation. Used by
test_compile.py; the interpreter cannot catch errors that only compilation reveals.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from edgecompress.kernels.triton import acm_mlp, block_sparse_attention, pooled_attention

ATTN = {n: "*bf16" for n in ("Q", "K", "V", "Out")} | {"qk_scale": "fp32"}
ATTN_CONST = {"HEAD_DIM": 128, "D_PAD": 128, "BLOCK": 64, "EVEN_N": True, "NUMERICS": "tf32", "GROUP": 1}
GEMM_CONST = {"N_LEARNERS": 4, "L_P2": 8, "EVEN_K": True, "EVEN_N": True, "NUMERICS": "tf32"}


def _variants():
    """(name, kernel, pointer/float signature, constexprs, num_warps, num_stages)."""
    bsa = block_sparse_attention._block_sparse_attn_kernel
    sig = ATTN | {"Lse": "*fp32", "Idx": "*i32", "Cnt": "*i32"}
    for causal in (False, True):
        for bm, bn, w, s in ((64, 64, 4, 3), (128, 64, 8, 3)):
            const = ATTN_CONST | {"BLOCK": max(bm, 64), "BLOCK_M": bm, "BLOCK_N": bn, "CAUSAL": causal}
            const["RETURN_LSE"] = False
            yield f"block_sparse causal={causal} {bm}x{bn}", bsa, sig, const, w, s
    for causal in (False, True):
        const = ATTN_CONST | {"HEAD_DIM": 80, "EVEN_N": False, "BLOCK_M": 64, "BLOCK_N": 32, "CAUSAL": causal}
        const["RETURN_LSE"] = True  # the log-sum-exp store (SeerAttention's dropped: mean)
        yield f"block_sparse causal={causal} D=80 partial lse", bsa, sig, const, 4, 2
    pooled = pooled_attention._pooled_attn_kernel
    for causal in (False, True):
        const = ATTN_CONST | {"BLOCK_M": 64, "BLOCK_N": 64, "CAUSAL": causal}
        yield f"pooled causal={causal}", pooled, ATTN | {"Pooled": "*fp32"}, const, 4, 3
    ptrs = {"Perm": "*i32", "Counts": "*i32"}
    tiles = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}
    fc1_sig = ptrs | {"X": "*bf16", "W1": "*bf16", "B1": "*bf16", "Hbuf": "*bf16"}
    yield "acm fc1", acm_mlp._fc1_kernel, fc1_sig, GEMM_CONST | tiles, 8, 3
    fc2_sig = ptrs | {"Hbuf": "*bf16", "W2": "*bf16", "Out": "*bf16"}
    yield "acm fc2", acm_mlp._fc2_kernel, fc2_sig, GEMM_CONST | tiles, 8, 3
    yield "acm bucket", acm_mlp._bucket_kernel, ptrs | {"Kv": "*i64"}, {"N_LEARNERS": 4, "CHUNK": 1024}, 4, 1


def _jit_fn(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn  # unwrap autotune / heuristics
    return kernel


def compile_one(kernel, sig, consts, cc, num_warps, num_stages):
    fn = _jit_fn(kernel)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        signature[name] = "constexpr" if name in consts else sig.get(name, "i32")
        if signature[name] not in ("constexpr", "fp32") and not name.endswith("BUCKET"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, constexprs=consts, attrs=attrs)
    return triton.compile(
        src, target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )


def _ptxas_usage(ptx: str, cc: int) -> dict:
    arch = re.search(r"\.target (\S+)", ptx).group(1)
    tool = "ptxas-blackwell" if cc >= 90 else "ptxas"
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        log = subprocess.run(
            [ptxas, "-v", f"--gpu-name={arch}", f.name, "-o", os.devnull], capture_output=True, text=True
        )
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", log.stderr)
    spills = re.search(r"(\d+) bytes spill stores", log.stderr)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_bytes": int(spills.group(1)) if spills else None,
    }


def main(ccs):
    for cc in ccs:
        for name, kernel, sig, consts, w, s in _variants():
            compiled = compile_one(kernel, sig, consts, cc, w, s)
            ptx = compiled.asm["ptx"]
            row = {"cc": cc, "kernel": name, "shared": compiled.metadata.shared}
            row["mma"] = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else None
            row["cp_async"] = "cp.async" in ptx
            row |= _ptxas_usage(ptx, cc)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [90])
