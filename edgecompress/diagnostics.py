"""Per-layer diagnostics of a compressed folder: which layer cost the accuracy, which one the time.

``edgecompress inspect DIR --sensitivity`` (:func:`sensitivity`), in the manner of AIMET's
QuantAnalyzer per-layer analysis: the folder's quantizers are grouped by layer (a quantized
Linear or Embedding = its weight and input quantizers; an attention adapter's q/k/v/probs
quantizers = one group named after the attention module). With *every* quantizer bypassed
(identity) the model is the **float** reference; then each group alone is switched back on and
the model kind's fidelity is measured on the recipe's eval data: image classifiers top-1 (when
the data has labels) and the cosine of the logits to the float model's, encoders the cosine of
the mean-pooled embeddings to the float model's, causal LMs perplexity. Layers are ranked by the
drop from the float value; the all-enabled value (the folder's model as it is) is reported too.

A folder stores a quantized weight as integer codes, so its float weight is gone. Where the base
model (``structure.json``'s ``base.spec``) can be rebuilt and its weight quantizes to exactly the
stored values, that weight is the float one and is used while the quantizer is bypassed; elsewhere
(a pass changed the weight, the base model is not available) the layer keeps its quantized weight,
which the group's row and a warning say (its weight quantizer's share cannot be isolated then).

``edgecompress inspect DIR --profile`` (:func:`profile`): ``DIR/model.onnx`` (or a static-batch
export to a temporary file) is run in ONNX Runtime with the session settings of
:func:`edgecompress.export.runtime.ort_session` plus profiling; every kernel event of the timed
runs is attributed to a module path. ORT fuses and renames nodes, so each node of the optimized
graph (saved with ``optimized_model_filepath``) is mapped back to a node of the exported graph,
whose ``pkg.torch.onnx.name_scopes`` metadata names the module: by name, by a fused name
(``<node>/<Fusion>``), by an output tensor an original node produced, or, for nodes ORT created
(e.g. a ``QuantizeLinear`` it moved), by the module of the neighbouring nodes (consumers first).
The rest is the row ``(unmapped)``: no time is dropped.

Both write ``DIR/<name>.json`` (always) and ``DIR/<name>.png`` (with matplotlib) atomically and
update a "Diagnostics" section at the end of ``DIR/report.md`` (:func:`update_report`).
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgecompress.errors import UserError

SCOPE_KEY = "pkg.torch.onnx.name_scopes"
ADAPTER = "ec_attn"  # :data:`edgecompress.models.attention.ADAPTER`
CHAIN_NAMES = ("weight_chain", "input_chain")
DEFAULT_SAMPLES = {"image": 128, "encoder": 64, "causal_lm": 32}  # MiniLM's 43 groups: ~2 min on 2 cores
TEXT_BATCH = 16
UNMAPPED = "(unmapped)"
ROOT = "(model)"  # ops outside every submodule (e.g. adding the position embedding)
MPL_HINT = "pip install matplotlib"
SECTION_START = "<!-- edgecompress diagnostics: start -->"
SECTION_END = "<!-- edgecompress diagnostics: end -->"


# --------------------------------------------------------------------------- files


def check_folder(folder: str | Path) -> Path:
    """``folder`` as a Path if it is a compressed folder (has ``structure.json``), else a UserError."""
    folder = Path(folder)
    if not (folder / "structure.json").is_file():
        raise UserError(f"{folder} is not an edgecompress output folder (no structure.json)")
    return folder


def write_atomic(path: Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _write_json(path: Path, obj: dict) -> Path:
    return write_atomic(path, json.dumps(obj, indent=1) + "\n")


def _bar_chart(
    path: Path, labels: list[str], series: list[tuple[str, list[float]]], title: str
) -> str | None:
    """A horizontal bar chart (one panel per series, largest first at the top) written atomically
    to ``path``; None when written, else the one-line reason (matplotlib missing)."""
    try:
        from matplotlib.figure import Figure  # the object API: no pyplot, no global backend change
    except ImportError:
        path.unlink(missing_ok=True)  # a chart from an earlier run would no longer match the JSON
        return f"{path.name} not written: the chart needs matplotlib ({MPL_HINT})"
    height = 1.4 + 0.2 * len(labels)
    fig = Figure(figsize=(3.0 + 4.0 * len(series), height), layout="constrained")
    axes = fig.subplots(1, len(series), sharey=True, squeeze=False)[0]
    ys = list(range(len(labels)))
    for ax, (xlabel, values) in zip(axes, series):
        ax.barh(ys, values, color="#4c72b0")
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ys, labels, fontsize=7)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return None


def _read_recipe(folder: Path) -> dict:
    import yaml

    path = folder / "recipe.yaml"
    if not path.is_file():
        return {}
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path} is not readable YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(recipe, dict):
        raise UserError(f"{path} is not a recipe (a mapping)")
    return recipe


# --------------------------------------------------------------------------- quantizer groups


class _Bypass(nn.Identity):
    """What stands in a quantizer's place while it is disabled (a slot element of no kind)."""

    SLOT_KIND = "bypassed"


