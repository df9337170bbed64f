"""How long quantization takes: RTN and GPTQ, on the CPU (SmolLM2-135M, real calibration) and on a GPU
(the linear layers of a Llama-3-8B-shaped model: random weights, synthetic calibration).

GPU part (`--device cuda`), per block of 32: q/k/v (4096 -> 4096/1024/1024, sharing one input Hessian,
quantized in one stacked GPTQ sweep), o (4096 -> 4096), gate/up (4096 -> 14336 each, stacked),
down (14336 -> 4096). Hessians come from 128 x 2048 synthetic tokens with correlated channels and a
few outlier channels (X = Z M D, Z Gaussian, M a random mixing matrix, D channel magnitudes), so the
Cholesky factorizations see realistic conditioning. Weights are bf16 N(0, 0.02^2). Times exclude
building the synthetic inputs; they include Hessian accumulation, Cholesky, the sweep and packing.

CPU part (`--device cpu`): `lowbit.quantize(smollm2, int4 g64, algorithm=gptq)` end to end with
32 x 256 calibration tokens (block-by-block calibration forward passes included), and RTN.

Usage:
    python benchmarks/quant_time.py --device cuda [--blocks 32] [--format int4 --block-size 128]
    python benchmarks/quant_time.py --device cpu
    python benchmarks/quant_time.py --device cpu --part synthetic --small --blocks 2 --tokens 4096   # smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lowbit.algorithms.gptq import gptq  # noqa: E402
from lowbit.formats import quantize_tensor  # noqa: E402
from lowbit.formats.presets import resolve  # noqa: E402

HIDDEN, INTER, KV = 4096, 14336, 1024


def synthetic_hessian(k: int, tokens: int, gen: torch.Generator, device) -> torch.Tensor:
    mix = torch.randn(k, k, generator=gen, device=device) / k ** 0.5 + torch.eye(k, device=device)
    mag = torch.rand(k, generator=gen, device=device) * 2 + 0.1
    mag[torch.randperm(k, generator=gen, device=device)[: k // 256]] *= 20  # outlier channels
    H = torch.zeros(k, k, device=device)
    step = 16384
    for s in range(0, tokens, step):
        z = torch.randn(min(step, tokens - s), k, generator=gen, device=device)
        x = (z @ mix) * mag
        H.addmm_(x.T, x)
    return H / tokens


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def synthetic_part(args):
    global HIDDEN, INTER, KV
    if args.small:  # a shape-faithful miniature for a CPU smoke run
        HIDDEN, INTER, KV = 256, 896, 64
    device = torch.device(args.device)
    fmt = resolve(args.format, block_size=args.block_size)
    gen = torch.Generator(device=device).manual_seed(0)
    shapes = {"qkv": (HIDDEN + 2 * KV, HIDDEN), "o": (HIDDEN, HIDDEN), "gate_up": (2 * INTER, HIDDEN), "down": (HIDDEN, INTER)}
    n_weights = args.blocks * sum(r * c for r, c in shapes.values())
    print(f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; format {fmt.name} "
          f"block {fmt.block_size}; {args.blocks} blocks, {n_weights / 1e9:.2f} B weights; {args.tokens} calibration tokens", flush=True)
    # RTN over every weight
    rtn_s = 0.0
    for b in range(args.blocks):
        for name, (r, c) in shapes.items():
            w = (torch.randn(r, c, generator=gen, device=device) * 0.02).to(torch.bfloat16)
            sync(device)
            t0 = time.perf_counter()
            qt = quantize_tensor(w, fmt)
            sync(device)
            rtn_s += time.perf_counter() - t0
            del qt
    print(f"RTN: {rtn_s:.1f} s for all {args.blocks * len(shapes)} stacked matrices", flush=True)
    gptq_s = hess_s = 0.0
    worst = 0.0
    for b in range(args.blocks):
        hs = {}
        for k in sorted({c for _, c in shapes.values()}):
            sync(device)
            t0 = time.perf_counter()
            hs[k] = synthetic_hessian(k, args.tokens, gen, device)
            sync(device)
            hess_s += time.perf_counter() - t0
        for name, (r, c) in shapes.items():
            w = (torch.randn(r, c, generator=gen, device=device) * 0.02).to(torch.bfloat16)
            sync(device)
            t0 = time.perf_counter()
            qt = gptq(w, hs[c], fmt)
            sync(device)
            dt = time.perf_counter() - t0
            gptq_s += dt
            if b == 0:  # quality check on the first block: output error vs RTN under the same Hessian
                H = hs[c]
                wf = w.float()
                e = lambda q: float(torch.einsum("ij,jk,ik->", q.dequantize() - wf, H, q.dequantize() - wf))
                ratio = e(qt) / e(quantize_tensor(w, fmt))
                worst = max(worst, ratio)
                print(f"  block 0 {name:8s} {r}x{c}: GPTQ {dt:.1f}s, output error {ratio:.3f}x RTN's", flush=True)
        if b % 4 == 3 or b == args.blocks - 1:
            print(f"  {b + 1} blocks: GPTQ {gptq_s:.0f}s (+ Hessians {hess_s:.0f}s)", flush=True)
    total = gptq_s + hess_s
    print(f"\nRESULT RTN {rtn_s:.1f}s | GPTQ {gptq_s:.0f}s + Hessians {hess_s:.0f}s = {total:.0f}s ({total / 60:.1f} min) "
          f"for {args.blocks} blocks | GPTQ/RTN output error <= {worst:.3f}", flush=True)


def cpu_part(args):
    import copy

    from lowbit.models import load_source
    from lowbit.planning import calibration_batches
    from lowbit.quantize import quantize

    src = load_source("smollm2")
    calib = calibration_batches(src)
    print(f"smollm2: {len(calib)} calibration batches of {calib[0]['input_ids'].shape}, torch threads {torch.get_num_threads()}", flush=True)
    for alg in ("rtn", "gptq"):
        m = copy.deepcopy(src.model)
        t0 = time.perf_counter()
        quantize(m, {"global": {"format": args.format, "block_size": 64}, "types": {"Embedding": "none"},
                     "algorithm": {"name": alg}}, calibration=calib if alg != "rtn" else None, progress=False)
        print(f"RESULT smollm2 {args.format} g64 {alg}: {time.perf_counter() - t0:.1f} s", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128 * 2048)
    ap.add_argument("--format", default="int4")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--part", choices=["synthetic", "smollm2"], default=None,
                    help="default: synthetic 8B-shaped layers on CUDA, smollm2 on CPU")
    ap.add_argument("--small", action="store_true", help="synthetic part at miniature shapes (smoke test)")
    args = ap.parse_args()
    part = args.part or ("synthetic" if args.device.startswith("cuda") else "smollm2")
    if part == "smollm2":
        cpu_part(args)
    else:
        synthetic_part(args)


if __name__ == "__main__":
    main()
