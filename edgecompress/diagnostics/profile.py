"""``inspect --profile``: ORT's per-node profile mapped back to module names."""

from __future__ import annotations

import ast
import json
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from edgecompress.diagnostics.common import (
    ADAPTER,
    CHAIN_NAMES,
    ROOT,
    SCOPE_KEY,
    UNMAPPED,
    _bar_chart,
    _write_outputs,
    check_folder,
    write_atomic,
)  # noqa: F401  # fmt: skip
from edgecompress.errors import UserError

# --------------------------------------------------------------------------- profile


def _scope_of(node) -> str | None:
    """The module path a node of the exported graph came from (innermost ``model.`` scope), or None."""
    value = next((p.value for p in node.metadata_props if p.key == SCOPE_KEY), None)
    if not value:
        return None
    try:
        scopes = [s for s in ast.literal_eval(value) if s == "model" or s.startswith("model.")]
    except (ValueError, SyntaxError):
        return None
    return module_of_scope(scopes[-1]) if scopes else None


def module_of_scope(scope: str) -> str:
    """``model.blocks.0.attn.qkv.input_chain.0`` → ``blocks.0.attn.qkv``: the layer a scope belongs
    to (a slot chain's owner; an attention adapter's attention module; ``(model)`` for the root)."""
    path = scope[len("model.") :] if scope.startswith("model.") else ""
    parts = path.split(".") if path else []
    for i, p in enumerate(parts):
        if p in CHAIN_NAMES or p == ADAPTER:
            parts = parts[:i]
            break
    return ".".join(parts) or ROOT


def map_optimized_nodes(original, optimized) -> dict[str, tuple[str, str]]:
    """Optimized node name → (module, how it was mapped) for every node of ``optimized`` (ModelProtos).

    Methods: ``name`` (the node kept its name), ``fused`` (``<name>/<Fusion>`` or ``<name>_token_N``),
    ``output`` (it produces a tensor an original node produced), ``neighbour`` (a node ORT created:
    the module of its consumers, else of its producers, when they agree); else ``(unmapped)``.
    """
    scope = {n.name: _scope_of(n) for n in original.graph.node}
    produced = {t: scope[n.name] for n in original.graph.node for t in n.output if scope[n.name]}
    out: dict[str, tuple[str, str]] = {}
    for n in optimized.graph.node:
        base = re.sub(r"_token_\d+$", "", n.name.split("/")[0])
        if scope.get(n.name):
            out[n.name] = (scope[n.name], "name")
        elif scope.get(base):
            out[n.name] = (scope[base], "fused")
        elif any(t in produced for t in n.output):
            out[n.name] = (next(produced[t] for t in n.output if t in produced), "output")
    producers = {t: n.name for n in optimized.graph.node for t in n.output}
    consumers: dict[str, list[str]] = defaultdict(list)
    for n in optimized.graph.node:
        for t in n.input:
            consumers[t].append(n.name)
    nodes = {n.name: n for n in optimized.graph.node}
    changed = True
    while changed:  # propagate through chains of created nodes (Q → Transpose → Squeeze ...)
        changed = False
        for name, n in nodes.items():
            if name in out:
                continue
            for side in (
                [c for t in n.output for c in consumers.get(t, [])],
                [producers[t] for t in n.input if t in producers],
            ):
                mods = {out[x][0] for x in side if x in out}
                if len(mods) == 1:
                    out[name] = (mods.pop(), "neighbour")
                    changed = True
                    break
    for name in nodes:
        out.setdefault(name, (UNMAPPED, "unmapped"))
    return out


def _onnx_batch(proto) -> int | str | None:
    """The first graph input's batch dimension: an int, ``"dynamic"``, or None (no inputs)."""
    if not proto.graph.input:
        return None
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    if not dims:
        return None
    return dims[0].dim_value if dims[0].HasField("dim_value") else "dynamic"


def _profiled_session(path: Path, threads: int | None, tmp: Path):
    """An ORT session like :func:`~edgecompress.export.runtime.ort_session` (same config), with
    profiling on and the optimized graph saved; returns (session, config, optimized path)."""
    from edgecompress.export.runtime import onnxruntime, session_config

    ort = onnxruntime()
    cfg = session_config(path, threads)
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, cfg["graph_optimization_level"])
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    optimized = tmp / "optimized.onnx"
    so.optimized_model_filepath = str(optimized)
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp / "ort_profile")
    try:
        sess = ort.InferenceSession(
            str(path), so, providers=cfg["providers"], disabled_optimizers=cfg["disabled_optimizers"]
        )
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
        raise UserError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0][:300]}") from None
    return sess, cfg, optimized


def timed_node_events(events: list[dict], runs: int) -> tuple[list[list[dict]], list[dict]]:
    """(kernel events of each of the last ``runs`` runs, those ``model_run`` events) of an ORT trace."""
    run_ev = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
        key=lambda e: e["ts"],
    )
    timed = run_ev[-runs:] if runs else []
    per_run: list[list[dict]] = [[] for _ in timed]
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        for i, r in enumerate(timed):
            if r["ts"] <= e["ts"] <= r["ts"] + r["dur"]:
                per_run[i].append(e)
                break
    return per_run, timed


