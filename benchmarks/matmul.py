"""Quantized linear vs the float peer, measured in one process.

    python benchmarks/matmul.py --device cpu                  # int8 fast path vs fp32 F.linear
    python benchmarks/matmul.py --device cpu --presets int8 int4 --m 1 16 --shapes 4096x4096

Prints, per (M, K, N) and preset: median microseconds, the speed ratio against F.linear on the same
input in the activation dtype, the backend the dispatcher chose, and the relative error against
the reference twin (dequantize, then F.linear in fp32). The GPU kernels of the fused-kernel issue
extend this script; on CUDA it currently measures the reference path only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import lowbit
from lowbit.kernels.registry import force_backend, select
from lowbit.nn import QuantLinear


def bench(fn, repeat: int, device: str) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--presets", nargs="+", default=["int8"])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--shapes", nargs="+", default=["4096x4096"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, activations {args.dtype}")
    print(f"{'M':>5} {'K':>6} {'N':>6} {'preset':<10} {'backend':<10} {'us':>10} {'peer us':>10} {'speedup':>8} {'rel err':>9}")
    for shape in args.shapes:
        k, n = map(int, shape.split("x"))
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02
        for preset in args.presets:
            q = QuantLinear(lowbit.quantize_tensor(w, preset)).to(args.device)
            backend = select(q.fmt, "linear", args.device, shape=q.weight_shape)[0]
            wf = w.to(args.device, dtype)
            for m in args.m:
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(args.device, dtype)
                with torch.no_grad():
                    t_q = bench(lambda: q(x), args.repeat, args.device)
                    t_f = bench(lambda: F.linear(x, wf), args.repeat, args.device)
                    with force_backend("linear", "reference"):
                        ref = F.linear(x.float(), q.qweight.dequantize().to(args.device))
                    err = ((q(x).float() - ref).norm() / ref.norm()).item()
                print(f"{m:>5} {k:>6} {n:>6} {preset:<10} {backend:<10} {t_q:>10.1f} {t_f:>10.1f} {t_f / t_q:>7.2f}x {err:>9.2e}")


if __name__ == "__main__":
    main()
