"""Rich terminal tables for quantization reports and package inspection."""

from __future__ import annotations

from typing import Any


def _console(console):
    if console is None:
        from rich.console import Console

        console = Console()
    return console


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


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
    for col, justify in [("layer", "left"), ("shape", "right"), ("format", "left"), ("bits/w", "right"),
                         ("before", "right"), ("after", "right"), ("SQNR dB", "right"), ("max |w|", "right")]:
        t.add_column(col, justify=justify, no_wrap=(col == "layer"))
    for r in rows:
        t.add_row(r["name"] + (f" (tied to {r['tied_to']})" if r.get("tied_to") else ""), "x".join(map(str, r["shape"])),
                  r["format"], f"{r['bits_per_weight']:.3f}", human_bytes(r["bytes_before"]),
                  human_bytes(r["bytes_after"]), f"{r['sqnr_db']:.1f}", f"{r['max_abs']:.3g}")
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
