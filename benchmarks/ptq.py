"""ViT PTQ calibration: accuracy and time, before/after, 1 and 2 threads, 1 and 2 processes (CPU).

    python benchmarks/ptq.py [--models vit-digits minilm deit-small] [--bits 4] [--methods ...]
        [--threads 1 2] [--processes 2] [--before main|fp32|none] [--before-root /work/main]
        [--before-deit-blocks N] [--deit-blocks N] [--row-timeout S] [--calib-offset 32] [--no-single]
        [--name xeon-amx] [--out DIR]
    python benchmarks/ptq.py --merge RUN1.json RUN2.json ... [--name xeon-amx] [--out DIR]

Every row is one fresh process (``--worker``), so the "before" rows can run another checkout's
code: ``--before main`` runs the same measurement with the package of ``--before-root`` (a
read-only worktree of main, whose passes have no ``scoring`` field: every candidate in fp32);
``--before fp32`` runs this checkout with ``scoring: fp32`` (the reference path kept operation
for operation); ``none`` measures only this checkout. Rows alternate before/after per
configuration (the project's ratio method on a shared machine); ``/proc/loadavg`` is recorded
before and after each row. ``--processes 2`` adds rows launched with
``torchrun --standalone --nproc_per_node 2`` (one thread each; rank 0 reports).

Models and metrics:

* ``vit-digits`` (demo, trained): top-1 on the 450 test digits, top-1 agreement with FP32 and the
  logits' SQNR against FP32; calibration = the first 32 train images; methods default to all.
* ``minilm`` (demo, real weights): mean embedding cosine to FP32 and nearest-neighbour agreement
  on the built-in test texts; calibration = the first 32 train texts; methods adalog, dopq_vit.
* ``deit-small``: ``timm:deit_small_patch16_224`` with random weights, 32 random 224² images (all
  6,304 tokens), adalog: calibration time (and the logit SQNR on 8 of those images, for drift only).
  ``--deit-blocks N`` keeps the first N of its 12 blocks (``--before-deit-blocks`` for the before
  rows, whose whole-model time on a CPU is hours: the row says how many blocks ran).

Each row carries the pass's per-step seconds (``profile``: capture, reparam, weight, input, q@k,
A@V searches, exchange) and per unit (``profile_units``) where the code reports them, and ``calib_cpu_s``, the worker's CPU
seconds (rank 0): on a shared CPU a 1-thread row's CPU time is close to its time on an idle core.
A code without a profile keeps its progress lines (``progress``: units done, unit, elapsed s, CPU s), also
when ``--row-timeout`` cuts the row. ``--merge`` writes one results file from several runs (each
run's meta kept; the summary recomputed over all rows). ``--calib-offset 32`` calibrates the demo models on the
train samples 32 … 63 instead (rows kept out of the before/after pairs; the summary gives their
metrics minus the default calibration's, same code: the run-to-run noise of a calibration draw). Output: a table on stdout and
``benchmarks/results/ptq-<name>-<date>.json`` (machine, CPU, date, command, every row).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = Path(os.environ.get("EC_BENCH_CODE", ROOT))  # the package a worker imports (a before row: main)
# not this folder: its kernels.py would shadow the ``kernels`` package transformers probes for
sys.path = [str(CODE)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

METHODS = ("uniform", "log2-softmax", "repq_vit", "adalog", "dopq_vit", "dopq_vit-mad")
DEFAULT_METHODS = {"vit-digits": list(METHODS), "minilm": ["adalog", "dopq_vit"], "deit-small": ["adalog"]}
CALIB_SAMPLES = 32


def _pass(method: str, bits: int, kw: dict):
    from edgecompress.quantize.ptq import UniformPTQ
    from edgecompress.quantize.vit_ptq import AdaLogPTQ, DopQViTPTQ, RepQViTPTQ

    make = {
        "uniform": lambda: UniformPTQ(w_bits=bits, a_bits=bits, observer="minmax"),
        "log2-softmax": lambda: RepQViTPTQ(w_bits=bits, a_bits=bits, softmax_quantizer="log2", **kw),
        "repq_vit": lambda: RepQViTPTQ(w_bits=bits, a_bits=bits, **kw),
        "adalog": lambda: AdaLogPTQ(w_bits=bits, a_bits=bits, **kw),
        "dopq_vit": lambda: DopQViTPTQ(w_bits=bits, a_bits=bits, **kw),
        "dopq_vit-mad": lambda: DopQViTPTQ(w_bits=bits, a_bits=bits, reparam="mad", **kw),
    }
    return make[method]()


def _logit_sqnr(ref, out) -> float:
    import torch

    r, o = torch.cat(ref).double(), torch.cat(out).double()
    return round(float(10 * torch.log10(r.pow(2).sum() / (r - o).pow(2).sum().clamp_min(1e-30))), 2)


def _deit(blocks: int | None):
    import torch

    from edgecompress.calib import make_context
    from edgecompress.models.loading import load_model

    loaded = load_model("timm:deit_small_patch16_224?pretrained=false")
    if blocks is not None:
        loaded.model.blocks = loaded.model.blocks[:blocks]
    gen = torch.Generator().manual_seed(0)
    batch = torch.randn(CALIB_SAMPLES, 3, 224, 224, generator=gen)
    return loaded, make_context([batch], loaded.call, torch.device("cpu")), [batch[:8]]


def _demo(spec: str, offset: int = 0):
    """The demo model, its calibration batch (train samples ``offset … offset + 32``) and test data."""
    import torch

    from edgecompress.calib import make_context
    from edgecompress.data.specs import load_data
    from edgecompress.models.loading import load_model

    loaded = load_model(spec)
    calib = load_data(None, loaded, "train", offset + CALIB_SAMPLES, CALIB_SAMPLES)
    return (
        loaded,
        make_context(calib.batches[-1:] if offset else calib.batches, loaded.call, torch.device("cpu")),
        load_data(None, loaded, "test", 0, 64),
    )


class _CpuStamped:
    """stderr whose lines end with this process's CPU seconds (the progress lines then say how much
    CPU each unit took, also for a code without a profile and on a shared, loaded CPU)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        if text.startswith("edgecompress:"):
            text = text.rstrip("\n") + f" [cpu {time.process_time():.1f}]\n"
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def worker(spec: dict) -> dict | None:
    """One measurement in this process (rank 0 returns the row; other ranks None)."""
    import torch

    sys.stderr = _CpuStamped(sys.stderr)

    from edgecompress.data.metrics import evaluate
    from edgecompress.pipeline import load_builtin_passes, run

    load_builtin_passes()
    kw = {"threads": spec["threads"], **({"scoring": spec["scoring"]} if spec.get("scoring") else {})}
    kw.update({"max_tokens": spec["max_tokens"]} if spec.get("max_tokens") else {})
    if spec["model"] == "deit-small":
        loaded, ctx, test = _deit(spec.get("deit_blocks"))
        with torch.no_grad():
            fp_out = [loaded.call(loaded.model, test[0]).clone()]
    else:
        loaded, ctx, test = _demo(f"demo:{spec['model']}", spec.get("calib_offset", 0))
        _, fp_out = evaluate(loaded, loaded.model, test)
    p = _pass(spec["method"], spec["bits"], kw if spec["method"] != "uniform" else {})
    t0, c0 = time.perf_counter(), time.process_time()
    model, records = run(loaded.model, [p], ctx)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    prof = records[0].get("info", {}).get("profile", {})
    row = {
        "calib_s": round(secs, 1),
        "calib_cpu_s": round(cpu, 1),
        "profile": prof.get("seconds"),
        "profile_units": prof.get("units"),
    }
    if spec["model"] == "deit-small":
        with torch.no_grad():
            row["logit_sqnr_db"] = _logit_sqnr(fp_out, [loaded.call(model, test[0])])
        return row
    metrics, out = evaluate(loaded, model, test, reference=fp_out)
    row.update({k: v for k, v in metrics.items() if k not in ("samples", "data")})
    if loaded.kind == "image":
        row["logit_sqnr_db"] = _logit_sqnr(fp_out, out)
    return row


