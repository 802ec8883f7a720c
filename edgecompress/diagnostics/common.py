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

import json
import os
import tempfile
from pathlib import Path

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

