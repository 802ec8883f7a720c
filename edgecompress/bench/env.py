"""The environment a latency number was measured in, captured with every run.

CPU model, cores and the instruction-set flags that decide INT8/FP16 speed (from /proc/cpuinfo),
the load average at the time (other processes skew CPU timings), frequency governor when
readable, GPU name / driver / clocks (``nvidia-smi``) and Jetson power mode (``nvpmodel -q``)
when present, and the versions of every library on the timing path. Nothing here fails: what is
not readable is reported as ``None``.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata

CPU_FLAGS = (
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "i8mm", "sve",
)  # fmt: skip
LIBRARIES = (
    "torch",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "tensorrt",
    "transformers",
    "timm",
    "numpy",
    "edgecompress",
)
GPU_QUERY = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,pstate"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _run(cmd: list[str], timeout: float = 5.0) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def cpu_info() -> dict:
    """CPU model, logical cores usable by this process, ISA flags that matter, load average."""
    text = _read("/proc/cpuinfo") or ""
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model") and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    governor = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    return {
        "model": model or platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "logical_cores": usable,
        "flags": [f for f in CPU_FLAGS if f in flags],
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "governor": governor.strip() if governor else None,
    }


def gpu_info() -> list[dict] | None:
    """One dict per NVIDIA GPU from ``nvidia-smi`` (name, driver, SM/memory clocks, power limit)."""
    out = _run(["nvidia-smi", f"--query-gpu={GPU_QUERY}", "--format=csv,noheader"])
    if not out:
        return None
    keys = GPU_QUERY.split(",")
    return [dict(zip(keys, (v.strip() for v in line.split(",")))) for line in out.splitlines()]


def jetson_power_mode() -> str | None:
    out = _run(["nvpmodel", "-q"])
    return out.splitlines()[0] if out else None


def library_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment(threads: int | None = None) -> dict:
    """Everything above plus the thread count the measurement used."""
    return {
        "cpu": cpu_info(),
        "threads": threads,
        "gpu": gpu_info(),
        "jetson_power_mode": jetson_power_mode(),
        "os": platform.platform(),
        "libraries": library_versions(),
    }


def machine_tag() -> str:
    """A short CPU name for result files (``xeon-amx``, ``epyc-avx2``, ...): the host name alone does not
    say which machine measured (several of this project's VMs are called ``vm``)."""
    info = cpu_info()
    model, flags = (info["model"] or "").lower(), set(info["flags"])
    family = next(
        (f for f in ("xeon", "epyc", "core", "ryzen", "neoverse") if f in model), platform.machine()
    )
    isa = next((f for f in ("amx_bf16", "avx512_vnni", "avx512f", "avx2", "asimd") if f in flags), "")
    return f"{family}-{isa.split('_')[0]}" if isa else family


def run_meta(threads: int) -> dict:
    """What a benchmark's result file records about the run: date, machine (:func:`machine_tag`), host,
    CPU, torch threads and versions, load average, the command line."""
    import datetime
    import socket
    import sys

    import torch

    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine_tag(),
            "hostname": socket.gethostname(), "cpu": cpu_info()["model"], "cpu_count": os.cpu_count(),
            "torch_threads": threads, "torch": torch.__version__, "python": platform.python_version(),
            "loadavg": os.getloadavg(), "command": " ".join(sys.argv)}  # fmt: skip


def results_file(out, name: str, threads: int) -> tuple:
    """``(path, data, meta)`` of a benchmark's result file ``<out>/<name>-<machine>-<date>.json``:
    the rows written so far (or none) and this run's :func:`run_meta`."""
    import datetime
    import json
    from pathlib import Path

    meta = run_meta(threads)
    path = Path(out) / f"{name}-{meta['machine']}-{datetime.date.today().isoformat()}.json"
    data = json.loads(path.read_text()) if path.is_file() else {"runs": [], "rows": []}
    return path, data, meta


def append_rows(path, data: dict, meta: dict, rows: list) -> None:
    """Add this run's :func:`run_meta` and ``rows`` to a :func:`results_file` and write it."""
    import json

    data["runs"].append(meta)
    data["rows"] += rows
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path}")
