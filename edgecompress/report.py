"""Report columns in one place: the console table and report.md of ``compress``, and ``inspect``."""

from __future__ import annotations

LAYER_COLUMNS = ("module", "what", "bits", "sparsity", "shape", "size", "SQNR dB")


def layer_row(r: dict) -> tuple:
    """One per-layer row (:data:`LAYER_COLUMNS`) from a pass record's ``layers`` entry."""
    shape = r.get("shape", "")
    nbytes = r.get("bytes", shape[0] * shape[1] * (r.get("w_bits") or 32) / 8 if shape else None)
    size = "" if nbytes is None else f"{nbytes / 1024:.1f} KiB"
    what = f"{r.get('quantizer', r.get('layer', ''))} {r.get('role', '')}".strip()
    bits = r.get("bits", r.get("w_bits", ""))
    sqnr = r.get("sqnr_db", r.get("weight_sqnr_db", ""))
    return (r["name"], what, "" if bits is None else bits, r.get("sparsity", ""), shape, size, sqnr)


def layer_rows(report: dict) -> list[tuple]:
    """Every pass's per-layer rows, in pass order (each module once: the pass that changed it)."""
    return [layer_row(r) for rec in report["passes"] for r in rec["layers"]]


def summary_rows(report: dict) -> list[tuple[str, str, str]]:
    """(what, baseline, compressed) rows for the console table and report.md."""
    b, c = report["metrics"]["baseline"], report["metrics"]["compressed"]
    rows = []
    for key in ("top1", "top1_agreement", "cosine_mean", "nn_agreement", "perplexity"):
        if key in b or key in c:
            rows.append((key, str(b.get(key, "—")), str(c.get(key, "—"))))
    sb, sc = report["size_bytes"]["baseline"], report["size_bytes"]["compressed"]
    rows.append(("size (MB)", f"{sb / 1e6:.3f}", f"{sc / 1e6:.3f} ({sb / max(sc, 1):.2f}x smaller)"))
    lat = report["latency_ms"]
    rows.append(
        (
            f"PyTorch{' simulation' if lat.get('simulated', True) else ''} b{lat['batch']} (ms, median)",
            str(lat["baseline"]["median_ms"]),
            str(lat["compressed"]["median_ms"]),
        )
    )
    return rows + _deploy_rows(report.get("deploy") or {})


def speedup_text(speedup: float) -> str:
    """``baseline / compressed`` median latency in words: never a slowdown called a speed-up."""
    if speedup >= 1.0:
        return f"{speedup:.2f}x faster"
    return f"{1 / speedup:.2f}x slower: not faster than the float model at this size"


def _deploy_rows(deploy: dict) -> list[tuple[str, str, str]]:
    """Rows for the ``export:`` / ``bench:`` recipe sections (absent when they did not run)."""
    rows = []
    if "bench" in deploy:
        b = deploy["bench"]
        med = {r["target"]: r["latency"]["median_ms"] for r in b["results"]}
        what = f"latency {b['backend']} b{b['batch']} (ms, median)"
        rows.append((what, str(med["baseline"]), f"{med['compressed']} ({speedup_text(b['speedup'])})"))
    if "export" in deploy:
        v = deploy["export"]["verification"]
        fid = (
            f"top-1 agree {v['top1_agreement']}%"
            if "top1_agreement" in v
            else f"cosine min {v['cosine_min']}"
        )
        rows.append(("ONNX export (verified vs PyTorch)", "—", f"{deploy['export']['file']}: {fid}"))
    return rows


