"""Rich terminal tables for quantization reports and package inspection."""

from __future__ import annotations

from typing import Any


def _console(console):
    if console is None:
        from rich.console import Console

        console = Console()
    return console


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def print_quant_report(report, console=None, max_rows: int = 40) -> None:
    """Per-layer table (worst SQNR first when there are more rows than `max_rows`)."""
    from rich.table import Table

    console = _console(console)
    rows: list[dict[str, Any]] = list(report.layers)
    title = f"lowbit quantize · recipe {report.recipe} · {len(rows)} layers quantized, {len(report.skipped)} kept float"
    if len(rows) > max_rows:
        rows = sorted(rows, key=lambda r: r["sqnr_db"])[:max_rows]
        title += f" · showing the {max_rows} lowest SQNR"
    t = Table(title=title, title_justify="left")
    wide = console.width >= 120  # narrow terminals get the essential columns only
    cols = [("layer", "left"), ("shape", "right"), ("format", "left"), ("bits/w", "right"), ("before", "right"),
            ("after", "right"), ("SQNR dB", "right"), ("max |w|", "right")]
    if not wide:
        cols = [c for c in cols if c[0] not in ("shape", "before", "max |w|")]
    for col, justify in cols:
        t.add_column(col, justify=justify, no_wrap=True)
    for r in rows:
        cells = {"layer": r["name"] + (f" = {r['tied_to']}" if r.get("tied_to") else ""),
                 "shape": "x".join(map(str, r["shape"])), "format": r["format"], "bits/w": f"{r['bits_per_weight']:.3f}",
                 "before": human_bytes(r["bytes_before"]), "after": human_bytes(r["bytes_after"]),
                 "SQNR dB": f"{r['sqnr_db']:.1f}", "max |w|": f"{r['max_abs']:.3g}"}
        t.add_row(*(cells[c] for c, _ in cols))
    console.print(t)
    if report.skipped:
        s = Table(title="kept in float", title_justify="left")
        s.add_column("layer")
        s.add_column("shape", justify="right")
        s.add_column("reason")
        for r in report.skipped[:max_rows]:
            s.add_row(r["name"], "x".join(map(str, r["shape"])), r["reason"])
        console.print(s)
    before, after = report.bytes_before, report.bytes_after
    ratio = after / before if before else 0.0
    console.print(f"quantized weights: {human_bytes(before)} -> {human_bytes(after)} ({ratio:.3f}x)")
