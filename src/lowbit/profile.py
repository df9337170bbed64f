"""`lowbit.profile(model_or_package)`: latency, throughput, memory, energy and kernel placement.

Latency is measured per batch size (p50 / p95 / p99 over repeats after a warm-up); language
models also get tokens/s for prefill and for decode (one token at a time against the KV cache).
Placement comes from the dispatcher's counters (`lowbit.kernels.PLACEMENT`): what really ran.

Example:
    >>> import torch, lowbit
    >>> m = torch.nn.Sequential(torch.nn.Linear(256, 256)); _ = lowbit.quantize(m, "int8", progress=False)
    >>> p = lowbit.profile(m, example=torch.randn(1, 256), batch_sizes=(1, 4), repeats=3)
    >>> sorted(p.placement["0"])
    ['cpu_fast']
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .kernels import PLACEMENT
from .models import is_causal_lm_class


@dataclass
class ProfileResult:
    device: str
    dtype: str | None = None  # the floating dtype the model ran in
    load_seconds: float | None = None
    package_bytes: int | None = None
    latency: list[dict[str, Any]] = field(default_factory=list)   # per batch size
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    decode_ms_per_token: list[float] = field(default_factory=list)
    peak_memory_bytes: int | None = None
    energy_joules_per_inference: float | None = None
    best_batch_size: int | None = None
    placement: dict[str, dict[str, int]] = field(default_factory=dict)
    attention_placement: dict[str, int] = field(default_factory=dict)  # backend -> attention layers
    fallbacks: list[str] = field(default_factory=list)
    regressions: list[str] = field(default_factory=list)
    fused: list[str] = field(default_factory=list)  # groups joined by `fuse=True` (lowbit.nn.fuse_projections)
    not_fused: dict[str, str] = field(default_factory=dict)  # groups `fuse=True` left apart -> why

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss() -> int:
    try:
        import psutil

        return psutil.Process(os.getpid()).memory_info().rss
    except ImportError:  # pragma: no cover
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Energy:
    """NVML total-energy counter (millijoules since driver load), when on an NVIDIA GPU."""

    def __init__(self, device: str):
        self.handle = None
        if device.startswith("cuda"):
            try:
                import pynvml

                pynvml.nvmlInit()
                self.nvml = pynvml
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            except Exception:  # no pynvml / no permission: energy is simply not reported
                self.handle = None

    def read(self) -> float | None:
        return None if self.handle is None else self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000.0


def _timed(fn, repeats: int, device: str) -> list[float]:
    fn()
    _sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


@torch.no_grad()
def profile(model_or_pkg: nn.Module | str | Path, *, example: torch.Tensor | dict | None = None, task: str = "auto",
            batch_sizes: tuple[int, ...] = (1, 2, 4, 8), seq_len: int = 64, decode_tokens: int = 32,
            repeats: int = 10, device: str | None = None, compare: str | Path | None = None,
            dtype: torch.dtype | None = None, fuse: bool = False) -> ProfileResult:
    """Measure a model or a saved package.

    Args:
        model_or_pkg: a module, or a package folder (then load time and size on disk are measured).
        example: one input sample with a leading batch dim of 1 (non-LM models), or a dict of such
            tensors (a tokenizer's output) passed as keywords; LMs use random ids.
        task: "causal_lm", or anything else for a plain forward; "auto" looks at the class name.
        batch_sizes: the sweep for latency / throughput.
        seq_len: prompt length for LMs. decode_tokens: tokens generated one at a time for decode speed.
        repeats: timed runs per point (after one warm-up).
        compare: a previous `profile.json`; latencies slower beyond the repeat-run spread are listed.
        dtype: run the model in this floating dtype (e.g. torch.bfloat16: on CPU the 4-bit formats'
            fast path wants 16-bit activations). Quantized planes keep their own dtypes; a module
            passed in is measured on a copy and left as it was.
        fuse: join sibling projections (q / k / v, gate / up) into one matmul each before measuring
            (`lowbit.nn.fuse_projections`; float `nn.Linear`s too, so a float baseline measured the
            same way stays comparable); quantized gated MLPs (Llama family) become `GatedMLP`s, whose
            joined gate / up matmul applies silu(gate) * up itself (`lowbit.nn.gated`). A module passed
            in is fused in place and unfused afterwards (no copy of its weights for q / k / v, whose
            members then hold views of the joined planes; gate / up come back as copies of their rows).

    Example:
        >>> r = profile("out/run-smollm2/int4", dtype=torch.bfloat16)       # doctest: +SKIP
        >>> r.decode_tokens_per_s, r.placement                                # doctest: +SKIP
    """
    if fuse and isinstance(model_or_pkg, nn.Module) and dtype is None:
        from .nn import fuse_projections, unfuse_projections

        skipped: dict[str, str] = {}
        names = fuse_projections(model_or_pkg, gated_mlp=True, skipped=skipped)
        try:
            res = profile(model_or_pkg, example=example, task=task, batch_sizes=batch_sizes, seq_len=seq_len,
                          decode_tokens=decode_tokens, repeats=repeats, device=device, compare=compare)
        finally:
            unfuse_projections(model_or_pkg)
        res.fused, res.not_fused = names, skipped
        return res
    res = ProfileResult(device=device or "cpu")
    if isinstance(model_or_pkg, (str, Path)):
        from . import package

        rss0 = _rss()
        t0 = time.perf_counter()
        model = package.load(model_or_pkg)
        res.load_seconds = time.perf_counter() - t0
        res.package_bytes = sum(f.stat().st_size for f in Path(model_or_pkg).rglob("*") if f.is_file())
        res.peak_memory_bytes = _rss() - rss0
    else:
        model = model_or_pkg
    device = device or next((p.device.type for p in model.parameters()), "cpu")
    res.device = device
    if dtype is not None and model is model_or_pkg:  # the caller's module stays as it was
        import copy

        model = copy.deepcopy(model)
    model = model.to(device, dtype).eval()
    if fuse:
        from .nn import fuse_projections

        res.fused = fuse_projections(model, gated_mlp=True, skipped=res.not_fused)
    res.dtype = str(next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)).replace("torch.", "")
    is_lm = task == "causal_lm" or (task == "auto" and is_causal_lm_class(type(model).__name__))
    vocab = getattr(getattr(model, "config", None), "vocab_size", 1000)
    energy = _Energy(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss()
    PLACEMENT.clear()

    def make_input(b: int):
        if is_lm:
            return torch.randint(0, vocab, (b, seq_len), generator=torch.Generator().manual_seed(b)).to(device)
        if example is None:
            raise ValueError("profile: pass example= (one input with batch dim 1) for non-LM models")
        def to(v):  # float inputs follow the model's dtype when one is asked for
            return v.to(device, dtype) if dtype is not None and v.is_floating_point() else v.to(device)

        if isinstance(example, dict):  # tokenizer output: keyword inputs
            return {k: to(v.expand(b, *v.shape[1:]).contiguous()) for k, v in example.items()}
        return to(example.expand(b, *example.shape[1:]).contiguous())

    def call(x):
        return model(**x) if isinstance(x, dict) else model(x)

    best = (0.0, None)
    for b in batch_sizes:
        x = make_input(b)
        e0 = energy.read()
        times = _timed(lambda: call(x), repeats, device)
        e1 = energy.read()
        p50 = statistics.median(times)
        items = b * seq_len if is_lm else b
        row = {"batch_size": b, "p50_ms": 1e3 * p50, "p95_ms": 1e3 * _pct(times, 0.95), "p99_ms": 1e3 * _pct(times, 0.99),
               "spread": (max(times) - min(times)) / p50, "items_per_s": items / p50}
        if e0 is not None and e1 is not None:
            row["joules_per_inference"] = (e1 - e0) / (repeats + 0) / b
        res.latency.append(row)
        if row["items_per_s"] > best[0]:
            best = (row["items_per_s"], b)
    res.best_batch_size = best[1]
    if is_lm:
        res.prefill_tokens_per_s = res.latency[0]["items_per_s"]
        res.decode_ms_per_token, res.decode_tokens_per_s = _decode_speed(model, make_input(1), decode_tokens, device)
    if res.latency and "joules_per_inference" in res.latency[0]:
        res.energy_joules_per_inference = res.latency[0]["joules_per_inference"]
    if device.startswith("cuda"):
        res.peak_memory_bytes = torch.cuda.max_memory_allocated()
    elif res.peak_memory_bytes is None:
        res.peak_memory_bytes = max(_rss() - rss_before, 0)
    res.placement = {k: dict(v) for k, v in PLACEMENT.items()}
    attn = {n for n, m in model.named_modules() if getattr(m, "_lowbit_attention_name", None)}  # lowbit.attention.enable
    for name in attn & set(res.placement):
        for backend in res.placement[name]:
            res.attention_placement[backend] = res.attention_placement.get(backend, 0) + 1
    res.fallbacks = sorted(k for k, v in res.placement.items() if "reference" in v and k not in attn)
    if compare:
        res.regressions = compare_profiles(json.loads(Path(compare).read_text()), res.to_dict())
    return res


def _decode_speed(model: nn.Module, prompt: torch.Tensor, n: int, device: str) -> tuple[list[float], float]:
    """Per-token decode times with the model's KV cache (greedy), and tokens/s over them."""
    cache = {}
    if getattr(model, "_lowbit_kv_cache", None):  # lowbit.attention.enable(model, kv_cache=...)
        from .attention.evaluate import cache_kwarg
        from .attention.hf import make_cache

        cache = {cache_kwarg(): make_cache(model)}
    out = model(input_ids=prompt, use_cache=True, **cache)
    past = out.past_key_values
    tok = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(n):
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=tok, past_key_values=past, use_cache=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    steady = times[1:] if len(times) > 2 else times
    return [1e3 * t for t in times], len(steady) / sum(steady)


def compare_profiles(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Latency points slower than before by more than the larger of the two runs' spreads (min 5%)."""
    old = {r["batch_size"]: r for r in previous.get("latency", [])}
    out = []
    for r in current.get("latency", []):
        o = old.get(r["batch_size"])
        if not o:
            continue
        noise = max(0.05, o.get("spread", 0), r.get("spread", 0))
        if r["p50_ms"] > o["p50_ms"] * (1 + noise):
            out.append(f"batch {r['batch_size']}: p50 {r['p50_ms']:.2f} ms vs {o['p50_ms']:.2f} ms before "
                       f"(+{100 * (r['p50_ms'] / o['p50_ms'] - 1):.0f}%, noise {100 * noise:.0f}%)")
    for key in ("decode_tokens_per_s",):
        a, b = previous.get(key), current.get(key)
        if a and b and b < a * 0.95:
            out.append(f"{key}: {b:.1f} vs {a:.1f} before")
    return out