class _PerRun:
    """Microseconds per key and run: the mean and the median run of each key, in ms."""

    def __init__(self, runs: int):
        self.runs, self.us = runs, defaultdict(lambda: [0.0] * runs)

    def add(self, key, run: int, us: float) -> None:
        self.us[key][run] += us

    def mean_ms(self, key) -> float:
        return round(sum(self.us[key]) / self.runs / 1e3, 6)

    def median_ms(self, key) -> float:
        v = sorted(self.us[key])
        mid = len(v) // 2
        return round((v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2) / 1e3, 6)


def aggregate(per_run: list[list[dict]], mapping: dict[str, tuple[str, str]], scopes: dict) -> dict:
    """Kernel time per module, op type and mapping method from :func:`timed_node_events`' runs.

    ``mapping``: optimized node → (module, method) (:func:`map_optimized_nodes`); ``scopes``: node of
    the exported graph → module, for kernels the saved optimized graph does not have. Every event
    lands in one module row (``(unmapped)`` included), so the rows' ``mean_ms`` add up to ``node_ms``.
    """
    n = len(per_run)
    mod, mod_op, op, how_t, total = _PerRun(n), _PerRun(n), _PerRun(n), _PerRun(n), _PerRun(n)
    nodes: dict[str, set] = defaultdict(set)
    in_graph = events = 0
    for i, run in enumerate(per_run):
        for e in run:
            name, kind = e["name"][: -len("_kernel_time")], e.get("args", {}).get("op_name", "?")
            if name in mapping:
                module, how = mapping[name]
                in_graph += 1
            else:  # a kernel the saved graph does not have: the exported graph's names directly
                module = scopes.get(name) or scopes.get(re.sub(r"_token_\d+$", "", name.split("/")[0]))
                module, how = (module, "name") if module else (UNMAPPED, "unmapped")
            events += 1
            nodes[module].add(name)
            for acc, key in ((mod, module), (mod_op, (module, kind)), (op, kind), (how_t, how), (total, "")):
                acc.add(key, i, e["dur"])
    order = sorted(mod.us, key=lambda m: (-mod.median_ms(m), -mod.mean_ms(m), m))
    node_mean = total.mean_ms("")
    modules = []
    for m in order:
        kinds = sorted((k for mm, k in mod_op.us if mm == m), key=lambda k: -mod_op.mean_ms((m, k)))
        modules.append({
            "module": m,
            "ms": mod.median_ms(m),
            "mean_ms": mod.mean_ms(m),
            "percent": round(100 * mod.mean_ms(m) / max(node_mean, 1e-12), 3),
            "nodes": len(nodes[m]),
            "op_types": {k: mod_op.mean_ms((m, k)) for k in kinds},
        })  # fmt: skip
    return {
        "node_ms": node_mean,
        "node_ms_median_run": total.median_ms(""),
        "mapping_ms": {k: how_t.mean_ms(k) for k in sorted(how_t.us, key=lambda k: -how_t.mean_ms(k))},
        "unmapped_ms": mod.mean_ms(UNMAPPED) if UNMAPPED in mod.us else 0.0,
        "kernels_in_optimized_graph": f"{in_graph}/{events}",
        "op_types_ms": {k: op.mean_ms(k) for k in sorted(op.us, key=lambda k: -op.mean_ms(k))},
        "modules": modules,
    }


