"""`lowbit.run(...)`: load -> quantize -> save / reload -> validate -> profile -> report, per recipe.

Several recipes give a side-by-side table and a size / accuracy plot in one report. A recipe whose
`[validate]` thresholds fail makes the run fail (the CLI exits 3), after the report is written so
the evidence is there to read.

Example:
    >>> res = lowbit.run("minilm", recipes=["int8", "int4"], output="out/minilm")   # doctest: +SKIP
    >>> res["runs"][0]["validation"]["metrics"]["cosine_p1"]                       # doctest: +SKIP
    0.9991
"""

from __future__ import annotations

import copy
import datetime
import time
from pathlib import Path
from typing import Any, Callable

import torch

from . import __version__
from .recipe import Recipe


class ThresholdError(RuntimeError):
    """A recipe's validation threshold failed; the message names it, the value and the worst layers."""


def eval_data(src, n_seqs: int = 16, seq_len: int = 256, n_sentences: int = 128):
    """Evaluation data for the source's task, from the held-out part of the built-in corpus."""
    from .data import builtin_texts, lm_sequences, require_tokenizer, sentences

    if src.kind in ("causal_lm", "embedding"):
        require_tokenizer(src)
    texts = builtin_texts("eval")
    if src.kind == "causal_lm":
        return lm_sequences(src.tokenizer, texts, seq_len=seq_len, n_seqs=n_seqs), f"built-in corpus (eval split), {n_seqs} x {seq_len} tokens"
    if src.kind == "embedding" and src.tokenizer is not None:
        sents = sentences(texts, n_sentences)
        batch = src.tokenizer(sents, padding=True, truncation=True, max_length=128, return_tensors="pt")
        return dict(batch), f"built-in corpus (eval split), {len(sents)} sentences"
    raise ValueError(f"{src.name}: no built-in evaluation data for kind {src.kind!r}; pass data= explicitly")


def fusion_line(prof: dict) -> str:
    """The report line of a profile measured with fused projections: how many groups were joined,
    and which were left apart and why (e.g. a mixed-precision recipe's members of two formats).

    Example:
        >>> fusion_line({"fused": ["a.q_proj+k_proj+v_proj"], "not_fused": {"b.q_proj+k_proj+v_proj": "formats differ"}})
        '   fused 1 group(s); left apart 1, e.g. b.q_proj+k_proj+v_proj: formats differ'
    """
    nf = prof.get("not_fused") or {}
    line = f"   fused {len(prof.get('fused') or [])} group(s)"
    if nf:
        name, why = next(iter(nf.items()))
        line += f"; left apart {len(nf)}, e.g. {name}: {why}"
    return line


