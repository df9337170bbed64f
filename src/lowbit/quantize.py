"""`lowbit.quantize(model, recipe)`: swap a model's layers for quantized ones, in place.

All checks run before any work: recipe keys, name patterns against the model's layers, and
divisibility under the recipe's policy (every offending layer is listed at once). Then each
layer is quantized (progress bar), measured (weight SQNR, max-abs, bytes) and swapped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .formats import NonFiniteError, QTensor, quantize_tensor
from .nn import QuantEmbedding, QuantLinear
from .recipe import Recipe, RecipeError, name_matches


@dataclass
class QuantReport:
    """What `quantize` did, per layer. `layers` rows: name, type, shape, format, bits_per_weight,
    bytes_before, bytes_after, sqnr_db, max_abs, tied_to. `skipped` rows: name, type, shape, reason."""

    recipe: str
    layers: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)

    @property
    def bytes_before(self) -> int:
        return sum(r["bytes_before"] for r in self.layers if not r["tied_to"])

    @property
    def bytes_after(self) -> int:
        return sum(r["bytes_after"] for r in self.layers if not r["tied_to"])

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "layers": self.layers, "skipped": self.skipped,
                "bytes_before": self.bytes_before, "bytes_after": self.bytes_after}

    def print(self, console=None, max_rows: int = 40) -> None:
        """A rich table per layer (the worst SQNR first when long), then the skipped layers."""
        from .report.terminal import print_quant_report

        print_quant_report(self, console=console, max_rows=max_rows)


def module_type(module: nn.Module) -> str | None:
    """The recipe type name of a module lowbit can quantize, else None. Subclasses of `nn.Linear` /
    `nn.Embedding` count only where their forward computes what the base one does (checked on a few
    inputs; for embeddings the lookup times a constant counts too: `embedding_scale`): the quantized
    module replaces the forward, so a subclass with another (OPT's learned positions take position
    ids, Llama-4's router returns a tuple) would lose it.

    Example:
        >>> module_type(nn.Linear(4, 4)), module_type(nn.Embedding(4, 4)), module_type(nn.ReLU())
        ('Linear', 'Embedding', None)
    """
    if isinstance(module, nn.Linear):
        return "Linear" if _computes_linear(module) else None
    if isinstance(module, nn.Embedding):
        return "Embedding" if embedding_scale(module) is not None else None
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 style Conv1D
        return "Conv1D"
    return None


def _computes_linear(module: nn.Linear) -> bool:
    """Whether the layer's forward is `nn.Linear`'s, or a subclass's that computes the same x W^T + b
    (Falcon's FalconLinear), checked on a few random rows; a router returning a tuple, a head that
    rescales its logits and the like are not."""
    if type(module).forward is nn.Linear.forward:
        return True
    w, b = module.weight, module.bias
    if w.is_meta or w.numel() == 0:
        return False
    try:
        x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
        with torch.no_grad():
            out = module(x)
            ref = torch.nn.functional.linear(x, w, b)
        return isinstance(out, torch.Tensor) and out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-3,
                                                                                            atol=1e-5)
    except (TypeError, ValueError, RuntimeError):  # a forward that takes other inputs
        return False


def embedding_scale(module: nn.Embedding) -> float | None:
    """1.0 for an embedding whose forward is `nn.Embedding`'s; s for a subclass whose forward is the
    lookup times a constant `embed_scale` s (Gemma's scaled word embeddings: sqrt(hidden)), checked
    on a few rows; None for any other forward (lowbit leaves such a module in float).

    Example:
        >>> embedding_scale(nn.Embedding(8, 4))
        1.0
    """
    if type(module).forward is nn.Embedding.forward:
        return 1.0
    scale = getattr(module, "embed_scale", None)
    w = module.weight
    if scale is None or w.is_meta or w.shape[0] == 0:
        return None
    try:
        s = float(scale)
        ids = torch.arange(min(8, w.shape[0]), device=w.device)
        with torch.no_grad():
            same = torch.equal(module(ids), torch.nn.functional.embedding(ids, w) * torch.tensor(s, dtype=w.dtype,
                                                                                               device=w.device))
    except (TypeError, ValueError, RuntimeError):  # a forward that takes other inputs, a tensor scale per row, ...
        return None
    return s if same else None


def _weights_left_float(model: nn.Module, weight_threshold: int) -> list[dict]:
    """`skipped` rows for weights no recipe can reach, so a report never hides them: linear /
    embedding subclasses with their own forward (a quantized layer would not reproduce it), and
    matrices or larger (>= 2 dims, >= `weight_threshold` values) held by other module types, e.g.
    mixture-of-experts layers keeping all experts in one 3-D Parameter (Mixtral, Qwen3-MoE in
    transformers 5), convolutions."""
    rows, seen = [], set()
    for name, mod in model.named_modules():
        kind = type(mod).__name__
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            if module_type(mod) is None:
                rows.append({"name": name, "type": kind, "shape": list(mod.weight.shape),
                             "reason": f"{kind} has its own forward, which a quantized layer would not reproduce: "
                                       "kept in float"})
            continue
        if module_type(mod) is not None:
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if p.dim() >= 2 and p.numel() >= max(1, weight_threshold) and id(p) not in seen:
                seen.add(id(p))
                rows.append({"name": f"{name}.{pname}" if name else pname, "type": kind, "shape": list(p.shape),
                             "reason": f"a {p.dim()}-D weight of {kind}, a module type lowbit does not quantize "
                                       "yet: kept in float"})
    return rows


def _edge_prefixes(model: nn.Module, n_edge: int) -> list[str]:
    """Name prefixes of the first and last `n_edge` blocks of every numbered ModuleList of blocks:
    lists inside a block (T5's `block.3.layer`, a block's sublayers) are not stacks of blocks, or
    every block would count as an edge."""
    if n_edge <= 0:
        return []
    prefixes = []
    for name, mod in model.named_modules():
        if any(part.isdigit() for part in name.split(".")):  # inside an item of an outer list
            continue
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            idx = list(range(len(mod)))
            for i in sorted(set(idx[:n_edge] + idx[-n_edge:])):
                prefixes.append(f"{name}.{i}." if name else f"{i}.")
    return prefixes


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """10 log10(signal power / noise power); inf when exact."""
    noise = (w - w_hat).double().pow(2).sum().item()
    signal = w.double().pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def quantize(model: nn.Module, recipe: "str | dict | Recipe" = "int8", *, progress: bool = True,
             calibration: list[dict[str, torch.Tensor]] | None = None,
             state_dir: "str | None" = None) -> QuantReport:
    """Quantize `model` in place with `recipe`; returns the per-layer `QuantReport`.

    Args:
        model: any `nn.Module` (Hugging Face models included). `nn.Linear`, `nn.Embedding` and
            transformers' `Conv1D` are swapped for `QuantLinear` / `QuantEmbedding`.
        recipe: a built-in name (`lowbit recipes`), a TOML path, a dict or a `Recipe`.
        progress: show a progress bar.
        calibration: model inputs (a list of dicts such as {"input_ids": ...}) for calibration-aware
            algorithms (recipe `[algorithm]`: gptq, awq, awq+gptq, kmeans; clip uses them when given).
            Layers inside the model's blocks are then quantized block by block (algorithms/calibrate.py).
        state_dir: with calibration, write resumable state here after every block; an interrupted
            run called again with the same arguments resumes after the last finished block.

    Example:
        >>> import torch, lowbit
        >>> model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
        >>> report = lowbit.quantize(model, {"global": "int4", "weight_threshold": 4096}, progress=False)
        >>> [r["name"] for r in report.layers], report.skipped[0]["reason"]
        (['0'], '2048 weights < weight_threshold 4096')
    """
    from .nn.fused import first_fused

    fused = first_fused(model)
    if fused is not None:  # the joined layer has a name no recipe rule knows, and its members would keep the old one
        raise ValueError(f"layer {fused!r} is fused with its siblings (lowbit.nn.fuse_projections): quantize the "
                         "separate layers, then fuse; call lowbit.nn.unfuse_projections(model) first")
    recipe = Recipe.load(recipe)
    candidates = [(n, m, t) for n, m in model.named_modules() if (t := module_type(m))]
    recipe.check_names(n for n, _, _ in candidates)
    edges = _edge_prefixes(model, recipe.edge_blocks)
    report = QuantReport(recipe=recipe.name)
    report.skipped += _weights_left_float(model, recipe.weight_threshold)

    # 1. plan every layer before touching any
    plan, problems, owner_of = [], [], {}
    for name, mod, mtype in candidates:
        w = mod.weight
        shape = tuple(w.shape) if mtype != "Conv1D" else tuple(w.shape[::-1])
        row = {"name": name, "type": mtype, "shape": list(shape)}
        if id(w) in owner_of:  # tied: quantized once with the first owner's planes
            owner = owner_of[id(w)]
            named = [p for p in recipe.names if name_matches(p, name)]
            if named and recipe.config_for(name, mtype) is None and recipe.config_for(owner, mtype) is not None:
                # one weight cannot be float for one of its users and quantized for the other
                raise RecipeError(f"recipe {recipe.name!r}: names.{named[0]!r} keeps {name} float, but {name} shares "
                                  f"its weight with {owner} (tied embeddings), which the recipe quantizes; give "
                                  f"{owner} 'none' too (both stay float), or untie the weights before quantizing")
            plan.append((name, mod, mtype, None, False, owner))
            continue
        owner_of[id(w)] = name
        fmt = recipe.config_for(name, mtype, edge=any(name.startswith(p) for p in edges))
        if fmt is None:
            report.skipped.append(row | {"reason": "kept in float by the recipe"})
            continue
        if w.numel() < recipe.weight_threshold:
            report.skipped.append(row | {"reason": f"{w.numel()} weights < weight_threshold {recipe.weight_threshold}"})
            continue
        block = None if fmt.family == "lut" else fmt.block_size
        cols = math.prod(shape[1:])
        pad = False
        if block and cols % block:
            if recipe.divisibility == "error":
                problems.append(f"{name} {shape} ({fmt.name}, block {block})")
                continue
            if recipe.divisibility == "skip":
                report.skipped.append(row | {"reason": f"input dim {cols} not divisible by block {block} (divisibility='skip')"})
                continue
            pad = True
        if fmt.family == "lut" and fmt.group_size and shape[0] % fmt.group_size:
            problems.append(f"{name} {shape}: {shape[0]} rows not divisible by group_size {fmt.group_size}")
            continue
        plan.append((name, mod, mtype, fmt, pad, None))
    if problems:
        raise RecipeError(
            f"recipe {recipe.name!r}: {len(problems)} layer(s) do not divide into the format's blocks or LUT groups: "
            + "; ".join(problems[:12]) + (" ..." if len(problems) > 12 else "")
            + ". Fix: for blocks set divisibility = 'pad' (zero-pad the last block) or 'skip' (keep them float); "
            "for LUT groups choose a group_size dividing the rows; or give these layers their own config in [names]"
        )

    # 2. calibration-aware algorithms: block by block on the calibration data
    from .algorithms.layer import NEEDS_DATA, quantize_weight

    algos = {p[0]: recipe.algorithm_for(p[0]) for p in plan if p[3] is not None}
    pre: dict[str, QTensor] = {}
    notes: dict[str, str] = {}
    wants = {n for n, a in algos.items() if a in NEEDS_DATA or (a == "clip" and calibration is not None)}
    if wants and calibration is None and any(algos[n] in NEEDS_DATA for n in wants):
        raise RecipeError(
            f"recipe {recipe.name!r}: algorithm {sorted({algos[n] for n in wants} & NEEDS_DATA)} needs calibration data; "
            "pass calibration=[{'input_ids': ...}, ...] to lowbit.quantize (the lowbit CLI uses the built-in corpus), "
            "or choose algorithm 'rtn' / 'clip' (data-free)")
    if wants and calibration is not None:
        from .algorithms.calibrate import calibrate

        cplan = {name: (fmt, pad) for name, mod, mtype, fmt, pad, tied in plan
                 if name in wants and tied is None and mtype in ("Linear", "Conv1D")}
        res = calibrate(model, cplan, list(calibration), recipe.algorithm_for, recipe.algorithm,
                        state_dir=state_dir, progress=progress)
        pre, notes = res.qtensors, res.notes

    # 3. quantize and swap
    done: dict[str, tuple[QTensor, nn.Module]] = {}
    iterator = plan
    if progress:
        from rich.progress import track

        iterator = track(plan, description=f"quantizing ({recipe.name})", transient=True)
    for name, mod, mtype, fmt, pad, tied_to in iterator:
        if tied_to is not None:
            if tied_to not in done:  # the owner was skipped: this one stays float too
                report.skipped.append({"name": name, "type": mtype, "shape": list(mod.weight.shape),
                                       "reason": f"tied to {tied_to}, which stays float"})
                continue
            qt = done[tied_to][0]
            _swap(model, name, _build(mod, mtype, qt, name))
            owner = next(r for r in report.layers if r["name"] == tied_to)
            report.layers.append(owner | {"name": name, "type": mtype, "tied_to": tied_to})
            continue
        w = mod.weight.detach()
        w2 = w.t() if mtype == "Conv1D" else w
        alg = algos.get(name, "rtn")
        try:
            if name in pre:
                qt = pre[name]
            elif alg in NEEDS_DATA or alg == "clip":  # outside the calibrated blocks: data-free clip search
                qt = quantize_weight(w2, fmt, "clip", None, pad=pad, name=name)
                notes[name] = f"{alg} needs calibrated inputs; outside the blocks: clip (data-free)" if alg != "clip" else "clip (data-free)"
            else:
                qt = quantize_tensor(w2, fmt, pad=pad, name=name)
        except NonFiniteError:
            if recipe.nan_policy == "keep":
                report.skipped.append({"name": name, "type": mtype, "shape": list(w2.shape),
                                       "reason": "NaN/Inf in the weight (nan_policy='keep')"})
                continue
            raise
        w_hat = qt.dequantize()
        report.layers.append({
            "name": name, "type": mtype, "shape": list(w2.shape), "format": fmt.name,
            "bits_per_weight": round(qt.bits_per_weight, 4),
            "bytes_before": w.numel() * w.element_size(), "bytes_after": qt.nbytes,
            "sqnr_db": round(sqnr_db(w2.float(), w_hat), 2), "max_abs": float(w2.abs().max()) if w2.numel() else 0.0,
            "tied_to": None, "algorithm": notes.get(name, alg),
        })
        new = _build(mod, mtype, qt, name)
        _swap(model, name, new)
        done[name] = (qt, new)
    info = getattr(model, "_lowbit_info", {}) or {}
    info.update({"recipe": recipe.to_dict(), "report": report.to_dict()})
    model._lowbit_info = info
    return report


def _build(mod: nn.Module, mtype: str, qt: QTensor, name: str) -> nn.Module:
    if mtype == "Embedding":
        scale = embedding_scale(mod)
        new = QuantEmbedding(qt, padding_idx=mod.padding_idx, dtype=mod.weight.dtype,
                             embed_scale=None if scale == 1.0 else scale)
    else:
        new = QuantLinear(qt, mod.bias)
    new._lowbit_name = name
    return new


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