def _load() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def _progress(stderr: str | bytes | None) -> list:
    """The pass's progress lines as ``[units done, unit, elapsed s, CPU s]`` (a row cut by ``--row-timeout``
    keeps how far it got: the per-unit seconds of a code that reports no profile)."""
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr or ""
    found = re.findall(
        r"calibration, unit: (\d+)/\d+ (\S+) \((?:(\d+)m)?(\d+)(?:s| s).*\[cpu ([\d.]+)\]", text
    )
    return [[int(d), name, int(m or 0) * 60 + int(sec), float(cpu)] for d, name, m, sec, cpu in found]


def launch(spec: dict, code: Path, processes: int, timeout: float | None = None) -> dict:
    """Run :func:`worker` in a fresh process (``torchrun`` for ``processes > 1``) with ``code``'s package."""
    env = {**os.environ, "EC_BENCH_CODE": str(code), "OMP_NUM_THREADS": str(spec["threads"])}
    env["PYTHONPATH"] = str(code)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    if processes > 1:
        torchrun = Path(sys.executable).parent / "torchrun"
        cmd = [str(torchrun), "--standalone", "--nproc_per_node", str(processes), *cmd[1:]]
    load0 = _load()
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as cut:
        return {"timed_out_s": timeout, "progress": _progress(cut.stderr), "load_before": load0}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        return {"error": done.stderr[-1500:], "load_before": load0}
    row = {**json.loads(lines[-1][7:]), "load_before": load0, "load_after": _load()}
    return {**row, "progress": _progress(done.stderr)} if "profile_units" not in row else row


