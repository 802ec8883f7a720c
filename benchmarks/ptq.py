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
    """The rows: per (model, method, bits): before/after at each thread count, then the torchrun row."""
    rows = []
    for model in args.models:
        for method in args.methods or DEFAULT_METHODS[model]:
            for bits in args.bits:
                base = {"model": model, "method": method, "bits": bits}
                base.update({"calib_offset": args.calib_offset} if args.calib_offset else {})
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


KEYS = ("top1", "top1_agreement", "logit_sqnr_db", "cosine_mean", "nn_agreement", "calib_s", "calib_cpu_s")


def table(rows: list[dict]) -> str:
    head = "| model | method | W/A | code | threads × procs | " + " | ".join(KEYS) + " | load |"
    lines = [head, "|" + "---|" * (len(KEYS) + 6)]
    for r in rows:
        cells = [str(r.get(k, "")) for k in KEYS]
        what = r["model"] + (f" ({r['blocks']})" if "blocks" in r else "")
        what += f" max_tokens={r['max_tokens']}" if r.get("max_tokens") else ""
        what += f" calib {r['calib_offset']}+" if r.get("calib_offset") else ""
        load = r.get("load_before", [""])[0]
        lines.append(
            f"| {what} | {r['method']} | {r['bits']} | {r['code']} | {r['threads']} × {r['processes']} | "
            + " | ".join(cells)
            + f" | {load} |"
        )
    return "\n".join(lines)


METRICS = ("top1", "logit_sqnr_db", "cosine_mean", "nn_agreement")


def summary(rows: list[dict]) -> list[dict]:
    """Per (model, method, bits): before/after time ratios per thread count, the 2-process speed-up
    over 1 process × 1 thread, and metric drift (after − before) next to the run-to-run noise (the
    spread between the 1- and 2-thread runs of the same code: only float reduction order differs)."""
    out = []
    ident = lambda r: (r["model"], r["method"], r["bits"], r.get("blocks", ""))  # noqa: E731
    for key in sorted({ident(r) for r in rows if "calib_s" in r}):
        mine = [r for r in rows if ident(r) == key and "calib_s" in r]
        pick = {
            (r["code"], r["threads"], r["processes"]): r
            for r in mine
            if not r.get("max_tokens") and not r.get("calib_offset")
        }
        entry: dict = {
            "model": key[0],
            "method": key[1],
            "bits": key[2],
            **({"blocks": key[3]} if key[3] else {}),
        }
        for th in sorted({r["threads"] for r in mine}):
            b, a = pick.get(("before", th, 1)), pick.get(("after", th, 1))
            if a and b:
                entry[f"speedup_{th}t"] = round(b["calib_s"] / a["calib_s"], 2)
                if b.get("calib_cpu_s") and a.get("calib_cpu_s"):  # robust to a loaded CPU at 1 thread
                    entry[f"cpu_speedup_{th}t"] = round(b["calib_cpu_s"] / a["calib_cpu_s"], 2)
        one, two = pick.get(("after", 1, 1)), next((r for r in pick.values() if r["processes"] > 1), None)
        if one and two:
            entry["speedup_2proc_vs_1proc"] = round(one["calib_s"] / two["calib_s"], 2)
        for m in METRICS:
            vals = {
                c: [r[m] for r in pick.values() if r["code"] == c and m in r] for c in ("before", "after")
            }
            if vals["before"] and vals["after"]:
                entry[f"{m}_drift"] = round(vals["after"][0] - vals["before"][0], 4)
                if max(len(v) for v in vals.values()) > 1:  # a spread needs two runs of one code
                    entry[f"{m}_noise"] = round(max(max(v) - min(v) for v in vals.values()), 4)
        sub = next((r for r in mine if r.get("max_tokens")), None)
        if sub and one:  # the opt-in subsample against all tokens (same code, 1 thread)
            entry["max_tokens"] = sub["max_tokens"]
            entry["max_tokens_speedup"] = round(one["calib_s"] / sub["calib_s"], 2)
            for m in METRICS:
                if m in sub and m in one:
                    entry[f"max_tokens_{m}_delta"] = round(sub[m] - one[m], 4)
        entry.update(_calib_noise(mine, one))
        out.append(entry)
    return out


def _calib_noise(mine: list[dict], one: dict | None) -> dict:
    """The metrics of a calibration on other train samples (``--calib-offset``) minus the default's
    (same code, 1 thread): the run-to-run noise of a calibration draw, to judge drift against."""
    off = next((r for r in mine if r.get("calib_offset") and r["code"] == "after"), None)
    if not (off and one):
        return {}
    deltas = {f"calib_offset_{m}_delta": round(off[m] - one[m], 4) for m in METRICS if m in off and m in one}
    return {"calib_offset": off["calib_offset"], **deltas} if deltas else {}


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
        "--calib-offset", type=int, default=0, help="demo models: calibrate on train samples N … N+31 (noise)"
    )
    p.add_argument("--merge", type=Path, nargs="+", help="merge these results files of earlier runs")
    p.add_argument("--note", action="append", default=[], help="with --merge: a line for the file's meta")
    p.add_argument("--name", default="xeon-amx", help="machine name in the result file")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return p.parse_args(argv)


def merge(paths: list[Path], out: Path, notes: list[str]) -> None:
    """One results file from several runs of this script (each run's meta kept, rows tagged with it)."""
    runs = [json.loads(p.read_text()) for p in paths]
    rows = [
        {**r, "run": i, "before_code": run["meta"]["before"]}
        for i, run in enumerate(runs)
        for r in run["rows"]
    ]
    first = runs[0]["meta"]
    meta = {k: first[k] for k in ("machine", "cpu", "amx", "cpu_count", "torch", "python")}
    meta.update(
        date=first["date"][:10],
        command=" ".join(["python benchmarks/ptq.py --merge", *map(str, paths), "--note ... (notes)"]),
    )
    meta["notes"] = notes
    meta["runs"] = [run["meta"] for run in runs]
    out.write_text(json.dumps({"meta": meta, "summary": summary(rows), "rows": rows}, indent=1))
    print(table(rows))
    print(f"wrote {out}")


def main(argv=None) -> int:
    args = _parse(argv)
    if args.calib_offset % CALIB_SAMPLES:
        print(f"--calib-offset must be a multiple of {CALIB_SAMPLES}", file=sys.stderr)
        return 2
    if args.merge:
        merge(args.merge, args.out / f"ptq-{args.name}-{datetime.date.today().isoformat()}.json", args.note)
        return 0
    if args.worker:
        row = worker(json.loads(args.worker))
        if row is not None:
            print("RESULT " + json.dumps(row), flush=True)
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
