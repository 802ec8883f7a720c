"""Timing, checking and environment helpers of benchmarks/gpu_kernels.py (GPU only).

Timing is ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs, warm-up) with the
median and the 20th/80th percentiles; ``_bench_graph`` removes CPU launch overhead with a CUDA
graph; ``_check`` refuses to time an implementation that disagrees with another one.
"""

from __future__ import annotations

import datetime
import subprocess

import torch

DEVICE = "cuda"
QUANTILES = [0.5, 0.2, 0.8]


def _bench(fn) -> dict:
    from triton.testing import do_bench

    p50, p20, p80 = do_bench(fn, warmup=50, rep=200, quantiles=QUANTILES)
    return {"median_ms": p50, "p20_ms": p20, "p80_ms": p80}


def _bench_pair(fn_a, fn_b) -> tuple[dict, dict]:
    """Time A, B, A, B back to back and keep, for each, the run with the lower median."""
    runs_a, runs_b = [], []
    for _ in range(2):
        runs_a.append(_bench(fn_a))
        runs_b.append(_bench(fn_b))
    return min(runs_a, key=lambda r: r["median_ms"]), min(runs_b, key=lambda r: r["median_ms"])


def _bench_graph(fn) -> dict | str:
    """GPU time without CPU launch overhead: fn captured in a CUDA graph (do_bench_cudagraph)."""
    from triton.testing import do_bench_cudagraph

    try:
        p50, p20, p80 = do_bench_cudagraph(fn, rep=100, quantiles=QUANTILES)
    except Exception as err:  # report, do not hide, a capture failure
        return f"capture failed: {type(err).__name__}: {err}"[:200]
    return {"median_ms": p50, "p20_ms": p20, "p80_ms": p80}


def _check(name, got, want, atol, rtol):
    """Refuse to time an implementation whose output disagrees with another one, element-wise:
    |got - want| <= atol + rtol * |want| everywhere (NaN fails)."""
    diff = (got.float() - want.float()).abs()
    ok = diff <= atol + rtol * want.float().abs()
    if not bool(ok.all()):
        worst = diff.nan_to_num(float("inf")).max().item()
        raise RuntimeError(f"{name}: {int((~ok).sum())} elements differ (max {worst:.3g}); not timing it")


def _meta() -> dict:
    import triton

    def smi(field):
        cmd = [
            "nvidia-smi",
            f"--query-gpu={field}",
            "--format=csv,noheader",
            f"--id={torch.cuda.current_device()}",
        ]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
        except (OSError, subprocess.SubprocessError):
            return "unknown"

    return {
        "device": torch.cuda.get_device_name(),
        "driver": smi("driver_version"),
        "clocks_sm_mhz": smi("clocks.sm"),
        "clocks_max_sm_mhz": smi("clocks.max.sm"),
        "power_limit": smi("power.limit"),
        "cuda_runtime": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "timing": "triton.testing.do_bench(warmup=50 ms, rep=200 ms, quantiles=[0.5, 0.2, 0.8])",
    }


def _matmul_peak() -> float:
    a, b = (torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192**3 / (_bench(lambda: a @ b)["median_ms"] * 1e-3) / 1e12


def _cuda_kernels(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})


def _peak_mem(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30
