"""The CPU form ``cpp`` of SeerAttention's block-sparse attention: a C++ loop over the kept blocks on
PyTorch's own small-matrix kernel (oneDNN ``brgemm``, ``at::native::cpublas``), built at first use.

Why C++: the batched PyTorch form (:mod:`.tiled`) runs its matmuls at full rate but must gather the
kept K/V blocks and write the scores to memory between operators; measured on the 2-core Xeon
(``benchmarks/seer.py --parts forms``) that left it at ~55-60 % of dense SDPA's FLOP rate. Here
(``seer_cpu.cpp``) each (batch, head, query block) reads its kept blocks from the block mask,
computes its scores block by block straight from K (no gather; K transposed once per call), keeps
them in the thread's cache for the softmax, and accumulates ``P_j V_j`` into the output — the same structure as PyTorch's fused CPU attention kernel, restricted to the kept
blocks. Threads take pairs in turn (pair ``p`` to thread ``p mod T``), which balances decoder rows.

Building: :func:`torch.utils.cpp_extension.load` compiles ``seer_cpu.cpp`` against the installed
torch (~10-60 s on the 2-core Xeon, once; later processes reuse the build in torch's extension
cache), with the vector width torch itself uses (``torch.backends.cpu.get_cpu_capability()``). Where
that fails (no C++ compiler, no headers) or the kernel refuses the call (a build of torch without
oneDNN's brgemm), :func:`attend` warns once and returns ``None``: the caller runs :mod:`.tiled`.
float32 only (other dtypes: ``None``); no bias beyond the causal and padding masks; no autograd.
With ``dropped: mean`` the kernel also takes the blocks' mean keys and values (:mod:`.dropped`) and
puts one estimated key per dropped block into each row's softmax; it can return each row's
log-sum-exp.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from edgecompress.sparsity.seer.dropped import block_means
from edgecompress.sparsity.seer.gate import num_blocks
from edgecompress.sparsity.seer.tiled import key_bias

SOURCE = Path(__file__).with_name("seer_cpu.cpp")
_STATE: dict = {}  # "op": the loaded operator, or "failed": why building or running it failed


def _op():
    if "op" not in _STATE and "failed" not in _STATE:
        try:
            from torch.utils.cpp_extension import load

            cap = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
            vec = [f"-DCPU_CAPABILITY_{cap}", f"-DCPU_CAPABILITY={cap}", "-march=native"]
            omp = ["-fopenmp"] if torch._C.has_openmp else []  # at::parallel_for is an OpenMP pragma
            flags = ["-O3", *omp, *(vec if cap in ("AVX2", "AVX512") else [])]
            load(name=f"edgecompress_seer_cpu_{cap.lower()}", sources=[str(SOURCE)], extra_cflags=flags,
                 extra_ldflags=omp, is_python_module=False, verbose=False)  # fmt: skip
            _STATE["op"] = torch.ops.edgecompress_seer.attend
        except Exception as e:  # noqa: BLE001 — a compiler's or loader's failure has no common type
            _fail(e)
    return _STATE.get("op")


def _fail(e: Exception) -> None:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    why = next(
        (x for x in lines if "error" in x.lower()), lines[-1] if lines else ""
    )  # a compiler's own line
    _STATE["failed"] = f"{type(e).__name__}: {why[:200]}"
    warnings.warn(
        f"SeerAttention: the C++ CPU kernel is unavailable ({_STATE['failed']}); running the tiled form",
        stacklevel=3,
    )


def attend(q, k, v, keep, causal: bool, scale: float, block: int, valid=None, lse: bool = False,
           estimates: bool = False):  # fmt: skip
    """Attention of ``q`` ``[B, H, N, D]`` over the kept blocks of ``k``/``v`` ``[B, Hkv, N, D]`` (GQA),
    ``keep`` ``[B, H, nb, nb]``, ``valid`` ``[B, N]`` the real keys; rows with no visible key give 0.
    With ``lse``: ``(out, logsumexp [B, H, N])`` (``-inf`` for a row with no visible key). With
    ``estimates`` (``dropped: mean``): the dropped blocks' estimates join each row's softmax inside the
    kernel (:mod:`.dropped`; the same result as merging :func:`.dropped.dropped_part`'s).
    ``None`` where the kernel is unavailable or the dtype is not float32 (the caller runs another form)."""
    if q.dtype != torch.float32 or q.device.type != "cpu" or _op() is None:
        return None
    b, h, n, d = q.shape
    hkv, nb = k.shape[1], num_blocks(n, block)
    pad = nb * block - n
    q, k, v = (F.pad(t, (0, 0, 0, pad)) if pad else t for t in (q, k, v))
    kt = k.reshape(b * hkv * nb, block, d).transpose(1, 2).contiguous()  # [blocks, D, bs]
    bias = key_bias(n, nb, block, valid, b, q.dtype, q.device)  # [B·nb, bs] 0 / -inf, or None
    out = q.new_empty(b * h * nb, block, d)
    lout = q.new_empty(b * h * nb, block) if lse else q.new_empty(0)
    ek = ev = eb = q.new_empty(0)
    if estimates:
        kbar, vbar, count = block_means(k[:, :, :n], v[:, :, :n], block, valid)
        ek = kbar.transpose(-1, -2).reshape(b * hkv, d, nb).contiguous()
        ev, eb = vbar.reshape(b * hkv, nb, d).contiguous(), count.log().contiguous()
    try:
        _STATE["op"](
            q.reshape(b * h * nb, block, d).contiguous(), kt, v.reshape(b * hkv * nb, block, d).contiguous(),
            keep.reshape(b * h * nb, nb).contiguous(), q.new_empty(0) if bias is None else bias, h, hkv, causal,
            scale, out, lout, ek, ev, eb,
        )  # fmt: skip
    except RuntimeError as e:  # e.g. no oneDNN brgemm in this build of torch: once, then the tiled form
        _STATE.pop("op")
        _fail(e)
        return None
    out = out.view(b, h, nb * block, d)[:, :, :n]
    return (out, lout.view(b, h, nb * block)[:, :, :n]) if lse else out
