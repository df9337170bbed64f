"""Sequential calibration: quantize a transformer block by block on the activations it really sees.

    inputs_0 = what the model feeds its first block (captured once, with the block's kwargs:
               rotary tables, masks, ...)
    for each block i:
        1. run the float block on inputs_i, collecting per linear the inputs' second moment
           H = E[x x^T] (GPTQ, clip and k-means importance) and a sample of inputs (AWQ)
        2. AWQ (if asked): search per-channel scales, fold them into the producing op
        3. quantize each planned linear of the block with its algorithm
        4. run the block again with the quantized weights: its outputs are inputs_{i+1}
        5. write the state (planes so far, folded tensors, inputs_{i+1}) atomically, if a state
           directory is given, so an interrupted run resumes after the last finished block

Only one block's activations (the inputs for all calibration batches, plus one layer's
statistics at a time) are held in memory. Layers outside the blocks (embeddings, lm_head, pooler)
get round-to-nearest by the caller.

Example:
    >>> # used through lowbit.quantize(model, {"global": "int4", "algorithm": {"name": "gptq"}},
    >>> #                               calibration=batches)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..formats import QTensor
from ..formats.format import Format
from . import awq as awq_mod
from .layer import quantize_weight


class _Stop(Exception):
    pass


@dataclass
class LayerStats:
    """Calibration statistics of one linear layer's input."""
    hessian: torch.Tensor  # (K, K) = E[x x^T]
    sample: torch.Tensor   # (<= n_sample, K) input rows kept for AWQ
    tokens: int = 0

    @property
    def importance(self) -> torch.Tensor:
        return torch.diagonal(self.hessian).clone()


@dataclass
class CalibrationResult:
    qtensors: dict[str, QTensor] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # layer -> what the algorithm did
    resumed_from: int = 0


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of repeated blocks: the ModuleList holding the most parameters."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 1 and len({type(m) for m in mod}) == 1:
            n = sum(p.numel() for p in mod.parameters())
            if best is None or n > best[2]:
                best = (name, mod, n)
    if best is None:
        raise ValueError("calibration: found no stack of repeated blocks (nn.ModuleList) in the model; "
                         "use algorithm 'rtn' or 'clip' (data-free) for this model")
    return best[0], best[1]


def _weight(mod: nn.Module) -> torch.Tensor:
    w = mod.weight.detach()
    return w.t() if type(mod).__name__ == "Conv1D" else w


def _set_weight(mod: nn.Module, w: torch.Tensor) -> None:
    mod.weight.data = (w.t() if type(mod).__name__ == "Conv1D" else w).to(mod.weight.dtype).contiguous()


