"""How long reading N bytes takes on this GPU, in the harness the speed benchmarks use (GPU only).

    python benchmarks/read_floor.py                 # table + fit, sizes 2 MB .. 512 MB
    python benchmarks/read_floor.py --json out.json

Memory-bound kernels (the M = 1 GEMV, the flash-decoding over a quantized KV cache) are judged as
ratios against a peer that reads more bytes (bf16 `F.linear`, SDPA on a bf16 cache). Neither side
can beat the time it takes just to *read* its bytes, and that time is not bytes / bandwidth: each
call also pays a fixed part (launch inside the CUDA graph, the first loads' latency, the tail of
the grid). This script measures both parts with the same method as matmul.py / attention.py (the
calls captured in one CUDA graph, cycling through enough copies of the buffer that every call reads
device memory, median of replays):

* `stream`: a Triton kernel that only loads the buffer (16-byte loads, all of a program's loads
  issued before they are used) and writes one int32 per program; the best of a few grid shapes.
* `torch.sum`: what `attention.py --tune` reports as its read floor.
* `copy_`: device-to-device copy (reads and writes N bytes).
* `empty`: a kernel that reads nothing: the per-call floor of the harness.

Then a least-squares fit t = F + bytes / BW over the sizes from 16 MB on, and the ratio ceiling
that implies for a kernel reading b bytes against a peer that takes T us: T / (F + b / BW).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from matmul import copies_for, graph_time  # noqa: E402


@triton.jit
def _stream_read(p, out, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Sum (wrapping) of ITERS * BLOCK int32 of p per program, one int32 out per program: a read
    with nothing else to do. The loads are unrolled so that all of them are in flight at once."""
    base = tl.program_id(0).to(tl.int64) * (BLOCK * ITERS)
    acc = tl.zeros([BLOCK], tl.int32)
    for i in tl.static_range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(p + offs, mask=offs < n, other=0)
    tl.store(out + tl.program_id(0), tl.sum(acc, 0))


# (BLOCK int32 per step, steps per program, warps)
STREAM_CONFIGS = ((1024, 4, 4), (2048, 4, 8), (1024, 16, 4), (4096, 2, 8))


def stream_fn(buf: torch.Tensor, out: torch.Tensor, cfg):
    block, iters, warps = cfg
    n = buf.numel()
    grid = (triton.cdiv(n, block * iters),)
    return lambda: _stream_read[grid](buf, out, n, BLOCK=block, ITERS=iters, num_warps=warps)


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(F us, BW TB/s) of the least-squares line t = F + bytes / BW through (bytes, us) points."""
    n = len(points)
    mx = sum(b for b, _ in points) / n
    my = sum(t for _, t in points) / n
    slope = sum((b - mx) * (t - my) for b, t in points) / sum((b - mx) ** 2 for b, _ in points)
    return my - slope * mx, 1e-6 / slope


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, nargs="+", default=[2, 4, 8, 16, 32, 64, 128, 256, 512])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size / 2**20:.0f} MiB")
    rows = []
    dummy = torch.zeros(1, dtype=torch.int32, device="cuda")
    out = torch.empty(1 << 20, dtype=torch.int32, device="cuda")
    empty = graph_time([stream_fn(dummy, out, (128, 1, 1))] * 2)
    print(f"empty kernel (reads 4 bytes): {empty:.2f} us per call")
    print(f"{'MB':>7} {'copies':>6} {'stream us':>10} {'TB/s':>6} {'torch.sum':>10} {'copy_ us':>9} {'1 copy':>8}")
    for mb in args.mb:
        nbytes = int(mb * 2**20) // 16 * 16
        c = copies_for(nbytes)
        bufs = [torch.randint(-2**31, 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device="cuda") for _ in range(c)]
        best = min(graph_time([stream_fn(b, out, cfg) for b in bufs]) for cfg in STREAM_CONFIGS)
        halves = [b.view(torch.bfloat16) for b in bufs]
        tsum = graph_time([lambda h=h: h.sum(dtype=torch.float32) for h in halves])
        dsts = [torch.empty_like(b) for b in bufs[: max(2, c // 2)]]
        tcopy = graph_time([lambda b=b, d=dsts[i % len(dsts)]: d.copy_(b) for i, b in enumerate(bufs)])
        # one buffer read again and again: only differs from the rotation when the L2 or the TLBs help
        one = graph_time([stream_fn(bufs[0], out, cfg) for cfg in STREAM_CONFIGS[:1]] * 2)
        rows.append(dict(mb=mb, bytes=nbytes, copies=c, stream_us=best, sum_us=tsum, copy_us=tcopy, one_copy_us=one))
        print(f"{mb:7.0f} {c:6d} {best:10.2f} {nbytes / best / 1e6:6.2f} {tsum:10.2f} {tcopy:9.2f} {one:8.2f}")
        del bufs, halves, dsts
        torch.cuda.empty_cache()
    big = [(r["bytes"], r["stream_us"]) for r in rows if r["mb"] >= 16]
    f_us, bw = fit(big)
    print(f"\nfit over >= 16 MB (stream): t = {f_us:.2f} us + bytes / {bw:.2f} TB/s")
    res = dict(device=props.name, empty_us=empty, rows=rows, fit_fixed_us=f_us, fit_tbps=bw)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
