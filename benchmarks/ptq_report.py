"""The report side of ``benchmarks/ptq.py``: table, summary (speed-ups, drift, calibration-draw noise,
profile breakdown) and the merge of several results files. Output unchanged by the split."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

KEYS = ("top1", "top1_agreement", "logit_sqnr_db", "cosine_mean", "nn_agreement", "calib_s", "calib_cpu_s")
METRICS = ("top1", "logit_sqnr_db", "cosine_mean", "nn_agreement")


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


def summary(rows: list[dict]) -> list[dict]:
    """Per (model, method, bits): before/after time ratios per thread count, the 2-process speed-up
    over 1 process × 1 thread, metric drift (after − before; ``_noise``: the spread between two runs
    of one code where there are two), the calibration-draw noise (:func:`calib_noise`) and where the
    time goes (:func:`profile_breakdown`)."""
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
        entry.update(_drift(pick))
        entry.update(_max_tokens(mine, one))
        entry.update(calib_noise(mine, one))
        prof = next((r for r in (two, one) if r and r.get("profile_units")), None)
        if prof:
            entry["profile_breakdown"] = {
                "row": f"{prof['threads']}x{prof['processes']}",
                **profile_breakdown(prof),
            }
        out.append(entry)
    return out


def _drift(pick: dict) -> dict:
    entry = {}
    for m in METRICS:
        vals = {c: [r[m] for r in pick.values() if r["code"] == c and m in r] for c in ("before", "after")}
        if vals["before"] and vals["after"]:
            entry[f"{m}_drift"] = round(vals["after"][0] - vals["before"][0], 4)
            if max(len(v) for v in vals.values()) > 1:  # a spread needs two runs of one code
                entry[f"{m}_noise"] = round(max(max(v) - min(v) for v in vals.values()), 4)
    return entry


def _max_tokens(mine: list[dict], one: dict | None) -> dict:
    """The opt-in token subsample against all tokens (same code, 1 thread)."""
    sub = next((r for r in mine if r.get("max_tokens")), None)
    if not (sub and one):
        return {}
    entry = {"max_tokens": sub["max_tokens"], "max_tokens_speedup": round(one["calib_s"] / sub["calib_s"], 2)}
    for m in METRICS:
        if m in sub and m in one:
            entry[f"max_tokens_{m}_delta"] = round(sub[m] - one[m], 4)
    return entry


def calib_noise(mine: list[dict], one: dict | None) -> dict:
    """The run-to-run noise of a calibration draw (same code): the metrics of the default
    calibration (train samples 0 … 31, 1 process) and of each ``--calib-offset`` draw (1 process or
    torchrun: the two give identical results, tests/quantize/test_vit_ptq_ddp.py); per metric the values,
    their spread (max − min) and sample standard deviation, and each draw minus the default."""
    offs = sorted(
        (r for r in mine if r.get("calib_offset") and r["code"] == "after" and not r.get("max_tokens")),
        key=lambda r: r["calib_offset"],
    )
    if not (offs and one):
        return {}
    entry: dict = {"calib_offsets": [0] + [r["calib_offset"] for r in offs]}
    for m in METRICS:
        vals = [one.get(m)] + [r.get(m) for r in offs]
        if any(v is None for v in vals):
            continue
        entry[f"calib_draws_{m}"] = vals
        entry[f"calib_draws_{m}_spread"] = round(max(vals) - min(vals), 4)
        entry[f"calib_draws_{m}_std"] = round(statistics.stdev(vals), 4)
        entry[f"calib_offset_{m}_deltas"] = [round(v - vals[0], 4) for v in vals[1:]]
    return entry


def _layer(unit: str) -> str:
    """A unit's layer kind: the last part of its name (``qkv``, ``proj``, ``fc1``, ``fc2``; attention → ``attn``)."""
    last = unit.rsplit(".", 1)[-1]
    return "attn" if last.endswith("attn") else last


def profile_breakdown(row: dict) -> dict:
    """Where a row's calibration time goes: seconds per search summed over units (and ranks), its
    share of the total, and per layer kind × search."""
    per_search: dict[str, float] = {}
    per_layer: dict[str, dict[str, float]] = {}
    for u in row["profile_units"]:
        layer = per_layer.setdefault(_layer(u["unit"]), {})
        for k, v in u["seconds"].items():
            per_search[k] = per_search.get(k, 0.0) + v
            layer[k] = layer.get(k, 0.0) + v
    total = sum(per_search.values()) + sum(
        (row.get("profile") or {}).get(k, 0.0) for k in ("capture", "exchange")
    )
    return {
        "total_s": round(total, 1),
        "search_s": {k: round(v, 1) for k, v in sorted(per_search.items(), key=lambda kv: -kv[1])},
        "search_share": {
            k: round(v / total, 3) for k, v in sorted(per_search.items(), key=lambda kv: -kv[1])
        },
        "layer_search_s": {n: {k: round(v, 1) for k, v in d.items()} for n, d in sorted(per_layer.items())},
    }


def merge(paths: list[Path], out: Path, notes: list[str]) -> None:
    """One results file from several runs of ``ptq.py`` (each run's meta kept, rows tagged with it)."""
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