def run(source: Any = "smollm2", recipes: list[str] | tuple[str, ...] = ("int8",), output: str | Path | None = None,
        *, data=None, n_seqs: int = 16, seq_len: int = 256, profile_model: bool = True,
        log: Callable[[str], None] = print, progress: bool = True, attention: str | None = None,
        kv_cache: str | None = None, profile_dtype: torch.dtype | None = None,
        profile_fuse: bool = False) -> dict[str, Any]:
    """Run the whole pipeline; returns the report dict (also written as report.json / report.html).

    `attention` ("lowbit") and `kv_cache` ("int8" | "int4") override the recipes' keys of the same
    names: the reloaded model then runs lowbit's attention kernels / a quantized KV cache
    (validation adds the cache's KL, the profile's placement shows where attention ran).
    `profile_dtype` (e.g. torch.bfloat16): the speed measurements, float and quantized, run in that
    dtype (on copies; validation keeps the loaded dtype). `profile_fuse`: both speed measurements run
    with q / k / v and gate / up fused into one matmul each (`lowbit.nn.fuse_projections`).

    Raises `ThresholdError` (after writing the report) when any recipe's thresholds fail.
    """
    from . import package
    from .models import load_source
    from .profile import profile
    from .quantize import quantize
    from .report.html import write_html, write_json
    from .validate import validate

    loaded = [Recipe.load(r) for r in recipes]  # a bad recipe fails before the model loads
    names = [r.name for r in loaded]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # each recipe's package is saved under its name
        raise ValueError(f"recipe name(s) {twice} given more than once: their packages would overwrite each other")
    t0 = time.perf_counter()
    src = load_source(source)
    log(f"1. load     {src.name} ({src.kind}) in {time.perf_counter() - t0:.1f}s")
    for note in src.notes:
        log(f"   note: {note}")
    output = Path(output or f"out/run-{src.name}")
    if data is None:  # before the output folder: a source without a tokenizer leaves nothing behind
        data, data_desc = eval_data(src, n_seqs=n_seqs, seq_len=seq_len)
    else:
        data_desc = "user data"
    output.mkdir(parents=True, exist_ok=True)
    task = {"causal_lm": "causal_lm", "embedding": "embedding"}.get(src.kind, "auto")
    base = src.model
    coverage = _coverage(src, base, data, task)
    flagged = [c for c in coverage if c["flagged"]]
    if flagged:
        log(f"   calibration coverage: {len(flagged)} layer(s) see >1% of evaluation inputs outside the calibration "
            f"range, e.g. {flagged[0]['name']} ({100 * flagged[0]['outside_fraction']:.1f}%)")

    baseline_profile = None
    if profile_model and task == "causal_lm":
        baseline_profile = profile(base, batch_sizes=(1, 4), repeats=3, seq_len=64, decode_tokens=16,
                                   dtype=profile_dtype, fuse=profile_fuse).to_dict()
        log(f"   float model: decode {baseline_profile['decode_tokens_per_s']:.1f} tok/s ({baseline_profile['dtype']})")

    runs = []
    for recipe in loaded:
        t1 = time.perf_counter()
        quant = copy.deepcopy(base)
        calibration = None
        if recipe.needs_calibration or recipe.algorithm.get("name") == "clip":
            from .planning import calibration_batches

            calibration = calibration_batches(src, n_seqs=int(recipe.algorithm.get("samples", 32)),
                                              seq_len=int(recipe.algorithm.get("seq_len", 256)))
        report = quantize(quant, recipe, progress=progress, calibration=calibration)
        log(f"2. quantize {recipe.name}: {len(report.layers)} layers in {time.perf_counter() - t1:.1f}s")
        pkg = package.save(quant, output / recipe.name, force=True, tokenizer=src.tokenizer,
                           config_files=src.config_files, source_root=src.source_path if src.config_files else None)
        del quant
        t1 = time.perf_counter()
        loaded = package.load(pkg)
        pkg_bytes = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file())
        log(f"3. package  {pkg} ({pkg_bytes / 1e6:.1f} MB), reloaded memory-mapped in {time.perf_counter() - t1:.2f}s")
        t1 = time.perf_counter()
        att, kv = attention or recipe.attention, kv_cache or recipe.kv_cache
        if att or kv:
            from .attention import enable

            enable(loaded, attention=att, kv_cache=kv if task == "causal_lm" else None)
            log(f"   attention {att or 'model default'}, KV cache {kv or 'float'}")
        val = validate(base, loaded, data, task=task, thresholds=recipe.validate,
                       kv_caches=(kv,) if kv and task == "causal_lm" else ())
        log(f"4. validate {recipe.name} in {time.perf_counter() - t1:.1f}s: " + _headline(val.metrics))
        if not runs and src.kind == "causal_lm" and src.tokenizer is not None:
            log(f"   sample, float    : {sample(base, src.tokenizer)}")
            log(f"   sample, {recipe.name:<9}: {sample(loaded, src.tokenizer)}")
        prof = None
        if profile_model:
            t1 = time.perf_counter()
            example = None if task == "causal_lm" else {k: v[:1] for k, v in data.items()} if isinstance(data, dict) else data[:1]
            prof = profile(loaded, example=example, task=task, batch_sizes=(1, 4), repeats=3, seq_len=64,
                           decode_tokens=16, dtype=profile_dtype, fuse=profile_fuse).to_dict()
            log(f"5. profile  {recipe.name} in {time.perf_counter() - t1:.1f}s" +
                (f": decode {prof['decode_tokens_per_s']:.1f} tok/s" if prof.get("decode_tokens_per_s") else ""))
            if profile_fuse:
                log(fusion_line(prof))
            if prof.get("attention_placement"):
                log("   attention ran: " + ", ".join(f"{b} in {n} layer(s)" for b, n in prof["attention_placement"].items()))
            if prof.get("fallbacks"):
                log(f"   {len(prof['fallbacks'])} layer(s) ran the reference backend (no fused kernel here), e.g. {prof['fallbacks'][0]}")
        total_w = sum(r["bytes_before"] // 4 for r in report.layers if not r["tied_to"]) or 1
        runs.append({
            "recipe": recipe.name, "package": str(pkg), "package_bytes": pkg_bytes,
            "bits_per_weight": 8 * report.bytes_after / total_w,
            "quantize": report.to_dict(), "validation": val.to_dict(), "profile": prof,
        })
        del loaded

    report = {
        "lowbit_version": __version__, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cuda" if torch.cuda.is_available() else "cpu", "task": task, "data": data_desc,
        "source": {"name": src.name, "kind": src.kind, "sha256": src.source_sha256, "notes": src.notes},
        "baseline": _baseline(runs), "baseline_profile": baseline_profile, "runs": runs, "coverage": coverage,
    }
    write_json(report, output / "report.json")
    write_html(report, output / "report.html")
    log(f"6. report   {output / 'report.json'}, {output / 'report.html'}")
    failures = [f"{r['recipe']}: {f}" for r in runs for f in r["validation"]["failures"]]
    if failures:
        raise ThresholdError("; ".join(failures))
    return report


@torch.no_grad()
def sample(model, tokenizer, prompt: str = "The capital of France is", n: int = 16) -> str:
    """Greedy continuation of `prompt` (for a quick look, not a metric)."""
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return prompt + "|" + tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).replace("\n", " ")