def report_markdown(report: dict) -> str:
    lines = [
        f"# edgecompress report: {report['model']}",
        "",
        "| metric | baseline | compressed |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in summary_rows(report)]
    lines += ["", f"Latency: {report['latency_ms']['note']}.", ""]
    lines += [f"**Warning:** {w}" for w in report.get("warnings", [])]
    cal = report.get("calibration")
    if cal and cal.get("data"):
        lines += [
            f"Calibration: {cal['samples_used']} samples of `{cal['data']}` (asked for {cal['samples_requested']})."
        ]
    lines.append("")
    for rec in report["passes"]:
        lines += [f"## pass `{rec['pass']}` ({rec['seconds']} s)", ""]
        lines += [f"- {note}" for note in rec.get("notes", [])]
        lines += _acm_lines(rec.get("info", {}).get("acm"))
        lines += _seer_lines(rec.get("info", {}).get("seer"))
        lines += _profile_lines(rec.get("info", {}).get("profile"))
        lines += ["", "| " + " | ".join(LAYER_COLUMNS) + " |", "|" + "---|" * len(LAYER_COLUMNS)]
        lines += ["| " + " | ".join(map(str, layer_row(r))) + " |" for r in rec["layers"]]
        lines.append("")
    env = report["environment"]
    lines.append(
        f"Environment: torch {env['torch']}, {env['cpu']}, {env['threads']} threads, CUDA: {env['cuda']}."
    )
    return "\n".join(lines) + "\n"


def _acm_lines(acm: dict | None) -> list[str]:
    """The gates' choices per ACM layer on the eval data: share of tokens per k, executed fraction."""
    if not acm:
        return []
    n = max(len(v["k_counts"]) for v in acm["layers"].values())
    head = ["layer"] + [f"k={k}" for k in range(n)] + ["executed"]
    lines = ["", f"Executed fraction of the MLP compute (eval data): {acm['mean_fraction']:.3f}", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, v in acm["layers"].items():
        tokens = max(v["tokens"], 1)
        shares = [f"{100 * c / tokens:.1f}%" for c in v["k_counts"]]
        lines.append("| " + " | ".join([name, *shares, f"{v['fraction']:.3f}"]) + " |")
    return lines


SEER_HEATMAP = "seer_heatmap.png"


def _seer_lines(seer: dict | None) -> list[str]:
    """SeerAttention's kept blocks per layer and head on the eval data, and the gates' held-out KL."""
    if not seer:
        return []
    kl = seer["kl_held_out"]
    lines = [
        "",
        f"Kept attention blocks (eval data): {seer['density']:.3f}; held-out KL(truth ‖ gate) "
        f"{kl['before']} before training, {kl['after']} after.",
        "",
        "| layer | kept | per head |",
        "|---|---|---|",
    ]
    for name, v in seer["layers"].items():
        lines.append(f"| {name} | {v['density']:.3f} | {' '.join(f'{d:.2f}' for d in v['heads'])} |")
    heat = seer.get("heatmap")
    if heat:
        lines += ["", f"![{heat['layer']}: gate vs ground truth]({SEER_HEATMAP})"]
    return lines


def report_figures(report: dict) -> dict[str, bytes]:
    """PNG files that go beside report.md: SeerAttention's gate-vs-target heat map (with matplotlib)."""
    for rec in report["passes"]:
        heat = rec.get("info", {}).get("seer", {}).get("heatmap")
        if heat:
            png = seer_heatmap_png(heat)
            return {} if png is None else {SEER_HEATMAP: png}
    return {}


def seer_heatmap_png(heat: dict, title: str = "") -> bytes | None:
    """A heat map of one layer's gate distribution (left) and its target (right) over (query, key)
    blocks; None without matplotlib."""
    import io

    try:
        from matplotlib.figure import Figure  # the object API: no pyplot, no global backend change
    except ImportError:
        return None
    fig = Figure(figsize=(9, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    top = max(max(map(max, heat["gate"])), max(map(max, heat["truth"])), 1e-9)
    for ax, key, label in ((axes[0], "gate", "AttnGate"), (axes[1], "truth", "ground truth (pooled max)")):
        im = ax.imshow(heat[key], cmap="viridis", vmin=0.0, vmax=top)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
    fig.colorbar(im, ax=list(axes), shrink=0.8)
    fig.suptitle(title or f"{heat['layer']}: block scores, mean over heads", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _profile_lines(profile: dict | None) -> list[str]:
    """Seconds per calibration step and per unit (the ViT PTQ passes' ``profile``), busiest first."""
    if not profile:
        return []
    steps = ", ".join(f"{k} {v} s" for k, v in sorted(profile["seconds"].items(), key=lambda kv: -kv[1]))
    where = (
        f"{profile['processes']} process(es) × {profile['threads']} thread(s), {profile['scoring']} scoring"
    )
    lines = ["", f"Calibration seconds ({where}): {steps}.", "", "| unit | rank | seconds |", "|---|---|---|"]
    for u in sorted(profile["units"], key=lambda u: -sum(u["seconds"].values())):
        secs = ", ".join(f"{k} {v}" for k, v in u["seconds"].items())
        lines.append(f"| {u['unit']} | {u['rank']} | {secs} |")
    return lines
