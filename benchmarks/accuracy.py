"""Accuracy of lowbit's formats x algorithms against peer quantizers, same weights, same data, one run.

Models (bundled, offline): `smollm2` (SmolLM2-135M-Instruct: perplexity, KL and top-1 agreement on the
held-out split of the built-in corpus, 16 x 256 tokens) and `minilm` (all-MiniLM-L6-v2: cosine of
sentence embeddings, p1 / mean, 128 held-out sentences). Calibration-aware algorithms use the
disjoint calibration split (32 x 256 tokens / 128 sentences).

What is quantized: every Linear layer inside the transformer blocks, for lowbit and peers alike
(embeddings and the tied LM head stay float in every row, so rows differ only in how those layers
are rounded). bits/weight counts data + scale/zero/LUT planes of those layers.

Peers, run in this process on the same float weights, then dequantized back for evaluation:
  - MLX `mx.quantize` (affine, 4 bits, groups 32 / 64; fp16 scales and biases): mlx[cpu] on Linux
  - gguf-py `gguf.quants` Q4_0 / Q4_1 / Q8_0 (llama.cpp's reference rounding)
  - coremltools k-means palettization (4 and 3 bits, one LUT per tensor; its scikit-learn k-means)

Usage:
    python benchmarks/accuracy.py                 # everything, writes benchmarks/ACCURACY.md section
    python benchmarks/accuracy.py --models smollm2 --quick
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lowbit.models import load_source  # noqa: E402
from lowbit.pipeline import eval_data  # noqa: E402
from lowbit.planning import auto_plan, calibration_batches  # noqa: E402
from lowbit.quantize import quantize  # noqa: E402
from lowbit.validate import _embedding_metrics, _forward, _lm_metrics  # noqa: E402

BLOCK_LINEARS = "*.layers.*"  # both models keep their blocks in a ModuleList named ...layers / ...layer


def block_linears(model) -> list[str]:
    from lowbit.algorithms.calibrate import find_blocks

    prefix, _ = find_blocks(model)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(prefix + ".")]


def recipe_for(fmt: dict, algorithm: str, layers: list[str]) -> dict:
    return {"name": "bench", "global": "none", "names": {n: fmt for n in layers}, "algorithm": {"name": algorithm}}


class Evaluator:
    """Float outputs computed once; each candidate costs one quantized forward pass."""

    def __init__(self, src, task):
        self.src, self.task = src, task
        self.data, self.desc = eval_data(src)
        self.batches = self._batches(self.data)
        with torch.no_grad():
            self.ref = [_forward(src.model, b, task) for b in self.batches]

    def _batches(self, data, bs=4):
        if isinstance(data, dict):
            n = len(next(iter(data.values())))
            return [{k: v[i:i + 32] for k, v in data.items()} for i in range(0, n, 32)]
        return [data[i:i + bs] for i in range(0, len(data), bs)]

    def __call__(self, model) -> dict:
        with torch.no_grad():
            outs = [_forward(model, b, self.task) for b in self.batches]
        fn = _lm_metrics if self.task == "causal_lm" else _embedding_metrics
        return fn(self.ref, outs, self.data, None)[0]


def with_weights(base, new_weights: dict[str, torch.Tensor]):
    m = copy.deepcopy(base)
    mods = dict(m.named_modules())
    for n, w in new_weights.items():
        mods[n].weight.data = w.to(mods[n].weight.dtype)
    return m


# -- peers ---------------------------------------------------------------------------------------
def peer_mlx(w: torch.Tensor, group: int) -> tuple[torch.Tensor, float]:
    import mlx.core as mx
    import numpy as np

    a = mx.array(w.float().numpy())
    wq, scales, biases = mx.quantize(a, group_size=group, bits=4)
    deq = mx.dequantize(wq, scales, biases, group_size=group, bits=4)
    bits = 4 + 2 * 16 / group  # fp16 scale + fp16 bias per group
    return torch.from_numpy(np.array(deq.astype(mx.float32))), bits


def peer_gguf(w: torch.Tensor, kind: str) -> tuple[torch.Tensor, float]:
    import gguf
    import numpy as np

    t = getattr(gguf.GGMLQuantizationType, kind)
    q = gguf.quants.quantize(w.float().numpy().astype(np.float32), t)
    deq = gguf.quants.dequantize(q, t)
    return torch.from_numpy(np.ascontiguousarray(deq, dtype=np.float32)).reshape(w.shape), {"Q4_0": 4.5, "Q4_1": 5.0, "Q8_0": 8.5}[kind]


def peer_coreml_kmeans(w: torch.Tensor, nbits: int) -> tuple[torch.Tensor, float]:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    with contextlib.redirect_stderr(io.StringIO()):
        from coremltools.models.neural_network import quantization_utils
    import numpy as np

    w_np = w.float().numpy()
    lut, idx = quantization_utils._get_kmeans_lookup_table_and_weight(nbits, w_np)
    deq = lut.reshape(-1).astype(np.float32)[np.asarray(idx).reshape(-1)].reshape(w_np.shape)
    bits = nbits + (2 ** nbits) * 16 / w.numel()
    return torch.from_numpy(deq), bits


def run_peer(name, fn, base, layers, evaluate, rows, model_name):
    t0 = time.perf_counter()
    mods = dict(base.named_modules())
    new, bits_sum, n_sum = {}, 0.0, 0
    try:
        for n in layers:
            w = mods[n].weight.data
            deq, bits = fn(w)
            new[n] = deq
            bits_sum += bits * w.numel()
            n_sum += w.numel()
    except Exception as e:  # a peer that does not install here is reported, not fatal
        rows.append({"model": model_name, "who": "peer", "config": name, "error": f"{type(e).__name__}: {e}"[:120]})
        print(f"  {name}: unavailable ({e})", flush=True)
        return
    secs = time.perf_counter() - t0
    m = evaluate(with_weights(base, new))
    rows.append({"model": model_name, "who": "peer", "config": name, "bits": bits_sum / n_sum, "seconds": secs, **m})
    print(f"  {name:34s} {bits_sum / n_sum:5.2f} b/w  {_headline(m)}  ({secs:.1f}s)", flush=True)


def run_lowbit(label, fmt, algorithm, base, layers, calib, evaluate, rows, model_name):
    m = copy.deepcopy(base)
    t0 = time.perf_counter()
    rep = quantize(m, recipe_for(fmt, algorithm, layers), calibration=calib, progress=False)
    secs = time.perf_counter() - t0
    bits = 8 * sum(r["bytes_after"] for r in rep.layers) / sum(r["shape"][0] * r["shape"][1] for r in rep.layers)
    metrics = evaluate(m)
    rows.append({"model": model_name, "who": "lowbit", "config": f"{label} {algorithm}", "format": label,
                 "algorithm": algorithm, "bits": bits, "seconds": secs, **metrics})
    print(f"  {label + ' ' + algorithm:34s} {bits:5.2f} b/w  {_headline(metrics)}  ({secs:.1f}s)", flush=True)
    return metrics


def _headline(m):
    if "delta_ppl_pct" in m:
        return f"dppl {m['delta_ppl_pct']:7.3f}%  KL {m['kl_mean']:.5f}  top1 {m['top1_agreement']:.4f}"
    return f"cos p1 {m['cosine_p1']:.5f}  mean {m['cosine_mean']:.5f}"


SMOLLM2 = [  # (label, format table, algorithms)
    ("int4 g64", {"format": "int4", "block_size": 64}, ["rtn", "gptq", "awq+gptq"]),
    ("int4-asym g64", {"format": "int4-asym", "block_size": 64}, ["rtn", "gptq"]),
    ("int4-e8m0 g32", {"format": "int4-e8m0"}, ["rtn", "gptq"]),
    ("mxfp4", {"format": "mxfp4"}, ["rtn"]),
    ("lut4", {"format": "lut4"}, ["rtn", "gptq"]),
    ("int3 g64", {"format": "int4", "element": "int3", "block_size": 64}, ["rtn", "gptq"]),
    ("lut3", {"format": "lut3"}, ["rtn", "gptq"]),
]
MINILM = [
    ("int4 g32", {"format": "int4"}, ["rtn", "gptq"]),
    ("int4-e8m0 g32", {"format": "int4-e8m0"}, ["rtn", "gptq"]),
    ("lut4", {"format": "lut4"}, ["rtn", "kmeans", "gptq"]),
    ("lut4 per-row LUT", {"format": "lut4", "group_size": 1}, ["rtn", "kmeans", "gptq"]),
]
PEERS_4BIT = [
    ("MLX affine 4-bit g32", lambda w: peer_mlx(w, 32)),
    ("MLX affine 4-bit g64", lambda w: peer_mlx(w, 64)),
    ("gguf-py Q4_0", lambda w: peer_gguf(w, "Q4_0")),
    ("gguf-py Q4_1", lambda w: peer_gguf(w, "Q4_1")),
    ("gguf-py Q8_0", lambda w: peer_gguf(w, "Q8_0")),
    ("coremltools kmeans 4-bit", lambda w: peer_coreml_kmeans(w, 4)),
]
PEERS_3BIT = [("coremltools kmeans 3-bit", lambda w: peer_coreml_kmeans(w, 3))]


def bench_model(model_name, configs, rows, quick, mixed):
    print(f"\n== {model_name}", flush=True)
    src = load_source(model_name)
    task = {"causal_lm": "causal_lm", "embedding": "embedding"}[src.kind]
    base = src.model.float().eval()
    layers = block_linears(base)
    calib = calibration_batches(src)
    evaluate = Evaluator(src, task)
    for label, fmt, algs in configs:
        for alg in (algs[:2] if quick else algs):
            run_lowbit(label, fmt, alg, base, layers, calib, evaluate, rows, model_name)
    for name, fn in PEERS_4BIT + PEERS_3BIT:
        run_peer(name, fn, base, layers, evaluate, rows, model_name)
    if mixed:
        t0 = time.perf_counter()
        plan = auto_plan(src, mixed["candidates"], target_bits=mixed["target_bits"], base={"global": "none"},
                         algorithm=mixed.get("algorithm", "rtn"), layers=layers, log=lambda s: print("  " + s, flush=True), progress=False)
        names = plan.recipe["names"]
        m = copy.deepcopy(base)
        rep = quantize(m, plan.recipe, calibration=calib, progress=False)
        planned = [r for r in rep.layers if r["name"] in layers]
        bits = 8 * sum(r["bytes_after"] for r in planned) / sum(r["shape"][0] * r["shape"][1] for r in planned)
        metrics = evaluate(m)
        counts = {}
        for v in names.values():
            counts[str(v)] = counts.get(str(v), 0) + 1
        rows.append({"model": model_name, "who": "lowbit", "config": f"auto mixed @ {mixed['target_bits']} ({mixed.get('algorithm', 'rtn')})",
                     "bits": bits, "seconds": time.perf_counter() - t0, "plan": counts, **metrics})
        print(f"  auto mixed {bits:5.2f} b/w  {_headline(metrics)}  plan {counts}", flush=True)


def write_markdown(rows, path: Path, command: str):
    """One dated section per model between markers, so runs of different models do not clobber each other."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    text = path.read_text() if path.exists() else "# Accuracy\n"
    for model in dict.fromkeys(r["model"] for r in rows):
        sub = [r for r in rows if r["model"] == model]
        lm = any("delta_ppl_pct" in r for r in sub)
        lines = [f"## {datetime.date.today()} · accuracy.py · {model} · CPU (2 cores) · commit {commit}", "",
                 f"Command: `{command}`. Same float weights and held-out data for every row; every Linear layer inside "
                 "the blocks quantized (embeddings / tied head float in all rows); bits/weight over those layers; "
                 "time = quantization wall time on this (shared, busy) 2-core machine.", ""]
        if lm:
            lines += ["| who | config | bits/w | Δppl % | KL mean | KL p99 | top-1 | time s |", "|---|---|---|---|---|---|---|---|"]
        else:
            lines += ["| who | config | bits/w | cosine p1 | cosine mean | time s |", "|---|---|---|---|---|---|"]
        for r in sub:
            if "error" in r:
                lines.append(f"| {r['who']} | {r['config']} | – | unavailable: {r['error']} |")
            elif lm:
                lines.append(f"| {r['who']} | {r['config']} | {r['bits']:.3f} | {r['delta_ppl_pct']:.3f} | {r['kl_mean']:.5f} | "
                             f"{r['kl_p99']:.4f} | {r['top1_agreement']:.4f} | {r['seconds']:.1f} |")
            else:
                lines.append(f"| {r['who']} | {r['config']} | {r['bits']:.3f} | {r['cosine_p1']:.5f} | {r['cosine_mean']:.5f} | "
                             f"{r['seconds']:.1f} |")
            if r.get("plan"):
                lines.append(f"| | plan: {', '.join(f'{n} x {k}' for k, n in r['plan'].items())} | | | | |")
        block = "\n".join(lines)
        begin, end = f"<!-- accuracy.py:{model}:begin -->", f"<!-- accuracy.py:{model}:end -->"
        if begin in text:
            head, rest = text.split(begin, 1)
            tail = rest.split(end, 1)[1] if end in rest else ""
            text = head + begin + "\n" + block + "\n" + end + tail
        else:
            text = text.rstrip() + "\n\n" + begin + "\n" + block + "\n" + end + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2", "minilm"])
    ap.add_argument("--quick", action="store_true", help="first two algorithms per format only")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update benchmarks/ACCURACY.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    if "smollm2" in args.models:
        bench_model("smollm2", SMOLLM2, rows, args.quick, None)
    if "minilm" in args.models:
        bench_model("minilm", MINILM, rows, args.quick,
                    {"candidates": ["int8", {"format": "lut4", "group_size": 1}, "int4", "int4-e8m0", "lut4", "int2"],
                     "target_bits": 4.5, "algorithm": "gptq"})
    if not args.no_write:
        write_markdown(rows, ROOT / "benchmarks" / "ACCURACY.md", "python benchmarks/accuracy.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