def _coverage(src, base, data, task) -> list[dict[str, Any]]:
    """Calibration coverage of the float model's layers: calibration split vs the evaluation data."""
    from .data import builtin_texts, lm_sequences, sentences
    from .quantize import module_type
    from .validate import _forward, calibration_coverage

    names = [n for n, m in base.named_modules() if module_type(m) in ("Linear", "Conv1D")]
    if task == "causal_lm":
        calib = lm_sequences(src.tokenizer, builtin_texts("calib"), seq_len=data.shape[1], n_seqs=4)
        batches, evals = [calib], [data[i:i + 4] for i in range(0, len(data), 4)]
    elif task == "embedding":
        tok = src.tokenizer(sentences(builtin_texts("calib"), 64), padding=True, truncation=True, max_length=128,
                            return_tensors="pt")
        batches, evals = [dict(tok)], [data]
    else:
        return []
    return calibration_coverage(base, names, batches, evals, lambda m, b: _forward(m, b, task))


def _headline(m: dict[str, float]) -> str:
    if "delta_ppl_pct" in m:
        return (f"ppl {m['ppl_base']:.3f} -> {m['ppl_quant']:.3f} ({m['delta_ppl_pct']:.2f}%), KL mean {m['kl_mean']:.2e} "
                f"p99 {m['kl_p99']:.2e}, top-1 agreement {100 * m['top1_agreement']:.1f}%")
    if "cosine_mean" in m:
        return f"cosine mean {m['cosine_mean']:.5f} p1 {m['cosine_p1']:.5f} min {m['cosine_min']:.5f}"
    return ", ".join(f"{k} {v:.4g}" for k, v in list(m.items())[:4])


def _baseline(runs) -> dict[str, float]:
    m = runs[0]["validation"]["metrics"] if runs else {}
    return {"ppl": m["ppl_base"]} if "ppl_base" in m else {}
