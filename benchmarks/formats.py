"""Quantize + pack throughput per preset on a 4096x4096 fp32 matrix (CPU, and CUDA when present).

    python benchmarks/formats.py                 # all presets, 4096 x 4096
    python benchmarks/formats.py --size 1024 --presets int4 mxfp4

Prints, per preset and device: median seconds to quantize (planes packed), input MB/s, median
seconds to dequantize, and bits/weight. Median of --repeat runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lowbit


def timed(fn, repeat: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--presets", nargs="*", default=list(lowbit.PRESETS))
    ap.add_argument("--devices", nargs="*", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    args = ap.parse_args()

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, matrix {args.size}x{args.size} fp32")
    print(f"{'preset':<12} {'device':<6} {'quantize s':>11} {'MB/s':>9} {'dequant s':>10} {'bits/w':>7}")
    for device in args.devices:
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        w = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device)
        mb = w.numel() * 4 / 1e6
        for name in args.presets:
            qt = lowbit.quantize_tensor(w, name)
            tq = timed(lambda: lowbit.quantize_tensor(w, name), args.repeat, sync)
            td = timed(qt.dequantize, args.repeat, sync)
            print(f"{name:<12} {device:<6} {tq:>11.3f} {mb / tq:>9.1f} {td:>10.3f} {qt.bits_per_weight:>7.3f}", flush=True)


if __name__ == "__main__":
    main()
