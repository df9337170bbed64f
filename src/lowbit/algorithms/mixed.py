"""Automatic mixed precision: choose one candidate format per layer from a sensitivity table.

Scores of single-layer quantization add up to first order, so a plan's predicted loss is the sum
of its layers' scores. For a Lagrange multiplier lam each layer independently takes the format
minimising  score + lam * bits;  lam = 0 gives the most accurate candidate everywhere, a large lam
the smallest. `plan_for_bits` bisects lam to the largest predicted accuracy whose size meets a
bits-per-weight target; `plan_for_budget` bisects lam on *measured* results: each probe quantizes
the model, validates it on held-out data and keeps the smallest plan that passes (the prediction
only orders the probes, the decision is measured).

Example:
    >>> rows = [{"layer": "a", "format": "int8", "bits_per_weight": 8.0, "params": 100, "score": 0.001},
    ...         {"layer": "a", "format": "int4", "bits_per_weight": 4.5, "params": 100, "score": 0.02},
    ...         {"layer": "b", "format": "int8", "bits_per_weight": 8.0, "params": 100, "score": 0.001},
    ...         {"layer": "b", "format": "int4", "bits_per_weight": 4.5, "params": 100, "score": 0.5}]
    >>> plan_for_bits(rows, 6.25)
    {'a': 'int4', 'b': 'int8'}
"""

from __future__ import annotations

from typing import Any, Callable


def _by_layer(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["layer"], []).append(r)
    return out


def choose(rows: list[dict[str, Any]], lam: float) -> dict[str, str]:
    """Per layer, the format minimising score + lam * bits_per_weight (ties: fewer bits)."""
    return {layer: min(opts, key=lambda r: (r["score"] + lam * r["bits_per_weight"], r["bits_per_weight"]))["format"]
            for layer, opts in _by_layer(rows).items()}


def plan_bits(rows: list[dict[str, Any]], plan: dict[str, str]) -> float:
    """Parameter-weighted bits per weight of a plan over the layers in `rows`."""
    total = bits = 0.0
    for layer, opts in _by_layer(rows).items():
        r = next(o for o in opts if o["format"] == plan[layer])
        total += r["params"]
        bits += r["params"] * r["bits_per_weight"]
    return bits / max(total, 1)


def predicted(rows: list[dict[str, Any]], plan: dict[str, str]) -> float:
    """Sum of the chosen (layer, format) scores: the first-order predicted loss of the plan."""
    return sum(next(o for o in opts if o["format"] == plan[layer])["score"] for layer, opts in _by_layer(rows).items())


def _lams(rows: list[dict[str, Any]]) -> list[float]:
    """Every lam at which some layer's choice changes, sorted (the breakpoints of the plan)."""
    out = {0.0}
    for opts in _by_layer(rows).values():
        for a in opts:
            for b in opts:
                db = a["bits_per_weight"] - b["bits_per_weight"]
                if db > 0 and b["score"] > a["score"]:
                    out.add((b["score"] - a["score"]) / db)
    return sorted(out)


def plan_for_bits(rows: list[dict[str, Any]], target_bits: float) -> dict[str, str]:
    """The least-predicted-loss plan on the lam path whose bits/weight <= target_bits; then any
    spare bits go to the layers with the best score drop per extra bit."""
    lams = _lams(rows)
    best = None
    for lam in lams + [lams[-1] * 2 + 1.0]:
        plan = choose(rows, lam * (1 + 1e-9))
        if plan_bits(rows, plan) <= target_bits + 1e-9:
            best = plan
            break
    if best is None:
        smallest = {layer: min(opts, key=lambda r: r["bits_per_weight"])["format"] for layer, opts in _by_layer(rows).items()}
        if plan_bits(rows, smallest) > target_bits + 1e-9:
            raise ValueError(f"target {target_bits} bits/weight is below the smallest candidate plan "
                             f"({plan_bits(rows, smallest):.3f}); add a smaller candidate format")
        best = smallest
    return _fill(rows, best, target_bits)