def _group_of(model: nn.Module, path: str) -> str:
    """The layer a quantizer at ``path`` belongs to: the owner of its chain; for an attention
    adapter's slots, the attention module that holds the adapter."""
    from edgecompress.models.attention import AttentionAdapter
    from edgecompress.models.slots import Chain

    owner = path.rpartition(".")[0]
    if owner and isinstance(model.get_submodule(owner), Chain):
        owner = owner.rpartition(".")[0]
    if owner and isinstance(model.get_submodule(owner), AttentionAdapter):
        owner = owner.rpartition(".")[0]
    return owner or ROOT


def quantizer_groups(model: nn.Module) -> dict[str, list[dict]]:
    """Group name → its quantizers (``path``, ``parent``, ``child``, ``module``, ``role``), in module order."""
    groups: dict[str, list[dict]] = {}
    found: list[str] = []
    for path, mod in model.named_modules():
        if getattr(mod, "SLOT_KIND", None) != "quantizer" or any(path.startswith(p + ".") for p in found):
            continue
        found.append(path)
        parent, _, child = path.rpartition(".")
        chain = model.get_submodule(parent) if parent else model
        role = getattr(mod, "role", "") or getattr(chain, "role", "")
        groups.setdefault(_group_of(model, path), []).append(
            {"path": path, "parent": chain, "child": child, "module": mod, "role": role}
        )
    return groups


def _group_kind(model: nn.Module, name: str) -> str:
    from edgecompress.models.slots import SlotLinear

    mod = model if name == ROOT else model.get_submodule(name)
    if isinstance(mod, SlotLinear):
        return "linear"
    if isinstance(getattr(mod, ADAPTER, None), nn.Module):
        return "attention"
    if isinstance(mod, nn.Embedding):
        return "embedding"
    return type(mod).__name__


def _enable_only(groups: dict[str, list[dict]], enabled: set[str]) -> None:
    """Put each quantizer of the groups in ``enabled`` in its slot, a bypass in every other's."""
    for name, qs in groups.items():
        for q in qs:
            q["parent"]._modules[q["child"]] = (
                q["module"] if name in enabled else q.setdefault("bypass", _Bypass())
            )


def _base_model(loaded):
    """(the uncompressed base model this folder came from, or None; a note when it cannot be loaded)."""
    from edgecompress.models.loading import load_model

    spec = (loaded.base or {}).get("spec")
    if not spec or spec == loaded.spec:
        return None, None
    try:
        return load_model(spec), None
    except UserError as e:
        return None, f"base model {spec} not available ({e})"


def _float_weights(loaded, groups: dict[str, list[dict]], base) -> tuple[dict[str, str], list[str]]:
    """Give every layer whose weight the folder stores only quantized (as integer codes) its float
    weight back, from the ``base`` model, where that weight quantizes to exactly the stored values.

    Returns group → where its float weight comes from (``stored``: the folder holds it in float;
    ``base model``; ``quantized``: not recoverable) and the notes to print.
    """
    owners = {}
    for name, qs in groups.items():
        owner = loaded.model if name == ROOT else loaded.model.get_submodule(name)
        chain = getattr(owner, "weight_chain", None)
        if chain is not None and any(q["parent"] is chain for q in qs):
            owners[name] = owner
    source = dict.fromkeys(owners, "stored")
    coded = {n: m for n, m in owners.items() if getattr(m, "saved_sqnr_db", None) is not None}
    base_state = base.model.state_dict() if base is not None and coded else {}
    for name, mod in coded.items():
        w = base_state.get(f"{name}.weight")
        source[name] = "quantized"
        if w is None or w.shape != mod.weight.shape:
            continue
        with torch.no_grad():
            w = w.to(mod.weight.dtype)
            if torch.equal(mod.weight_chain(w), mod.weight_chain(mod.weight)):
                mod.weight.copy_(w)
                source[name] = "base model"
    lost = [n for n, s in source.items() if s == "quantized"]
    notes = []
    if lost:
        notes.append(
            f"{len(lost)} layer(s) keep their quantized weight when bypassed (the folder stores codes and "
            f"no base-model weight quantizes to them), e.g. {lost[0]}: their weight quantizer's "
            "share of the drop is not measured"
        )
    return source, notes


