"""`lowbit plan`: sensitivity analysis, then an automatic mixed-precision recipe, re-validated.

    plan = auto_plan("smollm2", ["int8", "int4-e8m0", "int2-e8m0", "lut4"], target_bits=4.5)
    plan.recipe           # an ordinary recipe dict ([names] layer -> format); plan.toml on disk
    plan.validation       # measured on held-out data after quantizing with that recipe

Budgets: `target_bits` (bits/weight over the planned Linear layers, least predicted loss), or an
accuracy budget (`max_delta_ppl` in percent for language models, `min_cosine_p1` for embedding
models): the smallest plan whose *measured* validation passes (algorithms/mixed.py).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass
class PlanResult:
    recipe: dict[str, Any]
    rows: list[dict[str, Any]]
    bits_per_weight: float
    validation: dict[str, Any]
    probes: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def calibration_batches(src, n_seqs: int = 32, seq_len: int = 256, batch: int = 4, n_sentences: int = 128):
    """Calibration inputs from the built-in corpus's calibration split (disjoint from evaluation)."""
    from .data import builtin_texts, lm_sequences, require_tokenizer, sentences

    if src.kind in ("causal_lm", "embedding"):
        require_tokenizer(src)
    texts = builtin_texts("calib")
    if src.kind == "causal_lm":
        ids = lm_sequences(src.tokenizer, texts, seq_len=seq_len, n_seqs=n_seqs)
        return [{"input_ids": ids[i:i + batch]} for i in range(0, len(ids), batch)]
    if src.kind == "embedding" and src.tokenizer is not None:
        sents = sentences(texts, n_sentences)
        out = []
        for i in range(0, len(sents), 32):
            tok = src.tokenizer(sents[i:i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
            out.append(dict(tok))
        return out
    raise ValueError(f"{src.name}: no built-in calibration data for kind {src.kind!r}")


def _label(c: Any) -> str:
    from .algorithms.sensitivity import _name

    return _name(c)


def auto_plan(source: Any, candidates: list[Any], *, target_bits: float | None = None, max_delta_ppl: float | None = None,
              min_cosine_p1: float | None = None, base: dict[str, Any] | None = None, algorithm: str = "rtn",
              sens_batches: int = 2, layers: list[str] | None = None, output: str | Path | None = None, log: Callable[[str], None] = print,
              progress: bool = True) -> PlanResult:
    """Sensitivity table -> plan -> recipe -> quantize -> validate (see module doc).

    `base`: recipe keys kept as is (e.g. {"types": {"Embedding": {"format": "int8", "block_size": 32}}});
    the plan adds a [names] entry per Linear layer. `algorithm` quantizes the final (and probe) models.
    """
    from .algorithms.mixed import plan_bits, plan_for_bits, plan_for_budget, predicted, to_recipe
    from .algorithms.sensitivity import plot, sensitivity, write_table
    from .models import load_source
    from .pipeline import eval_data
    from .quantize import quantize
    from .validate import validate

    budgets = [b for b in (target_bits, max_delta_ppl, min_cosine_p1) if b is not None]
    if len(budgets) != 1:
        raise ValueError("give exactly one budget: target_bits, max_delta_ppl (language models) or min_cosine_p1 (embeddings)")
    t0 = time.perf_counter()
    src = load_source(source) if not hasattr(source, "model") else source
    task = {"causal_lm": "causal_lm", "embedding": "embedding"}.get(src.kind)
    if task is None:
        raise ValueError(f"{src.name}: planning needs a causal LM or an embedding model, not {src.kind!r}")
    if max_delta_ppl is not None and task != "causal_lm":
        raise ValueError("max_delta_ppl applies to language models; use min_cosine_p1 for embedding models")
    if min_cosine_p1 is not None and task != "embedding":
        raise ValueError("min_cosine_p1 applies to embedding models; use max_delta_ppl for language models")
    base_model = src.model
    calib = calibration_batches(src)
    data, _ = eval_data(src)
    cands = {_label(c): c for c in candidates}
    base = copy.deepcopy(base or {"types": {"Embedding": {"format": "int8", "block_size": 32}}})
    base.setdefault("algorithm", {"name": algorithm})
    # the sensitivity pass pads a last partial block (hidden sizes that are not a multiple of the
    # block); the recipe does the same, so the plan quantizes what was measured
    base.setdefault("divisibility", "pad")
    seconds = {}

    t1 = time.perf_counter()
    rows = sensitivity(base_model, list(candidates), calib[:sens_batches], task=task, layers=layers, progress=progress)
    seconds["sensitivity"] = time.perf_counter() - t1
    log(f"sensitivity: {len(rows)} (layer, format) pairs in {seconds['sensitivity']:.0f}s")
    if output is not None:
        out = Path(output)
        stem = out.with_suffix("")
        write_table(rows, stem.with_name(stem.name + "-sensitivity.csv"))
        plot(rows, stem.with_name(stem.name + "-sensitivity.png"), "KL" if task == "causal_lm" else "1 - cosine")

    def measure(plan: dict[str, str]) -> tuple[Any, dict[str, Any]]:
        recipe = to_recipe(plan, cands, base=base)
        model = copy.deepcopy(base_model)
        quantize(model, recipe, calibration=calib, progress=False)
        return validate(base_model, model, data, task=task), recipe

    probes: list[dict[str, Any]] = []
    t1 = time.perf_counter()
    if target_bits is not None:
        plan = plan_for_bits(rows, target_bits)
    else:
        def passes(plan):
            val, _ = measure(plan)
            m = val.metrics
            return m["delta_ppl_pct"] <= max_delta_ppl if max_delta_ppl is not None else m["cosine_p1"] >= min_cosine_p1
        plan, probes = plan_for_budget(rows, passes, log=log)
    val, recipe = measure(plan)
    seconds["plan_and_validate"] = time.perf_counter() - t1
    bits = plan_bits(rows, plan)
    budget = {"target_bits": target_bits, "max_delta_ppl": max_delta_ppl, "min_cosine_p1": min_cosine_p1}
    recipe["description"] = (f"lowbit plan for {src.name}: candidates {', '.join(cands)}; budget "
                             + ", ".join(f"{k}={v}" for k, v in budget.items() if v is not None)
                             + f"; {bits:.3f} bits/weight over the planned Linear layers; predicted score {predicted(rows, plan):.4g}")
    recipe["validate"] = {k: v for k, v in {"max_delta_ppl": max_delta_ppl, "min_cosine_p1": min_cosine_p1}.items() if v is not None}
    seconds["total"] = time.perf_counter() - t0
    result = PlanResult(recipe=recipe, rows=rows, bits_per_weight=bits, validation=val.to_dict(), probes=probes, seconds=seconds)
    if output is not None:
        from .algorithms.mixed import dump_toml

        out = Path(output)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(dump_toml(recipe))
        tmp.replace(out)
    return result