def _fill(rows, plan, target_bits):
    """Greedy upgrades while the target allows: largest score drop per added bit first."""
    by = _by_layer(rows)
    total = sum(opts[0]["params"] for opts in by.values())
    while True:
        cur_bits = plan_bits(rows, plan)
        best, gain = None, 0.0
        for layer, opts in by.items():
            cur = next(o for o in opts if o["format"] == plan[layer])
            for o in opts:
                extra = (o["bits_per_weight"] - cur["bits_per_weight"]) * o["params"] / total
                if extra > 0 and cur_bits + extra <= target_bits + 1e-9 and o["score"] < cur["score"]:
                    g = (cur["score"] - o["score"]) / extra
                    if g > gain:
                        best, gain = (layer, o["format"]), g
        if best is None:
            return plan
        plan = {**plan, best[0]: best[1]}


def plan_for_budget(rows: list[dict[str, Any]], passes: Callable[[dict[str, str]], bool], *, max_probes: int = 7,
                    log: Callable[[str], None] = lambda s: None) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """The smallest plan on the lam path that `passes` (a measured check: quantize + validate).

    Bisects over the lam breakpoints (bigger lam = smaller plan); `passes` is called at most
    `max_probes` times. Returns (plan, probes); raises ValueError when even the most accurate
    plan fails the budget.
    """
    lams = _lams(rows)
    plans, seen = [], set()
    for lam in lams + [lams[-1] * 2 + 1.0]:
        p = choose(rows, lam * (1 + 1e-9))
        key = tuple(sorted(p.items()))
        if key not in seen:
            seen.add(key)
            plans.append(p)
    probes: list[dict[str, Any]] = []

    def check(i: int) -> bool:
        ok = passes(plans[i])
        probes.append({"index": i, "bits_per_weight": plan_bits(rows, plans[i]), "predicted": predicted(rows, plans[i]), "passed": ok})
        log(f"   probe {len(probes)}: {plan_bits(rows, plans[i]):.3f} bits/weight -> {'pass' if ok else 'fail'}")
        return ok

    lo, hi = 0, len(plans) - 1  # plans[lo] is the most accurate
    if not check(lo):
        raise ValueError("even the most accurate candidate plan fails the accuracy budget; add a more precise "
                         "candidate (e.g. int8) or relax the budget")
    best = lo
    while lo < hi and len(probes) < max_probes:
        mid = (lo + hi + 1) // 2
        if check(mid):
            best, lo = mid, mid
        else:
            hi = mid - 1
    return plans[best], probes


def to_recipe(plan: dict[str, str], candidates: dict[str, Any], *, name: str = "auto-mixed", base: dict[str, Any] | None = None,
              description: str = "") -> dict[str, Any]:
    """An ordinary recipe dict: [names] layer -> format config (from `candidates[label]`)."""
    recipe = dict(base or {})
    recipe["name"] = name
    if description:
        recipe["description"] = description
    names = dict(recipe.get("names", {}))
    for layer, label in sorted(plan.items()):
        names[layer] = candidates[label]
    recipe["names"] = names
    return recipe


def dump_toml(recipe: dict[str, Any]) -> str:
    """TOML text for a recipe dict (tables for global/types/names/algorithm/validate)."""
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{key(k)} = {val(x)}" for k, x in v.items()) + " }"
        if v is None:
            return '"none"'
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    def key(k):
        return k if k.replace("_", "").replace("-", "").isalnum() else val(str(k))

    lines = []
    tables = {}
    for k, v in recipe.items():
        if isinstance(v, dict) and k in ("types", "names", "algorithm", "validate", "global"):
            tables[k] = v
        else:
            lines.append(f"{key(k)} = {val(v)}")
    for t, body in tables.items():
        if t == "global" and isinstance(body, dict):
            lines.append(f"\n[global]")
            lines += [f"{key(k)} = {val(v)}" for k, v in body.items()]
            continue
        simple = {k: v for k, v in body.items() if not (isinstance(v, dict) and t == "algorithm")}
        lines.append(f"\n[{t}]")
        lines += [f"{key(k)} = {val(v)}" for k, v in simple.items()]
        for k, v in body.items():
            if isinstance(v, dict) and t == "algorithm":
                lines.append(f"\n[{t}.{key(k)}]")
                lines += [f"{key(a)} = {val(b)}" for a, b in v.items()]
    return "\n".join(lines) + "\n"