# --------------------------------------------------------------------------- metrics


@torch.no_grad()
def _outputs(loaded, model: nn.Module, data) -> list[torch.Tensor]:
    """Logits (image), pooled normalized embeddings (encoder), or per-batch (nll sum, tokens) (causal LM)."""
    from edgecompress.data.metrics import outputs

    if loaded.kind != "causal_lm":
        return outputs(loaded, model, data)
    res = []
    for b in data.batches:
        lg = loaded.call(model, b).float()
        ids, mask = b["input_ids"][:, 1:], b["attention_mask"][:, 1:].bool()
        loss = F.cross_entropy(lg[:, :-1].transpose(1, 2), ids, reduction="none")
        res.append(torch.tensor([float(loss[mask].sum()), float(mask.sum())], dtype=torch.float64))
    return res


def _fidelity(kind: str, outs: list[torch.Tensor], ref: list[torch.Tensor], labels) -> dict:
    """The model kind's metrics of ``outs`` against the float model's ``ref`` (and the labels)."""
    if kind == "causal_lm":
        tot = torch.stack(outs).sum(0)
        return {"perplexity": round(math.exp(float(tot[0]) / max(float(tot[1]), 1.0)), 5)}
    cat, rc = torch.cat(outs).double(), torch.cat(ref).double()
    m = {}
    if kind == "image":
        pred = cat.argmax(-1)
        if labels is not None:
            m["top1"] = round(float((pred == labels).double().mean()) * 100, 4)
        m["top1_agreement"] = round(float((pred == rc.argmax(-1)).double().mean()) * 100, 4)
    cos = F.cosine_similarity(cat, rc, dim=-1)  # encoders: of the mean-pooled embeddings, as `eval`
    return {**m, "cosine": round(float(cos.mean()), 8), "cosine_min": round(float(cos.min()), 8)}


def _metric_keys(kind: str, has_labels: bool) -> tuple[str, str | None]:
    """(primary, secondary) metric names; the ranking sorts by the primary drop, then the secondary."""
    if kind == "causal_lm":
        return "perplexity", None
    if kind == "image" and has_labels:
        return "top1", "cosine"
    return "cosine", None


def _drop(key: str, ref: float, value: float) -> float:
    """How much worse ``value`` is than ``ref`` (perplexity: higher is worse)."""
    return round((value - ref) if key == "perplexity" else (ref - value), 8)


# --------------------------------------------------------------------------- sensitivity