def _capture_inputs(model: nn.Module, block: nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[tuple[tuple, dict]]:
    """(args, kwargs) the model passes to `block`, per calibration batch."""
    captured = []

    def hook(_mod, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**batch, use_cache=False) if _accepts_use_cache(model) else model(**batch)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise RuntimeError("calibration: the model never reached its first block for some batch")
    return captured


def _accepts_use_cache(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return cfg is not None and hasattr(cfg, "use_cache")


def _run_block(block: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[torch.Tensor]:
    outs = []
    for args, kwargs in inputs:
        y = block(*args, **kwargs)
        outs.append(y[0] if isinstance(y, (tuple, list)) else y)
    return outs


def _with_hidden(inputs: list[tuple[tuple, dict]], hidden: list[torch.Tensor]) -> list[tuple[tuple, dict]]:
    out = []
    for (args, kwargs), h in zip(inputs, hidden):
        if args:
            out.append(((h,) + tuple(args[1:]), kwargs))
        else:
            out.append(((), {**kwargs, "hidden_states": h}))
    return out


def _collect_stats(block: nn.Module, names: dict[str, nn.Module], inputs, n_sample: int) -> tuple[dict[str, LayerStats], dict[str, tuple]]:
    """Per layer: input statistics, and a label of the input tensor(s) it read: layers reading
    the same tensor in every batch (like q/k/v) get equal labels and so may share a Hessian.

    A tensor is recognised by its address (plus shape, strides, dtype), and every input seen in a
    batch is kept alive until that batch's forward ends: otherwise a freed input's address can be
    reused by a later, different input of the same forward (the post-attention norm's output at
    the input norm's old address), which stacked gate/up with q/k/v under q's Hessian whenever
    the allocator happened to reuse it -- a result that depended on the heap's history."""
    acc: dict[str, list] = {}
    seen: dict[str, list[tuple]] = {}  # this batch: layer -> its inputs' keys, in call order
    alive: list[torch.Tensor] = []     # this batch's inputs: no address is reused while they live
    labels: dict[str, list] = {}
    handles = []

    def make(name):
        def hook(_mod, args):
            inp = args[0]
            alive.append(inp)
            key = ((inp.device, inp.data_ptr(), inp.dtype, tuple(inp.shape), inp.stride()) if inp.numel()
                   else (name, len(alive)))  # empty tensors may all report address 0: never alias them
            seen.setdefault(name, []).append(key)
            x = inp.detach().reshape(-1, inp.shape[-1]).to(torch.float32)
            if name not in acc:
                acc[name] = [torch.zeros(x.shape[1], x.shape[1], device=x.device), 0, []]
            a = acc[name]
            a[0].addmm_(x.T, x)
            a[1] += x.shape[0]
            kept = sum(t.shape[0] for t in a[2])
            if kept < n_sample:
                a[2].append(x[: n_sample - kept].clone())
        return hook

    for name, mod in names.items():
        handles.append(mod.register_forward_pre_hook(make(name)))
    try:
        for inp in inputs:
            _run_block(block, [inp])
            first: dict[tuple, str] = {}  # this batch's input keys -> first layer that read them
            for n in names:
                labels.setdefault(n, []).append(first.setdefault(tuple(seen[n]), n) if n in seen else None)
            seen.clear()
            alive.clear()
    finally:
        for h in handles:
            h.remove()
    source = {n: tuple(lab) for n, lab in labels.items() if n in acc}
    return {n: LayerStats(h / max(1, c), torch.cat(s), c) for n, (h, c, s) in acc.items()}, source


# AWQ fold rules, relative to a block: (producer, consumers). Only exact folds are listed: the
# producer's output must feed these consumers and nothing else (so not a post-LN residual).
_FOLDS = [
    ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
    ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
    ("mlp.up_proj", ["mlp.down_proj"]),
    ("self_attn.v_proj", ["self_attn.o_proj"]),
    ("attention.self.value", ["attention.output.dense"]),  # BERT: value -> attention output
]


def _block_change(block: nn.Module, probe, ref: torch.Tensor) -> float:
    """Relative change of the block's output on the probe input against `ref`."""
    out = _run_block(block, probe)[0].float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _apply_awq(model, block, prefix, planned, fmts, stats, notes, touched, probe=None):
    """Search and fold AWQ scales for the `_FOLDS` pairs found in `block`. With `probe` (one batch
    of the block's inputs) each fold is checked on the float block: a fold that changes its output
    (a name that means something else here, e.g. Gemma-2's `post_attention_layernorm`, a norm after
    attention, not before the MLP) is undone and noted, so AWQ never makes a model worse than its
    own float version."""
    mods = dict(block.named_modules())
    ref = None
    if probe is not None:
        ref = _run_block(block, probe)[0].float()
        # fp32 weights fold to ~1e-6; 16-bit ones round each folded weight (~2^-9 relative)
        tol = 1e-3 if next(block.parameters()).dtype == torch.float32 else 3e-2
    for producer, consumers in _FOLDS:
        if producer not in mods or not all(c in mods for c in consumers):
            continue
        full = [prefix + c for c in consumers]
        if not all(f in planned and f in stats for f in full):
            continue
        prod = mods[producer]
        cons = [mods[c] for c in consumers]
        tie = gqa = None
        if isinstance(prod, nn.Linear) and prod.weight.shape[0] != cons[0].weight.shape[1]:
            cfg = getattr(model, "config", None)
            hd = getattr(cfg, "head_dim", None) or (cfg.hidden_size // cfg.num_attention_heads if cfg else None)
            if not hd:
                continue
            n_kv = prod.weight.shape[0] // hd
            rep = cons[0].weight.shape[1] // prod.weight.shape[0]
            tie, gqa = awq_mod.gqa_tie(n_kv, rep, hd), (n_kv, rep, hd)
        x = stats[full[0]].sample
        s = awq_mod.search_scales(x, [_weight(c) for c in cons], [fmts[f] for f in full], tie=tie)
        if bool((s == 1).all()):
            for f in full:
                notes[f] = "awq: no scaling helped (a = 0)"
            continue
        saved = [(t, t.detach().clone()) for m in (prod, *cons) for t in (m.weight, getattr(m, "bias", None))
                 if t is not None] if ref is not None else []
        awq_mod.fold(prod, cons, s, gqa=gqa)
        if ref is not None and (change := _block_change(block, probe, ref)) > tol:
            with torch.no_grad():
                for t, v in saved:
                    t.copy_(v)
            for f in full:
                notes[f] = (f"awq: not folded: scaling {prefix + producer} changed the float block's output by "
                            f"{change:.2g} (it does not feed these layers alone here)")
            continue
        touched.add(prefix + producer)
        for f in full:
            touched.add(f)
            st = stats[f]  # inputs are now x / s: update the statistics exactly
            inv = (1.0 / s).to(st.hessian.device)
            st.hessian = st.hessian * inv[:, None] * inv[None, :]
            st.sample = st.sample * inv
            notes[f] = f"awq: scaled, folded into {prefix + producer}"


def calibrate(model: nn.Module, plan: dict[str, tuple[Format, bool]], batches: list[dict[str, torch.Tensor]],
              algorithm_for: Callable[[str], str], options: dict[str, Any] | None = None, *,
              state_dir: str | os.PathLike | None = None, progress: bool = True,
              fail_after_block: int | None = None) -> CalibrationResult:
    """Quantize the planned linears inside the model's blocks sequentially (see module doc).

    Args:
        plan: layer name -> (Format, pad) for the layers to quantize (others are ignored).
        batches: model inputs (dicts of tensors, e.g. {"input_ids": ...}) for calibration.
        algorithm_for: layer name -> "rtn" | "clip" | "gptq" | "awq" | "awq+gptq" | "kmeans".
        options: algorithm options (damp, act_order, clip, block, awq_tokens).
        state_dir: write resumable state here after each block; resume from it when present.
        fail_after_block: testing hook: raise after finishing this block (simulates a crash).
    Returns the QTensors of the layers handled here; the model keeps its float weights (AWQ-folded).
    """
    options = dict(options or {})
    prefix_name, blocks = find_blocks(model)
    result = CalibrationResult()
    touched: set[str] = set()
    state = _State(Path(state_dir), _fingerprint(model, plan, algorithm_for, options, batches)) if state_dir else None

    with torch.no_grad():
        inputs = _capture_inputs(model, blocks[0], batches)
        start = 0
        if state is not None and state.exists():
            start, hidden, qts, floats, notes = state.load()
            inputs = _with_hidden(inputs, hidden)
            params = dict(model.named_parameters())
            for k, v in floats.items():
                params[k].data.copy_(v)
                touched.add(k.rsplit(".", 1)[0])  # saved again with later blocks' folds
            result.qtensors.update(qts)
            result.notes.update(notes)
            result.resumed_from = start
        bar = _progress(progress, len(blocks) - start, "calibrating blocks")
        for i in range(start, len(blocks)):
            block = blocks[i]
            prefix = f"{prefix_name}.{i}."
            names = {prefix + n: m for n, m in block.named_modules() if prefix + n in plan}
            if names:
                stats, source = _collect_stats(block, names, inputs, int(options.get("awq_tokens", 1024)))
                fmts = {n: plan[n][0] for n in names}
                if any("awq" in algorithm_for(n) for n in names):
                    awq_names = {n for n in names if "awq" in algorithm_for(n)}
                    _apply_awq(model, block, prefix, awq_names, fmts, stats, result.notes, touched, inputs[:1])
                originals = {}
                for group in _stack_groups(names, plan, algorithm_for, source, stats):
                    n0 = group[0]
                    fmt, pad = plan[n0]
                    ws = [_weight(names[n]) for n in group]
                    # layers reading the same input share H, and GPTQ treats rows independently:
                    # one stacked sweep quantizes them all (q/k/v, gate/up), row for row the same
                    qt = quantize_weight(torch.cat(ws) if len(ws) > 1 else ws[0], fmt, algorithm_for(n0), stats.get(n0),
                                         options, pad=pad, name=" + ".join(group))
                    r0 = 0
                    for n, w in zip(group, ws):
                        part = qt[r0:r0 + w.shape[0]] if len(ws) > 1 else qt
                        r0 += w.shape[0]
                        result.qtensors[n] = part
                        result.notes.setdefault(n, algorithm_for(n))
                for n, mod in names.items():
                    qt = result.qtensors[n]
                    originals[n] = mod.weight.data
                    _set_weight(mod, qt.dequantize()[:, : _weight(mod).shape[1]])
                hidden = _run_block(block, inputs)
                for n, mod in names.items():  # float weights back (the caller swaps in QuantLinear)
                    mod.weight.data = originals[n]
            else:
                hidden = _run_block(block, inputs)
            inputs = _with_hidden(inputs, hidden)
            if state is not None:
                params = dict(model.named_parameters())
                floats = {f"{m}.{a}": params[f"{m}.{a}"].detach() for m in touched for a in ("weight", "bias")
                          if f"{m}.{a}" in params}
                state.save(i + 1, hidden, result.qtensors, floats, result.notes)
            bar.advance()
            if fail_after_block is not None and i == fail_after_block:
                raise RuntimeError(f"injected failure after block {i}")
        bar.close()
    return result


def _stack_groups(names, plan, algorithm_for, source, stats) -> list[list[str]]:
    """Layers to quantize in one stacked sweep: same input tensor, format, padding and algorithm
    (block formats only; a palette's table is per tensor, so palettes are never stacked), and a
    bitwise equal Hessian -- the sweep uses the first layer's Hessian for all, so this is exactly
    the condition for stacking to be right (it also splits layers that read one buffer which the
    block overwrote in place between the reads)."""
    groups: dict[tuple, list[list[str]]] = {}
    for n in names:
        fmt, pad = plan[n]
        alg = algorithm_for(n)
        if fmt.family == "lut" or alg == "rtn" or n not in source:
            groups[("single", n)] = [[n]]
            continue
        subs = groups.setdefault((source[n], fmt, pad, alg), [])
        for sub in subs:
            if torch.equal(stats[sub[0]].hessian, stats[n].hessian):
                sub.append(n)
                break
        else:
            subs.append([n])
    return [sub for subs in groups.values() for sub in subs]


class _progress:
    def __init__(self, enabled: bool, total: int, what: str):
        self.p = None
        if enabled and total > 0:
            from rich.progress import Progress

            self.p = Progress(transient=True)
            self.p.start()
            self.task = self.p.add_task(what, total=total)

    def advance(self):
        if self.p:
            self.p.advance(self.task)

    def close(self):
        if self.p:
            self.p.stop()


def _fingerprint(model, plan, algorithm_for, options, batches) -> str:
    h = hashlib.sha256()
    for n in sorted(plan):
        h.update(f"{n}:{plan[n][0].to_dict()}:{plan[n][1]}:{algorithm_for(n)};".encode())
    h.update(json.dumps(options, sort_keys=True, default=str).encode())
    for b in batches:
        for k in sorted(b):
            t = b[k]
            h.update(f"{k}{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    for n, p in list(model.named_parameters())[:4]:  # cheap identity of the weights
        h.update(n.encode())
        h.update(p.detach().float().cpu().reshape(-1)[:1024].numpy().tobytes())
    return h.hexdigest()[:32]


class _State:
    """Resumable state: ONE safetensors file (planes, folded floats, next block's inputs, and the
    JSON metadata in its header), replaced atomically (temp file + rename) after each block, and
    checked against a fingerprint of model, plan, options and calibration data before use."""

    def __init__(self, root: Path, fingerprint: str):
        self.root = root
        self.fp = fingerprint
        self.path = root / "calibration-state.safetensors"

    def _meta(self) -> dict:
        from ..safetensors_io import read_header

        header, _ = read_header(self.path)
        return json.loads(header.get("__metadata__", {}).get("lowbit_calibration", "{}"))

    def exists(self) -> bool:
        if not self.path.exists():
            return False
        if self._meta().get("fingerprint") != self.fp:
            raise ValueError(f"calibration state {self.path} belongs to another model, recipe or calibration "
                             "data; delete it or choose another state directory")
        return True

    def save(self, next_block, hidden, qts, floats, notes):
        from ..safetensors_io import write

        self.root.mkdir(parents=True, exist_ok=True)
        tensors, layers = {}, {}
        for n, qt in qts.items():
            layers[n] = {"format": qt.fmt.to_dict(), "shape": list(qt.shape), "planes": list(qt.planes)}
            for p, t in qt.planes.items():
                tensors[f"q::{n}::{p}"] = t
        for k, v in floats.items():
            tensors[f"f::{k}"] = v
        for j, h in enumerate(hidden):
            tensors[f"h::{j}"] = h
        meta = {"fingerprint": self.fp, "next_block": next_block, "layers": layers, "notes": notes,
                "floats": sorted(floats), "batches": len(hidden)}
        tmp = self.path.with_suffix(".tmp")
        write(tmp, tensors, metadata={"lowbit_calibration": json.dumps(meta)})
        os.replace(tmp, self.path)  # a crash leaves the previous state whole

    def load(self):
        from ..formats import Format as F
        from ..safetensors_io import open_mmap

        meta = self._meta()
        t = {k: v.clone() for k, v in open_mmap(self.path).items()}
        qts = {n: QTensor({p: t[f"q::{n}::{p}"] for p in spec["planes"]}, F.from_dict(spec["format"]), tuple(spec["shape"]))
               for n, spec in meta["layers"].items()}
        floats = {k: t[f"f::{k}"] for k in meta["floats"]}
        hidden = [t[f"h::{j}"] for j in range(meta["batches"])]
        return meta["next_block"], hidden, qts, floats, meta["notes"]
