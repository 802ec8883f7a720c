"""GPU benchmark of the edgecompress kernels against PyTorch's own implementations.

    python benchmarks/gpu_kernels.py [--quick] [--sections attention pooled acm] [--flex-max-autotune]

1. block-sparse attention vs SDPA forced to its flash backend (dense) and vs compiled FlexAttention
   given exactly the same kept blocks (BlockMask.from_kv_blocks); bf16, sequence 4k-32k, block 64,
   block sparsity 0/50/75/90% (of the blocks dense attention computes: all, or the causal triangle);
2. attention_with_pooled_probs vs plain flash attention (overhead) and vs the torch reference (time
   and peak memory; the reference is skipped where its N x N matrices would not fit);
3. acm_mlp vs the dense MLP of the same total width (cuBLAS via torch) and vs a per-learner loop
   (gather the tokens with k > n, run learner n, index_add), executed fractions 0.25-1.0, N=4 learners.

Timing: triton.testing.do_bench (CUDA events, L2 flushed between runs, warm-up; median and the
20th/80th percentiles of quantiles=[0.5, 0.2, 0.8]) on random normal data. Every implementation is
called once and checked against another before it is timed; a mismatch stops the run. The variants
of one case are timed back to back. TFLOP/s count 4*D multiply-adds per (query, key) pair actually
computed (kept blocks; under causal only pairs with key <= query). The results table is printed
last and written to benchmarks/results/kernels-<device>-<date>.json. Without CUDA: exit code 2.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_timing import (  # noqa: E402
    DEVICE,
    _bench,
    _bench_graph,
    _bench_pair,
    _check,
    _cuda_kernels,
    _matmul_peak,
    _meta,
    _peak_mem,
)

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 64
N_LEARNERS = 4
# bf16 attention outputs of random data are ~0.02-0.1; two correct kernels differ by ~1e-3 at most,
# a kernel that keeps the wrong blocks by about the output's own size
ATOL = 4e-3
GRID = {
    "full": {
        "attn_seqs": [4096, 8192, 16384, 32768],
        "attn_shapes": [(32, 128), (16, 64)],  # (heads, head dim)
        "sparsities": [0.0, 0.5, 0.75, 0.9],
        "pooled_seqs": [4096, 8192, 16384],
        "acm_widths": [(384, 1536), (768, 3072)],  # ViT-S, ViT-B (d, MLP hidden)
        "acm_tokens": [4096, 16384, 65536],
    },
    "quick": {
        "attn_seqs": [4096, 8192],
        "attn_shapes": [(32, 128)],
        "sparsities": [0.0, 0.9],
        "pooled_seqs": [4096],
        "acm_widths": [(384, 1536), (768, 3072)],
        "acm_tokens": [16384],
    },
}


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small subset (a few minutes)")
    p.add_argument(
        "--sections",
        nargs="+",
        default=["attention", "pooled", "acm"],
        choices=["attention", "pooled", "acm"],
    )
    p.add_argument("--flex-max-autotune", action="store_true", help="compile FlexAttention with max-autotune")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- attention


def _block_mask(h, nb, sparsity, causal, gen):
    """[1, H, nb, nb] bool: per query block the diagonal plus random blocks, (1 - sparsity) of candidates."""
    cand = torch.ones(nb, nb, dtype=torch.bool, device=DEVICE)
    if causal:
        cand = cand.tril()
    scores = torch.rand(1, h, nb, nb, device=DEVICE, generator=gen).masked_fill(~cand, -1.0)
    scores.diagonal(dim1=-2, dim2=-1).fill_(2.0)  # the diagonal is always kept (SeerAttention does too)
    n_keep = ((1 - sparsity) * cand.sum(-1)).round().clamp(min=1)  # [nb]
    rank = scores.argsort(-1, descending=True).argsort(-1)
    return (rank < n_keep[:, None]) & cand


def _pairs(mask, causal) -> int:
    """(query, key) pairs computed over all heads: full kept blocks, and triangles on the causal diagonal."""
    diag = mask.diagonal(dim1=-2, dim2=-1).sum().item() if causal else 0
    return (mask.sum().item() - diag) * BLOCK * BLOCK + diag * BLOCK * (BLOCK + 1) // 2


def _flex_mask(mask, causal, n):
    """FlexAttention BlockMask with exactly our kept blocks: blocks with no element mask are passed as
    full blocks (no mask_mod evaluated), diagonal blocks under causal as partial blocks. mask_mod also
    encodes the block mask, so the BlockMask is self-consistent (eager flex applies only mask_mod)."""
    from torch.nn.attention.flex_attention import BlockMask

    from edgecompress.kernels import block_mask_to_index

    eye = torch.eye(mask.shape[-1], dtype=torch.bool, device=mask.device)
    full = block_mask_to_index(mask & ~eye if causal else mask)
    part = block_mask_to_index(mask & eye if causal else torch.zeros_like(mask))
    block = BLOCK

    def mask_mod(b, h, q_idx, kv_idx):
        keep = mask[b, h, q_idx // block, kv_idx // block]
        return keep & (q_idx >= kv_idx) if causal else keep

    kw = {"BLOCK_SIZE": block, "mask_mod": mask_mod, "seq_lengths": (n, n)}
    if "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters:
        kw["compute_q_blocks"] = False  # forward only
    idx = (part.indices.clamp(min=0), full.counts, full.indices.clamp(min=0))
    return BlockMask.from_kv_blocks(part.counts, *idx, **kw)


def _sdpa_flash(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if flash cannot run these inputs
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def bench_attention(quick: bool, flex_mode: str | None, peak: float) -> tuple[list[dict], dict]:
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    # one compiled kernel per (shape, causal): keep dynamo from falling back to unfused eager flex
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if getattr(torch._dynamo.config, name, None) is not None:
            setattr(torch._dynamo.config, name, 1024)
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        torch._dynamo.config.fail_on_recompile_limit_hit = True
    flex = torch.compile(flex_attention, dynamic=False, mode=flex_mode)
    grid = GRID["quick" if quick else "full"]
    seqs, shapes, sparsities = grid["attn_seqs"], grid["attn_shapes"], grid["sparsities"]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    rows, info = [], {}
    for h, d in shapes:
        for n in seqs:
            for causal in (False, True):
                q, k, v = (torch.randn(1, h, n, d, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
                if not info:
                    info = _sdpa_backend(q, k, v, causal)
                rows += _attention_case(flex, q, k, v, causal, sparsities, gen, peak)
    return rows, info


def _sdpa_backend(q, k, v, causal) -> dict:
    """Record which CUDA kernels SDPA ran; refuse to go on if it was not a flash kernel."""
    names = _cuda_kernels(lambda: _sdpa_flash(q, k, v, causal))
    if not any("flash" in s.lower() for s in names):
        raise RuntimeError(f"SDPA did not run a flash kernel: {names}")
    return {"sdpa_backend": "FLASH_ATTENTION (forced with sdpa_kernel)", "sdpa_cuda_kernels": names}


def _attention_case(flex, q, k, v, causal, sparsities, gen, peak) -> list[dict]:
    """One (shape, causal) case: SDPA once, then ours and FlexAttention at each sparsity."""
    from edgecompress.kernels import block_mask_to_index, block_sparse_attention

    _, h, n, d = q.shape
    ref = _sdpa_flash(q, k, v, causal)
    sdpa = _bench(lambda: _sdpa_flash(q, k, v, causal))
    dense_pairs = h * (n * (n + 1) // 2 if causal else n * n)  # (query, key) pairs over all heads
    rows = []
    for sparsity in sparsities:
        mask = _block_mask(h, -(-n // BLOCK), sparsity, causal, gen)
        index = block_mask_to_index(mask, causal)  # built once, outside the timed call
        bmask = _flex_mask(mask, causal, n)
        ours_out = block_sparse_attention(q, k, v, index, causal, block=BLOCK)
        flex_out = flex(q, k, v, block_mask=bmask)
        _check(f"flex vs ours n={n} sparsity={sparsity}", flex_out, ours_out, ATOL, 0.02)
        del flex_out
        if sparsity == 0.0:
            _check(f"ours vs sdpa n={n}", ours_out, ref, ATOL, 0.02)
        ours, flex_t = _bench_pair(
            lambda index=index: block_sparse_attention(q, k, v, index, causal, block=BLOCK),
            lambda bmask=bmask: flex(q, k, v, block_mask=bmask),
        )
        pairs = _pairs(mask, causal)
        tflops = 4 * d * pairs / (ours["median_ms"] * 1e-3) / 1e12
        rows.append({
            "seq": n, "heads": h, "head_dim": d, "causal": causal, "target_sparsity": sparsity,
            "block_sparsity": round(1 - pairs / dense_pairs, 4),
            "ours": ours, "sdpa_flash": sdpa, "flex": flex_t,
            "speedup_vs_sdpa": sdpa["median_ms"] / ours["median_ms"],
            "speedup_vs_flex": flex_t["median_ms"] / ours["median_ms"],
            "ours_tflops": tflops, "ours_frac_of_matmul_peak": tflops / peak,
            "sdpa_tflops": 4 * d * dense_pairs / (sdpa["median_ms"] * 1e-3) / 1e12,
        })  # fmt: skip
        print(_attention_line(rows[-1]), flush=True)
    return rows


def _attention_line(r) -> str:
    return (
        f"attn  N={r['seq']:>6} H={r['heads']:>2} D={r['head_dim']:>3} causal={r['causal']!s:<5} "
        f"sparsity={r['block_sparsity']:.2f}  ours {r['ours']['median_ms']:8.3f} ms  "
        f"sdpa {r['sdpa_flash']['median_ms']:8.3f}  flex {r['flex']['median_ms']:8.3f}  "
        f"x_sdpa {r['speedup_vs_sdpa']:5.2f}  x_flex {r['speedup_vs_flex']:5.2f}  {r['ours_tflops']:6.1f} TFLOP/s"
    )


# ---------------------------------------------------------------------------------------------- pooled


def bench_pooled(quick: bool) -> list[dict]:
    rows = []
    for n in GRID["quick" if quick else "full"]["pooled_seqs"]:
        for causal in (False, True):
            q, k, v = (torch.randn(1, 16, n, 128, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
            rows.append(_pooled_case(q, k, v, causal))
            print(_pooled_line(rows[-1]), flush=True)
    return rows


def _pooled_case(q, k, v, causal) -> dict:
    from edgecompress.kernels import attention_with_pooled_probs, reference

    _, h, n, d = q.shape
    out, pooled = attention_with_pooled_probs(q, k, v, BLOCK, causal)
    _check(f"pooled out n={n}", out, _sdpa_flash(q, k, v, causal), ATOL, 0.02)
    head0 = reference.attention_with_pooled_probs(q[:, :1], k[:, :1], v[:, :1], BLOCK, causal)[1]
    _check(f"pooled probs n={n}", pooled[:, :1], head0, 1e-5, 1e-3)  # float32 math on both sides
    del out, pooled

    def ours():
        return attention_with_pooled_probs(q, k, v, BLOCK, causal)

    def ref():
        return reference.attention_with_pooled_probs(q, k, v, BLOCK, causal)

    row = {"seq": n, "heads": h, "head_dim": d, "causal": causal}
    row["ours"], row["flash"] = _bench_pair(ours, lambda: _sdpa_flash(q, k, v, causal))
    row["overhead_vs_flash"] = row["ours"]["median_ms"] / row["flash"]["median_ms"]
    row["ours_peak_mem_gb"] = _peak_mem(ours)
    ref_bytes = 5 * h * n * n * 4  # scores, mask, probabilities and the pooling copies, float32
    if ref_bytes < 0.6 * torch.cuda.mem_get_info()[0]:
        row["reference"] = _bench(ref)
        row["reference_peak_mem_gb"] = _peak_mem(ref)
        row["speedup_vs_reference"] = row["reference"]["median_ms"] / row["ours"]["median_ms"]
    else:
        row["reference"] = f"skipped: needs about {ref_bytes / 2**30:.0f} GiB"
    return row


def _pooled_line(r) -> str:
    ref = r["reference"]
    ref_s = (
        f"ref {ref['median_ms']:9.3f} ms ({r['reference_peak_mem_gb']:.1f} GiB)"
        if isinstance(ref, dict)
        else ref
    )
    return (
        f"pool  N={r['seq']:>6} H={r['heads']} D={r['head_dim']} causal={r['causal']!s:<5} "
        f"ours {r['ours']['median_ms']:8.3f} ms ({r['ours_peak_mem_gb']:.2f} GiB)  "
        f"flash {r['flash']['median_ms']:8.3f}  overhead x{r['overhead_vs_flash']:.2f}  {ref_s}"
    )


# ---------------------------------------------------------------------------------------------- ACM


def _naive_acm(x, k, w1, b1, w2, n_learners):
    """Per-learner loop that runs each learner only on the tokens that execute it."""
    h = w1.shape[1] // n_learners
    out = torch.zeros(x.shape[0], w2.shape[1], device=x.device, dtype=torch.float32)
    for n in range(n_learners):
        idx = (k > n).nonzero().squeeze(1)
        cols = slice(n * h, (n + 1) * h)
        y = F.gelu(torch.addmm(b1[cols], x[idx], w1[:, cols])) @ w2[cols]
        out.index_add_(0, idx, y.float())
    return out.to(x.dtype)


def bench_acm(quick: bool) -> list[dict]:
    rows = []
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    grid = GRID["quick" if quick else "full"]
    for d, hidden in grid["acm_widths"]:
        for t in grid["acm_tokens"]:
            x = torch.randn(t, d, device=DEVICE, dtype=torch.bfloat16)
            w1 = torch.randn(d, hidden, device=DEVICE, dtype=torch.bfloat16) / d**0.5
            b1 = torch.randn(hidden, device=DEVICE, dtype=torch.bfloat16) * 0.1
            w2 = torch.randn(hidden, d, device=DEVICE, dtype=torch.bfloat16) / hidden**0.5
            for fraction in [0.25, 0.5, 0.75, 1.0]:
                prob = torch.full((t,), fraction, device=DEVICE)
                k = torch.binomial(torch.full_like(prob, N_LEARNERS), prob, generator=gen).long()  # mean f*N
                rows.append(_acm_case(x, k, w1, b1, w2, fraction))
                print(_acm_line(rows[-1]), flush=True)
    return rows


def _acm_case(x, k, w1, b1, w2, fraction) -> dict:
    from edgecompress.kernels import acm_mlp, reference

    (t, d), hidden = x.shape, w1.shape[1]
    want = reference.acm_mlp(x.float(), k, w1.float(), b1.float(), w2.float(), N_LEARNERS)
    _check(f"acm d={d} t={t} f={fraction}", acm_mlp(x, k, w1, b1, w2, N_LEARNERS), want, 3e-2, 0.02)
    _check(f"naive d={d} t={t} f={fraction}", _naive_acm(x, k, w1, b1, w2, N_LEARNERS), want, 3e-2, 0.02)
    executed = k.float().mean().item() / N_LEARNERS
    ours, dense = _bench_pair(
        lambda: acm_mlp(x, k, w1, b1, w2, N_LEARNERS), lambda: F.gelu(torch.addmm(b1, x, w1)) @ w2
    )
    naive = _bench(lambda: _naive_acm(x, k, w1, b1, w2, N_LEARNERS))
    ours_graph = _bench_graph(lambda: acm_mlp(x, k, w1, b1, w2, N_LEARNERS))
    dense_graph = _bench_graph(lambda: F.gelu(torch.addmm(b1, x, w1)) @ w2)
    graph_ratio = None
    if isinstance(ours_graph, dict) and isinstance(dense_graph, dict):
        graph_ratio = ours_graph["median_ms"] / (executed * dense_graph["median_ms"])
    return {
        "tokens": t, "d": d, "hidden": hidden, "n_learners": N_LEARNERS,
        "target_fraction": fraction, "executed_fraction": round(executed, 4),
        "ours": ours, "dense_mlp": dense, "naive_loop": naive,
        "ours_over_fraction_x_dense": ours["median_ms"] / (executed * dense["median_ms"]),
        "ours_cuda_graph": ours_graph, "dense_cuda_graph": dense_graph,
        "graph_ours_over_fraction_x_dense": graph_ratio,
        "speedup_vs_naive": naive["median_ms"] / ours["median_ms"],
        "ours_tflops": 4 * t * d * hidden * executed / (ours["median_ms"] * 1e-3) / 1e12,
    }  # fmt: skip


def _acm_line(r) -> str:
    return (
        f"acm   T={r['tokens']:>6} d={r['d']:>3} hidden={r['hidden']} executed={r['executed_fraction']:.2f}  "
        f"ours {r['ours']['median_ms']:7.3f} ms  dense {r['dense_mlp']['median_ms']:7.3f}  "
        f"naive {r['naive_loop']['median_ms']:7.3f}  ours/(f*dense) {r['ours_over_fraction_x_dense']:5.2f}  "
        f"x_naive {r['speedup_vs_naive']:5.2f}  {r['ours_tflops']:6.1f} TFLOP/s  graphed ours/(f*dense) "
        + (f"{g:5.2f}" if (g := r["graph_ours_over_fraction_x_dense"]) is not None else "n/a")
    )


# ---------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = _parse(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu_kernels.py: no CUDA GPU available, nothing to measure", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("benchmarks/gpu_kernels.py: triton is not installed", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    from edgecompress.kernels import ops

    if ops.INTERPRET:
        print(
            "benchmarks/gpu_kernels.py: TRITON_INTERPRET is set; unset it to time compiled kernels",
            file=sys.stderr,
        )
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    meta = _meta()
    meta["quick"] = args.quick
    meta["matmul_peak_tflops_bf16"] = _matmul_peak()
    print(f"{meta['device']}  driver {meta['driver']}  torch {meta['torch']}  triton {meta['triton']}  "
          f"bf16 matmul peak {meta['matmul_peak_tflops_bf16']:.0f} TFLOP/s", flush=True)  # fmt: skip
    results: dict = {"meta": meta}
    if "attention" in args.sections:
        mode = "max-autotune-no-cudagraphs" if args.flex_max_autotune else None
        results["attention"], meta["sdpa"] = bench_attention(
            args.quick, mode, meta["matmul_peak_tflops_bf16"]
        )
        meta["flex_compile_mode"] = mode or "default"
    if "pooled" in args.sections:
        results["pooled"] = bench_pooled(args.quick)
    if "acm" in args.sections:
        results["acm"] = bench_acm(args.quick)

    args.out.mkdir(parents=True, exist_ok=True)
    device = re.sub(r"[^A-Za-z0-9]+", "-", meta["device"]).strip("-")
    path = args.out / f"kernels-{device}-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(results, indent=1))
    print("\n" + "\n".join(
        [_attention_line(r) for r in results.get("attention", [])]
        + [_pooled_line(r) for r in results.get("pooled", [])]
        + [_acm_line(r) for r in results.get("acm", [])]
    ))  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
