"""Self-contained `report.html` (plots inlined as PNG data URIs) and schema-versioned `report.json`."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any

REPORT_SCHEMA_VERSION = 1


def _json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_json(report: dict[str, Any], path: Path) -> Path:
    """Atomic write of the report dict (non-finite floats become strings, JSON stays strict)."""
    data = {"schema_version": REPORT_SCHEMA_VERSION, **report}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(_json_safe(data), indent=1))
    os.replace(tmp, path)
    return path


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _plots(report: dict[str, Any]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    out = []
    # per-layer output SQNR bars (first recipe; worst 40 layers)
    for run in runs[:2]:
        layers = sorted(run["validation"]["layers"], key=lambda r: r["output_sqnr_db"])[:40]
        if layers:
            fig, ax = plt.subplots(figsize=(9, max(3, 0.22 * len(layers))))
            ax.barh([r["name"] for r in layers][::-1], [min(r["output_sqnr_db"], 99) for r in layers][::-1], color="#4a7ab5")
            ax.set_xlabel("output SQNR (dB), lower is worse")
            ax.set_title(f"{run['recipe']}: per-layer output SQNR (worst {len(layers)})")
            ax.tick_params(axis="y", labelsize=7)
            out.append((f"Per-layer SQNR — {run['recipe']}", _png(fig)))
    # per-sample error histogram with p95 / p99 lines
    for run in runs[:2]:
        v = run["validation"]
        key = "kl" if "kl" in v["samples"] else ("cosine" if "cosine" in v["samples"] else next(iter(v["samples"]), None))
        if key:
            vals = v["samples"][key]
            fig, ax = plt.subplots(figsize=(7, 3.2))
            ax.hist(vals, bins=60, color="#7a9a4a", log=True)
            m = v["metrics"]
            marks = [("p95", m.get(f"{key}_p95")), ("p99", m.get(f"{key}_p99"))] if key != "cosine" else \
                [("p5", m.get("cosine_p5")), ("p1", m.get("cosine_p1"))]
            for label, x in marks:
                if x is not None:
                    ax.axvline(x, color="#b54a4a", ls="--")
                    ax.text(x, ax.get_ylim()[1] * 0.5, f" {label}", color="#b54a4a")
            ax.set_xlabel({"kl": "per-token KL(base || quant)", "cosine": "per-sample cosine(base, quant)"}.get(key, key))
            ax.set_title(f"{run['recipe']}: per-sample distribution")
            out.append((f"Per-sample error — {run['recipe']}", _png(fig)))
    # latency vs batch size
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for name, prof in [("float", report.get("baseline_profile"))] + [(r["recipe"], r.get("profile")) for r in runs]:
        if prof and prof.get("latency"):
            ax.plot([p["batch_size"] for p in prof["latency"]], [p["p50_ms"] for p in prof["latency"]], marker="o", label=name)
    ax.set_xlabel("batch size")
    ax.set_ylabel("p50 latency (ms)")
    ax.set_xscale("log", base=2)
    ax.legend()
    ax.set_title("latency vs batch size")
    out.append(("Latency vs batch size", _png(fig)))
    # size vs accuracy (Pareto)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    acc_key, acc_label = _accuracy_axis(runs)
    for r in runs:
        x = r["package_bytes"] / 1e6
        y = r["validation"]["metrics"].get(acc_key, float("nan"))
        ax.scatter([x], [y], s=40)
        ax.annotate(r["recipe"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("package size (MB)")
    ax.set_ylabel(acc_label)
    ax.set_title("size vs accuracy")
    out.append(("Size vs accuracy", _png(fig)))
    return out


def _accuracy_axis(runs) -> tuple[str, str]:
    m = runs[0]["validation"]["metrics"] if runs else {}
    if "kl_mean" in m:
        return "kl_mean", "mean per-token KL (lower is better)"
    if "cosine_p1" in m:
        return "cosine_p1", "cosine p1 (higher is better)"
    return "sqnr_db", "output SQNR dB"


def _coverage_html(report: dict[str, Any]) -> str:
    cov = report.get("coverage") or []
    if not cov:
        return ""
    flagged = sorted((c for c in cov if c["flagged"]), key=lambda c: -c["outside_fraction"])
    head = (f"<h2>Calibration coverage</h2><p>{len(cov)} layers checked: fraction of evaluation inputs outside the "
            f"range seen on the calibration split; {len(flagged)} above 1%.</p>")
    if not flagged:
        return head
    rows = "".join(f"<tr><td>{html.escape(c['name'])}</td><td>{100 * c['outside_fraction']:.2f}%</td></tr>" for c in flagged[:20])
    return head + f"<table><tr><th>layer</th><th>outside</th></tr>{rows}</table>"


def write_html(report: dict[str, Any], path: Path) -> Path:
    """A single HTML file with the summary table, failures and plots inlined."""
    esc = html.escape
    rows = []
    metric_keys = [k for k in ("ppl_quant", "delta_ppl_pct", "kl_mean", "kl_p99", "top1_agreement", "cosine_mean",
                               "cosine_p1", "retrieval_top5_overlap", "sqnr_db")
                   if any(k in r["validation"]["metrics"] for r in report["runs"])]
    head = ["recipe", "bits/w", "package MB"] + metric_keys + ["decode tok/s", "result"]
    for r in report["runs"]:
        m = r["validation"]["metrics"]
        prof = r.get("profile") or {}
        cells = [r["recipe"], f"{r['bits_per_weight']:.2f}", f"{r['package_bytes'] / 1e6:.1f}"]
        cells += [f"{m[k]:.4g}" if k in m else "" for k in metric_keys]
        cells += [f"{prof['decode_tokens_per_s']:.1f}" if prof.get("decode_tokens_per_s") else "",
                  "pass" if r["validation"]["passed"] else "FAIL"]
        rows.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    failures = [f"<li><b>{esc(r['recipe'])}</b>: {esc(f)}</li>" for r in report["runs"] for f in r["validation"]["failures"]]
    plots = "".join(f"<figure><figcaption>{esc(t)}</figcaption><img alt='{esc(t)}' src='{src}'></figure>" for t, src in _plots(report))
    base = report.get("baseline", {})
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>lowbit report — {esc(report['source']['name'])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
figure{{margin:1.5em 0}}figcaption{{font-weight:600;margin-bottom:.4em}}img{{max-width:100%}}
.fail{{color:#b00}}</style></head><body>
<h1>lowbit report: {esc(report['source']['name'])}</h1>
<p>lowbit {esc(report['lowbit_version'])} · {esc(report['created'])} · device {esc(report['device'])} ·
task {esc(report['task'])} · evaluation data: {esc(report['data'])}</p>
<p>float baseline: {esc(json.dumps(_json_safe(base)))}</p>
<h2>Summary</h2><table><tr>{''.join(f'<th>{esc(h)}</th>' for h in head)}</tr>{''.join(rows)}</table>
{'<h2 class=fail>Threshold failures</h2><ul>' + ''.join(failures) + '</ul>' if failures else ''}
{_coverage_html(report)}
<h2>Plots</h2>{plots}
</body></html>"""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(doc)
    os.replace(tmp, path)
    return path
