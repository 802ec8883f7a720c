"""``inspect --sensitivity``: one quantizer group at a time, ranked by the metric drop."""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgecompress.diagnostics.common import (
    ADAPTER,
    DEFAULT_SAMPLES,
    ROOT,
    TEXT_BATCH,
    _bar_chart,
    _read_recipe,
    _write_outputs,
    check_folder,
)  # noqa: F401  # fmt: skip
from edgecompress.errors import UserError

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


