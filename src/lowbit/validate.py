"""`lowbit.validate(base, quant, data)`: prove the accuracy held, tails included.

Every metric is computed per sample (per token for language models) so that tails are visible:
mean, p95/p99 (or p5/p1 for similarities) and the worst value. Thresholds from a recipe's
`[validate]` table turn a result into a failure that names the threshold, the measured value and
the layers that lost the most (per-layer output SQNR from forward hooks).

Example:
    >>> import torch, copy, lowbit
    >>> base = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    >>> quant = copy.deepcopy(base); _ = lowbit.quantize(quant, "int8", progress=False)
    >>> res = lowbit.validate(base, quant, torch.randn(32, 64), task="tensor")
    >>> res.metrics["sqnr_db"] > 30
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .models import is_causal_lm_class

# threshold name -> (metric key, direction): "max" fails when measured > limit, "min" when below
THRESHOLDS = {
    "max_delta_ppl": ("delta_ppl_pct", "max"),
    "max_kl_mean": ("kl_mean", "max"),
    "max_kl_p99": ("kl_p99", "max"),
    "min_top1_agreement": ("top1_agreement", "min"),
    "min_cosine_mean": ("cosine_mean", "min"),
    "min_cosine_p1": ("cosine_p1", "min"),
    "min_sqnr_db": ("sqnr_db", "min"),
    "max_mae": ("mae", "max"),
}


@dataclass
class ValidationResult:
    """Metrics (name -> value), per-sample arrays for plots, per-layer SQNR, threshold failures."""

    task: str
    metrics: dict[str, float]
    samples: dict[str, list[float]] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)
    coverage: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "metrics": self.metrics, "samples": self.samples, "layers": self.layers,
                "coverage": self.coverage, "failures": self.failures, "passed": self.passed}

    def worst_layers(self, n: int = 3) -> list[dict[str, Any]]:
        return sorted(self.layers, key=lambda r: r["output_sqnr_db"])[:n]


def _q(values: torch.Tensor, q: float) -> float:
    return float(torch.quantile(values.double(), q)) if values.numel() else float("nan")


def _tail(prefix: str, v: torch.Tensor, low: bool = False) -> dict[str, float]:
    """mean plus the bad tail: high quantiles (errors) or low ones (similarities)."""
    v = v.flatten().double()
    if v.numel() > 1_000_000:  # quantile limit; a fixed stride keeps the estimate deterministic
        v = v[:: math.ceil(v.numel() / 1_000_000)]
    if low:
        return {f"{prefix}_mean": float(v.mean()), f"{prefix}_p5": _q(v, 0.05), f"{prefix}_p1": _q(v, 0.01),
                f"{prefix}_min": float(v.min())}
    return {f"{prefix}_mean": float(v.mean()), f"{prefix}_p95": _q(v, 0.95), f"{prefix}_p99": _q(v, 0.99),
            f"{prefix}_max": float(v.max())}


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    noise = (ref.double() - out.double()).pow(2).sum().item()
    sig = ref.double().pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(sig / noise) if sig else -math.inf


class _LayerTaps:
    """Forward hooks on same-named modules of both models: output SQNR and input ranges per layer."""

    def __init__(self, base: nn.Module, quant: nn.Module, names: list[str]):
        self.names = names
        self.base_out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        self.quant_out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        self.handles = []
        bmods, qmods = dict(base.named_modules()), dict(quant.named_modules())
        for n in names:
            self.handles.append(bmods[n].register_forward_hook(self._save(self.base_out, n)))
            self.handles.append(qmods[n].register_forward_hook(self._save(self.quant_out, n)))

    @staticmethod
    def _save(store, name):
        def hook(_mod, _inp, out):
            store[name].append(out.detach().float().cpu())
        return hook

    def close(self) -> list[dict[str, Any]]:
        for h in self.handles:
            h.remove()
        rows = []
        for n in self.names:
            if self.base_out[n] and self.quant_out[n]:
                b, q = torch.cat([t.flatten() for t in self.base_out[n]]), torch.cat([t.flatten() for t in self.quant_out[n]])
                rows.append({"name": n, "output_sqnr_db": round(_sqnr(b, q), 2)})
        return rows


def quantized_layer_names(model: nn.Module) -> list[str]:
    """Names of the quantized layers, as the float model names them: the members of fused groups
    (`lowbit.nn.fuse_projections`, their slices of the joined output), not the joined layers."""
    from .nn import FusedSlice, QuantEmbedding, QuantLinear
    from .nn.gated import first_gated

    gated = first_gated(model)
    if gated is not None:  # its gate / up outputs exist only as silu(gate) * up: nothing to compare layer by layer
        raise ValueError(f"{gated!r} is a fused gated MLP (fuse_projections(..., gated_mlp=True)): validate needs "
                         "its gate_proj and up_proj; call lowbit.nn.unfuse_projections(model) first")
    slices = [m for m in model.modules() if isinstance(m, FusedSlice)]
    joined = {id(m.joined) for m in slices}
    return [n for n, m in model.named_modules()
            if (isinstance(m, (QuantLinear, QuantEmbedding)) and id(m) not in joined)
            or (isinstance(m, FusedSlice) and isinstance(m.joined, QuantLinear))]


@torch.no_grad()
def calibration_coverage(model: nn.Module, names: list[str], calib_batches, eval_batches, run) -> list[dict[str, Any]]:
    """Per layer: the fraction of evaluation inputs outside the [min, max] seen during calibration."""
    mods = dict(model.named_modules())
    lo = {n: math.inf for n in names}
    hi = {n: -math.inf for n in names}
    outside = {n: 0 for n in names}
    total = {n: 0 for n in names}
    phase = {"calib": True}

    def hook(name):
        def fn(_m, inp, _out):
            x = inp[0]
            if not x.is_floating_point():
                return
            if phase["calib"]:
                lo[name] = min(lo[name], float(x.min()))
                hi[name] = max(hi[name], float(x.max()))
            else:
                outside[name] += int(((x < lo[name]) | (x > hi[name])).sum())
                total[name] += x.numel()
        return fn

    handles = [mods[n].register_forward_hook(hook(n)) for n in names]
    try:
        for b in calib_batches:
            run(model, b)
        phase["calib"] = False
        for b in eval_batches:
            run(model, b)
    finally:
        for h in handles:
            h.remove()
    rows = []
    for n in names:
        if total[n]:
            frac = outside[n] / total[n]
            rows.append({"name": n, "outside_fraction": frac, "flagged": frac > 0.01})
    return rows


@torch.no_grad()
def validate(base: nn.Module, quant: nn.Module, data, *, task: str = "auto", thresholds: dict[str, float] | None = None,
             labels: torch.Tensor | None = None, batch_size: int = 4, layer_batches: int = 1,
             kv_caches: tuple[str, ...] = ()) -> ValidationResult:
    """Compare a quantized model with its float base on `data`.

    Args:
        base, quant: the float model and the quantized one (same architecture).
        data: causal LMs: token ids (n, seq_len); embeddings: a dict of tokenizer outputs (each (n, L));
            classifiers / any tensor model: an input tensor (n, ...).
        task: "causal_lm", "embedding", "classifier", "tensor", or "auto" (from the model class).
        thresholds: e.g. {"max_delta_ppl": 1.0, "min_cosine_p1": 0.99}; names in `THRESHOLDS`.
        labels: classifiers: true labels for accuracy.
        batch_size: samples per forward pass.
        layer_batches: batches (from the start) over which per-layer output SQNR is measured.
        kv_caches: causal LMs: quantized KV caches ("int8", "int4") whose effect on `quant` is
            measured too (`kv_<kind>_kl_mean` / `_kl_p99` / `_kl_max` / `_top1_agreement`: the
            second half of each sequence attends to the cached first half, vs a float cache).
    """
    task = _infer_task(quant) if task == "auto" else task
    names = quantized_layer_names(quant)
    n = _num_samples(data)
    taps = _LayerTaps(base, quant, names)
    outs_b, outs_q = [], []
    try:
        for i, start in enumerate(range(0, n, batch_size)):
            if i == layer_batches:
                layer_rows = taps.close()
                taps = None
            batch = _slice(data, start, start + batch_size)
            outs_b.append(_forward(base, batch, task))
            outs_q.append(_forward(quant, batch, task))
    finally:
        if taps is not None:
            layer_rows = taps.close()
    metrics, samples = _METRICS[task](outs_b, outs_q, data, labels)
    if kv_caches and task == "causal_lm":
        from .attention.evaluate import kv_cache_kl

        metrics.update(kv_cache_kl(quant, data, kinds=tuple(kv_caches), batch_size=batch_size))
    res = ValidationResult(task=task, metrics=metrics, samples=samples, layers=layer_rows)
    res.failures = check_thresholds(res, thresholds or {})
    return res


def check_thresholds(res: ValidationResult, thresholds: dict[str, float]) -> list[str]:
    """Messages for each threshold the result breaks (naming threshold, value and worst layers)."""
    failures = []
    worst = ", ".join(f"{r['name']} ({r['output_sqnr_db']:.1f} dB)" for r in res.worst_layers(3)) or "n/a"
    for name, limit in thresholds.items():
        if name not in THRESHOLDS:
            raise ValueError(f"unknown threshold {name!r}; known: {sorted(THRESHOLDS)}")
        key, direction = THRESHOLDS[name]
        if key not in res.metrics:
            raise ValueError(f"threshold {name} needs metric {key!r}, which task {res.task!r} does not measure")
        value = res.metrics[key]
        bad = value > limit if direction == "max" else value < limit
        if bad or math.isnan(value):
            failures.append(f"{name} = {limit} failed: measured {key} = {value:.6g}; worst layers: {worst}")
    return failures


# --- tasks -----------------------------------------------------------------------------------
def _infer_task(model: nn.Module) -> str:
    cls = type(model).__name__
    if is_causal_lm_class(cls) or hasattr(model, "generate") and "CausalLM" in cls:
        return "causal_lm"
    if cls.endswith("ForSequenceClassification") or cls.endswith("ForImageClassification"):
        return "classifier"
    if cls.endswith("Model") and hasattr(model, "config"):
        return "embedding"
    return "tensor"


def _num_samples(data) -> int:
    return next(iter(data.values())).shape[0] if isinstance(data, dict) else data.shape[0]


def _slice(data, a: int, b: int):
    return {k: v[a:b] for k, v in data.items()} if isinstance(data, dict) else data[a:b]


def _forward(model: nn.Module, batch, task: str) -> torch.Tensor:
    if task == "causal_lm":
        return model(input_ids=batch).logits.float()
    if task == "embedding":
        out = model(**batch)
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        mask = batch.get("attention_mask", torch.ones(h.shape[:2])).unsqueeze(-1).to(h.dtype)
        return ((h * mask).sum(1) / mask.sum(1).clamp(min=1)).float()
    out = model(batch)
    return (out.logits if hasattr(out, "logits") else out).float()


def _lm_metrics(outs_b, outs_q, data, labels):
    kl, nll_b, nll_q, agree, seq_ppl_b, seq_ppl_q = [], [], [], [], [], []
    ids = data
    start = 0
    for lb, lq in zip(outs_b, outs_q):
        n = lb.shape[0]
        tgt = ids[start: start + n, 1:]
        start += n
        lpb, lpq = lb.log_softmax(-1), lq.log_softmax(-1)
        kl.append((lpb.exp() * (lpb - lpq)).sum(-1).flatten())
        b_nll = -lpb[:, :-1].gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        q_nll = -lpq[:, :-1].gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        nll_b.append(b_nll.flatten())
        nll_q.append(q_nll.flatten())
        seq_ppl_b.append(b_nll.mean(1).exp())
        seq_ppl_q.append(q_nll.mean(1).exp())
        agree.append((lb.argmax(-1) == lq.argmax(-1)).float().flatten())
    kl_all = torch.cat(kl).clamp(min=0)
    ppl_b, ppl_q = float(torch.cat(nll_b).mean().exp()), float(torch.cat(nll_q).mean().exp())
    m = {"ppl_base": ppl_b, "ppl_quant": ppl_q, "delta_ppl": ppl_q - ppl_b,
         "delta_ppl_pct": 100 * abs(ppl_q - ppl_b) / ppl_b, "top1_agreement": float(torch.cat(agree).mean()),
         **_tail("kl", kl_all), "tokens": int(kl_all.numel())}
    samples = {"kl": kl_all.tolist()[:20000], "seq_ppl_base": torch.cat(seq_ppl_b).tolist(),
               "seq_ppl_quant": torch.cat(seq_ppl_q).tolist()}
    return m, samples


def _embedding_metrics(outs_b, outs_q, data, labels, k: int = 5):
    eb, eq = torch.cat(outs_b), torch.cat(outs_q)
    cos = torch.nn.functional.cosine_similarity(eb, eq, dim=-1)
    m = {**_tail("cosine", cos, low=True), "samples": int(cos.numel())}
    if eb.shape[0] > k + 1:
        nb, nq = torch.nn.functional.normalize(eb, dim=-1), torch.nn.functional.normalize(eq, dim=-1)
        sb, sq = nb @ nb.T, nq @ nq.T
        sb.fill_diagonal_(-2)
        sq.fill_diagonal_(-2)
        tb, tq = sb.topk(k, -1).indices, sq.topk(k, -1).indices
        overlap = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(tb, tq)])
        m[f"retrieval_top{k}_overlap"] = float(overlap.mean())
    return m, {"cosine": cos.tolist()}


def _classifier_metrics(outs_b, outs_q, data, labels):
    lb, lq = torch.cat(outs_b), torch.cat(outs_q)
    top1 = (lb.argmax(-1) == lq.argmax(-1)).float()
    k = min(5, lb.shape[-1])
    top5 = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(lb.topk(k, -1).indices, lq.topk(k, -1).indices)])
    m = {"top1_agreement": float(top1.mean()), "top5_agreement": float(top5.mean())}
    if labels is not None:
        m["accuracy_base"] = float((lb.argmax(-1) == labels).float().mean())
        m["accuracy_quant"] = float((lq.argmax(-1) == labels).float().mean())
    m.update(_tensor_metrics(outs_b, outs_q, data, labels)[0])
    return m, {"top1_agree": top1.tolist()}


def _tensor_metrics(outs_b, outs_q, data, labels):
    ob, oq = torch.cat(outs_b), torch.cat(outs_q)
    err = (ob - oq).abs()
    per_sample = err.reshape(err.shape[0], -1).mean(1)
    m = {"mae": float(err.mean()), "abs_err_p95": _q(err.flatten()[:1_000_000], 0.95),
         "abs_err_p99": _q(err.flatten()[:1_000_000], 0.99), "abs_err_max": float(err.max()), "sqnr_db": _sqnr(ob, oq)}
    return m, {"sample_mae": per_sample.tolist()}


_METRICS = {"causal_lm": _lm_metrics, "embedding": _embedding_metrics, "classifier": _classifier_metrics,
            "tensor": _tensor_metrics}
