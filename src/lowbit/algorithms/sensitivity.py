"""Sensitivity analysis: quantize one layer at a time to each candidate format and measure how much
the model's output moves on calibration data.

The score of (layer, format) is the mean KL divergence of the next-token distribution from the
float model's (causal LMs), or the mean 1 - cosine of the sentence embeddings (embedding models),
with every other layer in float. Blocks before the layer under test are replayed from cached
float outputs (their output does not depend on the layer), so a layer deep in the stack costs
only the forward pass from its block on.

Example:
    >>> # rows = sensitivity(model, ["int8", "int4", "int2-e8m0"], batches, task="causal_lm")
    >>> # rows[0] -> {"layer": "model.layers.0.self_attn.q_proj", "format": "int8", "score": 1.2e-05, ...}
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..formats import quantize_tensor
from ..formats.presets import resolve


class _Replay(nn.Module):
    """Stands in for a block: returns the float block's cached output for the current batch."""

    def __init__(self, outputs: list[Any]):
        super().__init__()
        self.outputs = outputs
        self.batch = 0

    def forward(self, *args, **kwargs):
        return self.outputs[self.batch]


def _score_fn(task: str):
    if task == "causal_lm":
        def score(ref, out):
            lp, lq = ref.log_softmax(-1), out.log_softmax(-1)
            return float((lp.exp() * (lp - lq)).sum(-1).clamp(min=0).mean())
    else:
        def score(ref, out):
            return float((1 - torch.nn.functional.cosine_similarity(ref, out, dim=-1)).mean())
    return score


def _forward(model, batch, task):
    from ..validate import _forward as fwd

    return fwd(model, batch["input_ids"] if task == "causal_lm" else batch, task)


@torch.no_grad()
def sensitivity(model: nn.Module, candidates: list[str], batches: list[dict[str, torch.Tensor]], *,
                task: str = "causal_lm", layers: list[str] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Rows {layer, format, bits_per_weight, bytes, params, score} for every layer x candidate.

    Args:
        candidates: preset names or recipe-style format tables (e.g. {"format": "int4", "block_size": 64}).
        batches: calibration inputs ({"input_ids": ...} for LMs, tokenizer outputs for embeddings).
        layers: the Linear layers to score (default: every Linear / Conv1D outside tied heads).
    """
    from ..quantize import module_type
    from ..recipe import _layer_config
    from .calibrate import find_blocks

    fmts = [(_name(c), _layer_config(c, f"candidate {c!r}")) for c in candidates]
    mods = dict(model.named_modules())
    if layers is None:
        seen, layers = set(), []
        for n, m in mods.items():
            if module_type(m) in ("Linear", "Conv1D") and id(m.weight) not in seen:
                seen.add(id(m.weight))
                layers.append(n)
        emb_ids = {id(m.weight) for m in mods.values() if isinstance(m, nn.Embedding)}
        layers = [n for n in layers if id(mods[n].weight) not in emb_ids]  # tied heads follow the embedding
    score = _score_fn(task)
    refs = [_forward(model, b, task) for b in batches]
    try:
        prefix, blocks = find_blocks(model)
    except ValueError:
        prefix, blocks = None, []
    cached: list[list[Any]] = [[] for _ in blocks]
    if blocks:
        hooks = [blk.register_forward_hook(lambda m, a, out, i=i: cached[i].append(out)) for i, blk in enumerate(blocks)]
        try:
            for b in batches:
                _forward(model, b, task)
        finally:
            for h in hooks:
                h.remove()

    def block_of(name: str) -> int:
        if prefix is not None and name.startswith(prefix + "."):
            return int(name[len(prefix) + 1:].split(".")[0])
        return 0

    rows = []
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task_id = bar.add_task("sensitivity", total=len(layers) * len(fmts))
    originals = list(blocks)
    try:
        for name in layers:
            mod = mods[name]
            i = block_of(name)
            for j in range(i):
                blocks[j] = _Replay(cached[j])
            w = mod.weight.data
            w2 = w.t() if type(mod).__name__ == "Conv1D" else w
            for label, fmt in fmts:
                qt = quantize_tensor(w2, fmt, pad=True, name=name)
                deq = qt.dequantize()[:, : w2.shape[1]]
                mod.weight.data = (deq.t() if type(mod).__name__ == "Conv1D" else deq).to(w.dtype).contiguous()
                total = 0.0
                for bi, (b, ref) in enumerate(zip(batches, refs)):
                    for j in range(i):
                        blocks[j].batch = bi
                    total += score(ref, _forward(model, b, task))
                rows.append({"layer": name, "format": label, "bits_per_weight": round(qt.bits_per_weight, 4),
                             "bytes": qt.nbytes, "params": w2.numel(), "score": total / len(batches)})
                if bar:
                    bar.advance(task_id)
            mod.weight.data = w
            for j in range(i):
                blocks[j] = originals[j]
    finally:
        for j, blk in enumerate(originals):
            blocks[j] = blk
        if bar:
            bar.stop()
    return rows


def _name(c: Any) -> str:
    if isinstance(c, str):
        return c
    f = dict(c)
    base = f.pop("format")
    return base + "".join(f"-{k}{v}" for k, v in sorted(f.items()))


def write_table(rows: list[dict[str, Any]], path) -> None:
    """The rows as CSV (layer, format, bits_per_weight, bytes, params, score)."""
    import csv
    import os
    from pathlib import Path

    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["layer", "format", "bits_per_weight", "bytes", "params", "score"])
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def plot(rows: list[dict[str, Any]], path, metric: str = "score") -> None:
    """One line per candidate format: score per layer (log scale), layers in model order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(r["layer"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, len(layers) * 0.06), 4.5))
    for fmt in dict.fromkeys(r["format"] for r in rows):
        ys = {r["layer"]: r["score"] for r in rows if r["format"] == fmt}
        ax.plot(range(len(layers)), [max(ys.get(l, float("nan")), 1e-9) for l in layers], marker=".", lw=0.8, label=fmt)
    ax.set_yscale("log")
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel(metric + " with only this layer quantized")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