def profile(
    folder: str | Path,
    batch: int = 1,
    seq: int = 128,
    runs: int = 20,
    warmup: int = 5,
    threads: int | None = None,
    write: bool = True,
) -> dict:
    """Per-module ONNX Runtime time of a compressed folder's graph (see the module docstring).

    Writes ``profile.json``, ``profile.png``, ``profile_trace.json`` (the timed runs' events in
    Chrome trace format: open it in ``chrome://tracing`` or Perfetto) and the report section.
    """
    import onnx

    from edgecompress.bench.backends import feeds_for, vocab_size
    from edgecompress.export.onnx import check_onnx
    from edgecompress.export.runtime import onnxruntime

    folder = check_folder(folder)
    if batch < 1 or runs < 1 or warmup < 0 or seq < 1:
        raise UserError("--batch, --runs and --seq must be ≥ 1 and --warmup ≥ 0")
    t0 = time.perf_counter()
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="edgecompress-profile-") as tmpdir:
        tmp = Path(tmpdir)
        path, exported = folder / "model.onnx", None
        if path.is_file():
            proto = check_onnx(path)  # a corrupt file: one line
            have = _onnx_batch(proto)
            if have not in ("dynamic", batch):
                notes.append(f"{path.name} has static batch {have}; profiled a batch-{batch} export instead")
                path = None
        else:
            path = None
        if path is None:
            path, proto, exported = _export_for_profile(folder, tmp, batch)
        sess, cfg, optimized = _profiled_session(path, threads, tmp)
        feeds = feeds_for(sess, batch, seq, vocab=vocab_size(path))
        try:
            for _ in range(warmup + runs):
                sess.run(None, feeds)
        except Exception as e:  # e.g. --seq beyond the model's positions
            raise UserError(f"ONNX Runtime cannot run {path.name}: {str(e).splitlines()[0][:300]}") from None
        trace_file = Path(sess.end_profiling())
        events = json.loads(trace_file.read_text())
        opt = onnx.load(str(optimized)) if optimized.is_file() else None
        mapping = map_optimized_nodes(proto, opt) if opt is not None else {}
        onnx_name = (
            str(path) if exported is None else f"{path.name} (exported to a temporary file: {exported})"
        )
    per_run, timed = timed_node_events(events, runs)
    if not any(per_run):
        raise UserError("ONNX Runtime's profile has no kernel events for the timed runs")
    scopes = {n.name: _scope_of(n) for n in proto.graph.node}
    if not any(scopes.values()):
        notes.append(
            "the ONNX graph has no module scopes (pkg.torch.onnx.name_scopes; the TorchScript exporter writes "
            "none), so all time is (unmapped)"
        )
    agg = aggregate(per_run, mapping, scopes)
    n = len(timed)
    run_us = sum(e["dur"] for e in timed)
    result = {
        "method": "ONNX Runtime profiling (SessionOptions.enable_profiling): kernel time of every node in the "
        "timed runs, attributed to modules through the exported graph's pkg.torch.onnx.name_scopes; per "
        "module: ms = its time in the median run (robust to stalls), mean_ms = its mean over the runs "
        "(the rows' mean_ms add up to node_ms)",
        "folder": str(folder),
        "onnx": onnx_name,
        "onnxruntime": onnxruntime().__version__,
        "session": cfg,
        "inputs": {k: list(v.shape) for k, v in feeds.items()},
        "batch": batch,
        "warmup_runs": warmup,
        "runs": n,
        "run_ms": round(run_us / n / 1e3, 6),
        "node_fraction_of_run": round(agg["node_ms"] * n * 1e3 / max(run_us, 1), 4),
        **agg,
        "trace": "profile_trace.json",
        "notes": notes,
        "seconds": round(time.perf_counter() - t0, 2),
        "timing_note": "profiling adds a little overhead per node; use `edgecompress bench` for end-to-end latency",
    }
    if write:
        write_atomic(
            folder / "profile_trace.json", json.dumps(_slim_trace([e for r in per_run for e in r], timed))
        )
        _write_outputs(folder, "profile", result, _profile_chart)
    return result


def _export_for_profile(folder: Path, tmp: Path, batch: int):
    from edgecompress.export.onnx import check_onnx, export_onnx
    from edgecompress.models.loading import load_model

    loaded = load_model(str(folder))
    path = tmp / "model.onnx"
    res = export_onnx(loaded, path, batch=batch)
    return path, check_onnx(path), f"{res.exporter} exporter, opset {res.opset}, batch {batch}"


def _slim_trace(nodes: list[dict], runs: list[dict]) -> list[dict]:
    """The timed runs' events in Chrome trace format, without ORT's bulky per-node memory stats."""
    keep = ("op_name", "provider", "node_index", "input_type_shape", "output_type_shape")
    return [
        {**{k: e[k] for k in ("cat", "name", "ph", "ts", "dur", "pid", "tid") if k in e},
         "args": {k: v for k, v in e.get("args", {}).items() if k in keep}}
        for e in sorted([*runs, *nodes], key=lambda e: e["ts"])
    ]  # fmt: skip


def _profile_chart(folder: Path, result: dict, top: int = 40) -> str | None:
    rows = result["modules"][:top]
    title = (
        f"ONNX Runtime time per module, median of {result['runs']} runs "
        f"({result['node_ms']:.3f} ms of kernels per run on average, batch {result['batch']})"
    )
    if len(result["modules"]) > top:
        title += f"; top {top} of {len(result['modules'])}"
    return _bar_chart(
        folder / "profile.png",
        [r["module"] for r in rows],
        [("ms in the median run", [r["ms"] for r in rows])],
        title,
    )


def profile_table(result: dict, top: int = 15) -> tuple[list[str], tuple, list[tuple]]:
    """(summary lines, header, rows) for the console: the ``top`` slowest modules."""
    lines = [
        f"ONNX Runtime profile of {result['onnx']}: {result['runs']} runs after {result['warmup_runs']} "
        f"warm-up, inputs {result['inputs']}",
        f"kernels per run: {result['node_ms']:.3f} ms mean ({result['node_ms_median_run']:.3f} median) of "
        f"{result['run_ms']:.3f} ms per run ({100 * result['node_fraction_of_run']:.1f} %); "
        f"unmapped {result['unmapped_ms']:.3f} ms",
    ]
    header = ("module", "ms (median run)", "mean ms", "%", "nodes", "op types (mean ms)")
    rows = [
        (
            r["module"], f"{r['ms']:.4f}", f"{r['mean_ms']:.4f}", f"{r['percent']:.1f}", r["nodes"],
            ", ".join(f"{op} {ms:.3f}" for op, ms in list(r["op_types"].items())[:3]),
        )
        for r in result["modules"][:top]
    ]  # fmt: skip
    return lines, header, rows