def sensitivity(
    folder: str | Path, data: str | None = None, samples: int | None = None, write: bool = True
) -> dict:
    """Per-layer quantization sensitivity of a compressed folder (see the module docstring).

    ``data`` / ``samples`` override the saved recipe's ``eval:`` section; ``samples=None`` takes the
    recipe's count capped at :data:`DEFAULT_SAMPLES` (0 = all). Writes ``sensitivity.json``,
    ``sensitivity.png`` and the report section unless ``write=False``; the result has ``notes``.
    """
    from edgecompress.data.specs import load_data
    from edgecompress.models.loading import load_model
    from edgecompress.progress import Progress

    folder = check_folder(folder)
    t0 = time.perf_counter()
    ev = _read_recipe(folder).get("eval")
    ev = ev if isinstance(ev, dict) else {}
    loaded = load_model(str(folder))
    groups = quantizer_groups(loaded.model)
    if not groups:
        raise UserError(
            f"{folder}: the model has no quantizers, so there is no quantization sensitivity to measure"
        )
    if samples is None:
        cap = DEFAULT_SAMPLES.get(loaded.kind, 64)
        saved = int(ev.get("samples") or 0)
        samples = min(saved, cap) if saved else cap
    if samples < 0:
        raise UserError(f"--samples {samples}: must be ≥ 0 (0 = all)")
    batch_size = int(ev.get("batch_size") or 32)
    if loaded.kind != "image":  # texts are padded to the longest of their batch: small batches pad less
        batch_size = min(batch_size, TEXT_BATCH)
    batches = load_data(data or ev.get("data"), loaded, "test", samples, batch_size)
    base, note = _base_model(loaded)
    source, notes = _float_weights(loaded, groups, base)
    notes = [note, *notes] if note else notes
    model = loaded.model.eval()
    has_labels = loaded.kind == "image" and batches.labels is not None
    primary, secondary = _metric_keys(loaded.kind, has_labels)
    try:
        _enable_only(groups, set())
        ref = _outputs(loaded, model, batches)  # the float reference, computed once
        float_m = _fidelity(loaded.kind, ref, ref, batches.labels)
        progress = Progress("sensitivity", len(groups))
        rows = []
        for name, qs in groups.items():
            _enable_only(groups, {name})
            m = _fidelity(loaded.kind, _outputs(loaded, model, batches), ref, batches.labels)
            row = {
                "group": name,
                "kind": _group_kind(model, name),
                "quantizers": [_quantizer_info(q) for q in qs],
                **m,
                f"{primary}_drop": _drop(primary, float_m[primary], m[primary]),
            }
            if secondary:
                row[f"{secondary}_drop"] = _drop(secondary, float_m[secondary], m[secondary])
            if name in source:
                row["float_weight"] = source[name]
            rows.append(row)
            progress.step(name)
        _enable_only(groups, set(groups))
        all_m = _fidelity(loaded.kind, _outputs(loaded, model, batches), ref, batches.labels)
    finally:
        _enable_only(groups, set(groups))  # the model as loaded, whatever happened
    all_m[f"{primary}_drop"] = _drop(primary, float_m[primary], all_m[primary])
    if secondary:
        all_m[f"{secondary}_drop"] = _drop(secondary, float_m[secondary], all_m[secondary])
    vs_base = None
    if base is not None and loaded.kind != "causal_lm":  # how close the float reference is to the base model
        vs_base = {
            "spec": base.spec,
            **_fidelity(loaded.kind, _outputs(base, base.model, batches), ref, None),
        }
    rows.sort(key=lambda r: (-r[f"{primary}_drop"], -(r.get(f"{secondary}_drop") or 0.0), r["group"]))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    result = {
        "method": "per-layer quantization sensitivity (AIMET QuantAnalyzer style): every quantizer bypassed "
        "(identity) = float; then one group of quantizers enabled at a time; drop = float − group "
        "(perplexity: group − float)",
        "folder": str(folder),
        "model": loaded.base.get("spec", loaded.spec),
        "model_kind": loaded.kind,
        "data": batches.spec,
        "split": "test",
        "samples": batches.count,
        "metric": primary,
        "sorted_by": [f"{primary}_drop"] + ([f"{secondary}_drop"] if secondary else []),
        "reference": "the float model: this folder's model with every quantizer bypassed"
        + (
            ", float weights restored from the base model where they quantize to the stored ones"
            if "base model" in source.values()
            else ""
        ),
        "float_weights": dict(Counter(source.values())),
        "float": float_m,
        "float_vs_base_model": vs_base,
        "all_enabled": all_m,
        "groups_count": len(rows),
        "quantizers_count": sum(len(qs) for qs in groups.values()),
        "groups": rows,
        "notes": notes,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if write:
        _write_outputs(folder, "sensitivity", result, _sensitivity_chart)
    return result


def _quantizer_info(q: dict) -> dict:
    mod = q["module"]
    return {
        "path": q["path"],
        "role": q["role"],
        "class": type(mod).__name__,
        "bits": getattr(mod, "bits", None),
    }


def _sensitivity_chart(folder: Path, result: dict) -> str | None:
    rows = result["groups"]
    keys = result["sorted_by"]
    series = [(_axis_label(k), [r[k] for r in rows]) for k in keys]
    title = f"per-layer sensitivity: {result['model']} ({result['samples']} samples of {result['data']})"
    return _bar_chart(folder / "sensitivity.png", [r["group"] for r in rows], series, title)


def _axis_label(key: str) -> str:
    return {
        "top1_drop": "top-1 drop (points) with only this group quantized",
        "cosine_drop": "1 − cosine to float, only this group quantized",
        "perplexity_drop": "perplexity increase, only this group quantized",
    }.get(key, key)


def sensitivity_table(result: dict, top: int = 15) -> tuple[list[str], tuple, list[tuple]]:
    """(summary lines, header, rows) for the console: the ``top`` most sensitive groups."""
    keys = [k for k in ("top1", "cosine", "perplexity") if k in result["float"]]
    fmt = lambda m: "  ".join(f"{k} {m[k]}" for k in keys)  # noqa: E731
    lines = [
        f"sensitivity of {result['groups_count']} layer groups ({result['quantizers_count']} quantizers), "
        f"{result['samples']} samples of {result['data']}, ranked by {' then '.join(result['sorted_by'])}",
        f"float (every quantizer bypassed): {fmt(result['float'])}",
        f"all enabled (the folder's model): {fmt(result['all_enabled'])}",
    ]
    header = ("rank", "group", "kind", "quantizers", *keys, *result["sorted_by"])
    rows = [
        (
            r["rank"],
            r["group"],
            r["kind"],
            len(r["quantizers"]),
            *(r[k] for k in keys),
            *(r[k] for k in result["sorted_by"]),
        )
        for r in result["groups"][:top]
    ]
    return lines, header, rows


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


# --------------------------------------------------------------------------- report


def _write_outputs(folder: Path, name: str, result: dict, chart) -> None:
    _write_json(folder / f"{name}.json", result)
    why = chart(folder, result)
    if why:
        result["notes"].append(why)
    update_report(folder)


def _summary(name: str, data: dict) -> str:
    if name == "sensitivity":
        g = data.get("groups") or []
        keys = data.get("sorted_by") or []
        if not g or not keys:
            return ""
        top = ", ".join(f"`{r['group']}` ({', '.join(f'{k} {r[k]:.3g}' for k in keys)})" for r in g[:3])
        m = data.get("metric")
        return (
            f"{data.get('samples')} samples of `{data.get('data')}`; {m}: float {data['float'].get(m)}, "
            f"all enabled {data['all_enabled'].get(m)}; most sensitive: {top}"
        )
    mods = [r for r in data.get("modules") or [] if r["module"] != UNMAPPED]
    top = ", ".join(f"`{r['module']}` ({r['ms']:.3f} ms)" for r in mods[:3])
    return (
        f"{data.get('node_ms', 0):.3f} ms of ONNX Runtime kernels per run (batch {data.get('batch')}, "
        f"unmapped {data.get('unmapped_ms', 0):.3f} ms); slowest: {top}"
    )


def update_report(folder: str | Path) -> Path:
    """Add or replace the "Diagnostics" section of ``folder/report.md`` (between two HTML comments,
    at the end of the file when it is new), listing the diagnostics files present."""
    folder = Path(folder)
    titles = {"sensitivity": "Per-layer quantization sensitivity", "profile": "ONNX Runtime time per module"}
    lines = [SECTION_START, "## Diagnostics", ""]
    for name, title in titles.items():
        js = folder / f"{name}.json"
        try:
            data = json.loads(js.read_text())
        except (OSError, ValueError):
            continue
        extra = (
            f" ([trace]({data['trace']}))"
            if name == "profile" and (folder / data.get("trace", "-")).is_file()
            else ""
        )
        lines.append(f"- **{title}**: [{name}.json]({name}.json){extra} — {_summary(name, data)}")
        png = folder / f"{name}.png"
        lines += [
            "",
            f"  ![{title}]({name}.png)" if png.is_file() else f"  (no chart: {MPL_HINT}, then rerun)",
            "",
        ]
    lines.append(SECTION_END)
    block = "\n".join(lines)
    path = folder / "report.md"
    text = path.read_text() if path.is_file() else ""
    start, end = text.find(SECTION_START), text.find(SECTION_END)
    if start >= 0 and end > start:
        text = text[:start] + block + text[end + len(SECTION_END) :]
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block + "\n"
    return write_atomic(path, text)