def plan(args) -> list[dict]:
    """The rows: per (model, method, bits, calibration offset): before/after at each thread count,
    then the torchrun row."""
    rows = []
    for model in args.models:
        for method, bits, offset in (
            (me, b, o)
            for me in args.methods or DEFAULT_METHODS[model]
            for b in args.bits
            for o in args.calib_offset
        ):
            base = {
                "model": model,
                "method": method,
                "bits": bits,
                **({"calib_offset": offset} if offset else {}),
            }
            for threads in [] if args.no_single else args.threads:
                if args.before != "none" and method != "uniform":
                    rows.append({**base, "code": "before", "threads": threads, "processes": 1})
                rows.append({**base, "code": "after", "threads": threads, "processes": 1})
            if args.processes > 1 and method != "uniform":
                rows.append({**base, "code": "after", "threads": 1, "processes": args.processes})
            if args.max_tokens and method != "uniform":  # the opt-in approximation, for its effect
                rows.append(
                    {**base, "code": "after", "threads": 1, "processes": 1, "max_tokens": args.max_tokens}
                )
    return rows


def measure(r: dict, args) -> dict:
    spec = {k: r[k] for k in ("model", "method", "bits", "threads", "max_tokens", "calib_offset") if k in r}
    code = ROOT
    if r["code"] == "before":
        code = args.before_root if args.before == "main" else ROOT
        spec["scoring"] = "fp32" if args.before == "fp32" else None
        spec["deit_blocks"] = args.before_deit_blocks
    else:
        spec["deit_blocks"] = args.deit_blocks
    if r["model"] != "deit-small":
        spec.pop("deit_blocks")
    out = launch(spec, Path(code), r["processes"], args.row_timeout)
    blocks = spec.get("deit_blocks")
    return {**r, **({"blocks": f"{blocks or 12}/12"} if r["model"] == "deit-small" else {}), **out}


def _commit(path: Path) -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "edgecompress"], cwd=path, capture_output=True, text=True
    )
    return (head.stdout.strip() or "unknown") + ("+dirty" if dirty.stdout.strip() else "")


def _meta(args) -> dict:
    import torch

    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), ""
    )
    flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "")
    return {
        "machine": args.name,
        "cpu": cpu,
        "amx": "amx_bf16" in flags,
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "after_commit": _commit(ROOT),
        "before": args.before,
        "before_commit": _commit(args.before_root) if args.before == "main" else None,
    }


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument(
        "--models", nargs="+", default=["vit-digits", "minilm", "deit-small"], choices=list(DEFAULT_METHODS)
    )
    p.add_argument("--methods", nargs="+", choices=METHODS, help="default: per model (see the docstring)")
    p.add_argument("--bits", type=int, nargs="+", default=[4])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--processes", type=int, default=2, help="also run each row under torchrun (1: skip)")
    p.add_argument("--before", choices=["main", "fp32", "none"], default="main")
    p.add_argument("--before-root", type=Path, default=Path("/work/main"))
    p.add_argument("--before-deit-blocks", type=int, default=1)
    p.add_argument("--deit-blocks", type=int, default=None)
    p.add_argument(
        "--max-tokens", type=int, default=None, help="also an 'after' row with this token subsample"
    )
    p.add_argument(
        "--row-timeout", type=float, default=None, help="cut a row after S seconds (keeps its progress)"
    )
    p.add_argument("--no-single", action="store_true", help="only the torchrun rows (a long model)")
    p.add_argument(
        "--calib-offset",
        type=int,
        nargs="+",
        default=[0],
        help="demo models: calibrate on train samples N … N+31 (noise); several: one set of rows each",
    )
    p.add_argument("--merge", type=Path, nargs="+", help="merge these results files of earlier runs")
    p.add_argument("--note", action="append", default=[], help="with --merge: a line for the file's meta")
    p.add_argument("--name", default="xeon-amx", help="machine name in the result file")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    if any(o % CALIB_SAMPLES for o in args.calib_offset):
        print(f"--calib-offset must be a multiple of {CALIB_SAMPLES}", file=sys.stderr)
        return 2
    if args.worker:
        row = worker(json.loads(args.worker))
        if row is not None:
            print("RESULT " + json.dumps(row), flush=True)
        return 0
    from benchmarks.ptq_report import merge, summary, table  # not in a worker: it may run main's package

    if args.merge:
        merge(args.merge, args.out / f"ptq-{args.name}-{datetime.date.today().isoformat()}.json", args.note)
        return 0
    meta, rows = _meta(args), []
    path = args.out / f"ptq-{args.name}-{datetime.date.today().isoformat()}.json"
    args.out.mkdir(parents=True, exist_ok=True)
    for r in plan(args):
        rows.append(measure(r, args))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))  # partial results survive
    print(table(rows))
    summ = summary(rows)
    for entry in summ:
        print(json.dumps(entry))
    path.write_text(json.dumps({"meta": meta, "summary": summ, "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
