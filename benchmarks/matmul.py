"""Quantized linear vs the float peer, measured in one process.

    python benchmarks/matmul.py --device cpu                  # int8 fast path vs fp32 F.linear
    python benchmarks/matmul.py --device cpu --presets int8 int4 --m 1 16 --shapes 4096x4096
    python benchmarks/matmul.py --device cuda                 # Triton kernels vs bf16 cuBLAS and tinygemm
    python benchmarks/matmul.py --device cuda --tune src/lowbit/kernels/triton_table.json

CPU: per (M, K, N) and preset, median microseconds, the speed ratio against F.linear on the same
input in the activation dtype, the backend the dispatcher chose, and the relative error against
the reference twin (dequantize, then F.linear in fp32).

CUDA (bf16 activations; method in `gpu_main`): for (K, N) in the four Llama-sized
shapes and M in 1..2048, bf16 `F.linear`, tinygemm int4 g128 (`torch._weight_int4pack_mm`) and
every lowbit format through `QuantLinear` (the kernel table picks the Triton kernel): time per
call, speedup vs bf16, achieved TB/s against the measured device-to-device copy bandwidth, and the
relative error against dequantize-then-matmul with the output poisoned first. `--tune` measures
candidate kernel configs per (M bucket, K, N) and writes the table the kernels read.
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
    ap.add_argument("--presets", nargs="+", default=None)
    ap.add_argument("--m", type=int, nargs="+", default=None)
    ap.add_argument("--shapes", nargs="+", default=None)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None, help="cpu: torch threads (default: torch's choice)")
    ap.add_argument("--tune", metavar="TABLE.json", help="cuda: measure kernel configs and write the table here")
    ap.add_argument("--tune-paths", nargs="+", default=None, help="--tune: only candidates of these paths")
    ap.add_argument("--tune-preset", default="int4-e8m0",
                    help="--tune: weights of this preset; int4-e8m0 writes keys for every format ('*'), "
                         "another preset keys for its decode family (fp4, asym) or bit width only")
    ap.add_argument("--log", metavar="FILE.jsonl", help="cuda: also write every row as JSON lines here")
    ap.add_argument("--check", action="store_true", help="cuda: every kernel path vs its reference at odd shapes, then exit")
    args = ap.parse_args()
    if args.device.startswith("cuda"):
        return gpu_main(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.presets = args.presets or ["int8"]
    args.m = args.m or [1, 16]
    args.shapes = args.shapes or ["4096x4096"]
    args.dtype = args.dtype or "float32"
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


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------
GPU_SHAPES = ["8192x8192", "4096x14336", "14336x4096", "4096x4096"]  # K x N
GPU_M = [1, 16, 64, 256, 2048]
# name -> (preset, Format overrides)
GPU_FORMATS = {
    "int8": ("int8", {}), "int4/g32": ("int4", {}), "int4/g64": ("int4", {"block_size": 64}),
    "int4/g128": ("int4", {"block_size": 128}), "int4-asym": ("int4-asym", {}),
    "int4-asym/g128": ("int4-asym", {"block_size": 128, "scale_dtype": "bf16"}),
    "int4-e8m0": ("int4-e8m0", {}), "int2-e8m0": ("int2-e8m0", {}), "int2": ("int2", {}), "mxfp4": ("mxfp4", {}),
    "mxfp8-e4m3": ("mxfp8-e4m3", {}), "mxfp8-e5m2": ("mxfp8-e5m2", {}), "mxint8": ("mxint8", {}),
    "lut4": ("lut4", {}), "lut8": ("lut8", {}),
    # a palette per 16 rows (coremltools' grouped-channel palettization), int8 tables, channel scales
    "lut4/g16-i8": ("lut4", {"group_size": 16, "lut_dtype": "int8", "per_channel_scale": True}),
}


def gpu_weight(name: str, w: torch.Tensor) -> "lowbit.QTensor":
    """The QTensor of bf16 weight `w` (on the GPU) in format `name`. Palettes get a random table and
    random codes (k-means over 100M+ values is slow and does not change the kernel's speed)."""
    from lowbit.formats import QTensor
    from lowbit.formats.packing import pack

    preset, over = GPU_FORMATS[name]
    fmt = lowbit.PRESETS[preset].replace(**over) if over else lowbit.PRESETS[preset]
    if fmt.family != "lut":
        return lowbit.quantize_tensor(w.float(), fmt)
    n, k = w.shape
    g = torch.Generator(device=w.device).manual_seed(n + k)
    codes = torch.randint(0, 1 << fmt.bits, (n, k), device=w.device, generator=g, dtype=torch.uint8)
    n_luts = n // fmt.group_size if fmt.group_size else 1
    planes = {"data": pack(codes, fmt.bits)}
    if fmt.lut_dtype == "int8":
        planes["lut"] = torch.sort(torch.randint(-127, 128, (n_luts, 1 << fmt.bits), device=w.device, generator=g,
                                                 dtype=torch.int16)).values.to(torch.int8)
        planes["lut_scale"] = (torch.rand(n_luts, 1, device=w.device, generator=g) * 2e-4 + 1e-4).half()
    else:
        table = torch.randn(n_luts, 1 << fmt.bits, device=w.device, generator=g) * 0.02
        planes["lut"] = torch.sort(table).values.half()
    if fmt.per_channel_scale:
        planes["scale"] = (torch.rand(n, 1, device=w.device, generator=g) + 0.5).half()
    return QTensor(planes, fmt, (n, k))


def graph_time(fns, reps: int = 7) -> float:
    """Microseconds per call: the calls, cycled in order, captured in one CUDA graph, replayed `reps`
    times (median). Callers pass one call per input copy, enough copies that the copies together are
    several times the L2, so every call reads its weight from device memory as a real layer would."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    r = max(len(fns), 24)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(r):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / r)
    del graph
    return statistics.median(ts)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (TB/s), 2 GiB buffers."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    ts = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    del src, dst
    return 2 * (1 << 30) / statistics.median(ts) / 1e12


def copies_for(nbytes: int) -> int:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(2, min(48, -(-3 * l2 // max(nbytes, 1))))


def tinygemm_weight(w: torch.Tensor, group: int = 128):
    """(packed weight, scales_and_zeros) for torch._weight_int4pack_mm from bf16 `w` (asymmetric
    int4, group 128, torchao's layout: w = (q - 8) * scale + zero)."""
    n, k = w.shape
    blocks = w.float().reshape(n, k // group, group)
    lo, hi = blocks.amin(-1), blocks.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    zero = lo + 8 * scale
    q = ((blocks - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8).reshape(n, k)
    packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).contiguous(), 8)
    sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)  # (K/g, N, 2)
    return packed, sz


def gpu_main(args) -> None:
    import json
    import os
    import subprocess

    import triton

    from lowbit.kernels import triton_linear as tlin

    torch.manual_seed(0)
    shapes = args.shapes or GPU_SHAPES
    ms = args.m or GPU_M
    names = args.presets or list(GPU_FORMATS)
    props = torch.cuda.get_device_properties(0)
    commit = os.environ.get("LOWBIT_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"{props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MiB; torch {torch.__version__}, "
          f"triton {triton.__version__}; commit {commit or '?'}; activations bf16")
    bw = copy_bandwidth()
    print(f"device-to-device copy: {bw:.2f} TB/s (bytes read + written)")
    log = open(args.log, "w") if args.log else None
    if args.check:
        return gpu_check(names)
    if args.tune:
        return tune(args, shapes, ms, bw)
    hdr = f"{'K':>6} {'N':>6} {'M':>5} {'method':<15} {'path':<8} {'us':>9} {'x bf16':>7} {'TB/s':>6} {'%copy':>6} {'rel err':>9}"
    print(hdr)
    summary = []
    for shape in shapes:
        k, n = map(int, shape.split("x"))
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        tiny = tinygemm_weight(w)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            act = 2 * m * (k + n)

            def row(method, path, t, wbytes, err=float("nan"), m=m):
                t_bf16 = next(r["us"] for r in summary if (r["K"], r["N"], r["M"], r["method"]) == (k, n, m, "bf16 F.linear")) \
                    if method != "bf16 F.linear" else t
                act = 2 * m * (k + n)
                tb = (wbytes + act) / t / 1e6
                rec = {"K": k, "N": n, "M": m, "method": method, "path": path, "us": t, "x_bf16": t_bf16 / t,
                       "TBps": tb, "pct_copy": 100 * tb / bw, "rel_err": err}
                summary.append(rec)
                if log:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                print(f"{k:>6} {n:>6} {m:>5} {method:<15} {path:<8} {t:>9.1f} {t_bf16 / t:>6.2f}x {tb:>6.2f} "
                      f"{100 * tb / bw:>5.0f}% {err:>9.2e}", flush=True)

            c = copies_for(n * k * 2)
            ws = [w] + [w.clone() for _ in range(c - 1)]
            xs = [x.clone() for _ in range(c)]
            t_bf16 = graph_time([lambda i=i: torch.nn.functional.linear(xs[i], ws[i]) for i in range(c)])
            row("bf16 F.linear", "cublas", t_bf16, n * k * 2)
            del ws, xs
            c = copies_for(tiny[0].numel() * tiny[0].element_size())
            tps = [tiny] + [(tiny[0].clone(), tiny[1].clone()) for _ in range(c - 1)]
            xs = [x.clone() for _ in range(c)]
            t = graph_time([lambda i=i: torch._weight_int4pack_mm(xs[i], tps[i][0], 128, tps[i][1]) for i in range(c)])
            row("tinygemm g128", "torch", t, tiny[0].numel() + tiny[1].numel() * 2)
            del tps, xs
        for name in names:
            try:
                bench_format(name, w, ms, summary, row, tlin, k, n)
            except Exception as e:  # report and go on: one broken format must not hide the others
                print(f"{k:>6} {n:>6} {'*':>5} {name:<15} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        del w, tiny
        torch.cuda.empty_cache()
    if log:
        log.close()
    print_summary(summary)


def bench_format(name, w, ms, summary, row, tlin, k, n):
    from lowbit.formats import QTensor
    from lowbit.kernels import PLACEMENT

    qt = gpu_weight(name, w)
    lin = QuantLinear(qt)
    lin._lowbit_name = f"bench.{name}"
    spec = tlin.spec_of(qt.fmt)
    planes = tlin.kernel_planes(qt)
    ref_w = qt.dequantize(torch.float32)
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        cfg = tlin.choose(spec, m, k, n)
        # correctness: output poisoned with NaN, fresh random input, vs dequantize-then-matmul
        out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        tlin.run(x, planes, spec, n, k, None, out=out)
        ref = x.float() @ ref_w.T
        err = float("nan") if not torch.isfinite(out).all() else ((out.float() - ref).norm() / ref.norm()).item()
        c = copies_for(qt.nbytes)
        lins = [lin] + [QuantLinear(QTensor({p: v.clone() for p, v in qt.planes.items()}, qt.fmt, qt.shape))
                        for _ in range(c - 1)]
        xs = [x.clone() for _ in range(c)]
        PLACEMENT.clear()
        with torch.no_grad():
            t = graph_time([lambda i=i: lins[i](xs[i]) for i in range(c)])
        ran = dict(PLACEMENT.get(f"bench.{name}", {}))
        path = cfg["path"] if ran.get("triton") else ",".join(ran) or "?"
        row(name, path, t, qt.nbytes, err, m=m)
        del lins, xs
    del qt, lin, planes, ref_w


def gpu_check(names) -> None:
    """Every path of every format vs dequantize-then-matmul at odd shapes, outputs NaN-poisoned."""
    import triton

    from lowbit.kernels import triton_linear as tlin

    cfgs = [{"path": "gemv", "BLOCK_N": 4, "KB_T": 256, "num_warps": 4, "fast": False},
            {"path": "gemv2", "BLOCK_N": 8, "num_warps": 4}, {"path": "gemv2", "BLOCK_N": 32, "NWG": 32, "num_warps": 4},
            {"path": "gemv2", "BLOCK_N": 4, "NWG": 32, "WPT": 4, "num_warps": 1},
            {"path": "gemv2", "BLOCK_N": 8, "NWG": 64, "WPT": 1, "SPLIT_K": 4, "num_warps": 2},
            {"path": "gemv2", "BLOCK_N": 8, "NWG": 32, "WPT": 2, "SPLIT_K": 2, "STAGES": 3, "num_warps": 1},
            {"path": "dot4", "BLOCK_N": 64, "BLOCK_M": 16, "KB_T": 64, "SPLIT_K": 4, "num_warps": 4},
            {"path": "dot4", "BLOCK_N": 128, "BLOCK_M": 64, "KB_T": 64, "SPLIT_K": 1, "num_warps": 8},
            {"path": "dot4", "BLOCK_N": 64, "BLOCK_M": 128, "KB_T": 32, "SPLIT_K": 2, "num_warps": 4, "STAGES": 2},
            {"path": "dot4", "BLOCK_N": 64, "BLOCK_M": 64, "KB_T": 128, "SPLIT_K": 3, "num_warps": 4, "XPERM": True},
            {"path": "dot", "BLOCK_N": 64, "BLOCK_M": 16, "KB_T": 64, "SPLIT_K": 4, "SWAP": True, "num_warps": 4},
            {"path": "dot", "BLOCK_N": 128, "BLOCK_M": 128, "KB_T": 64, "SPLIT_K": 1, "SWAP": False, "num_warps": 8},
            {"path": "dequant", "BLOCK_N": 16, "KB_T": 128, "num_warps": 4}, None]
    worst = 0.0
    for name in names:
        preset, over = GPU_FORMATS[name]
        fmt = lowbit.PRESETS[preset].replace(**over)
        rows = -(-777 // fmt.group_size) * fmt.group_size if fmt.group_size else 777  # whole palette groups
        for n, k in ((rows, 1000), (4096, 4096)):
            w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
            if k % 32:  # odd K: quantize for real (padded blocks; palettes by k-means)
                qt = lowbit.quantize_tensor(w.float(), fmt, pad=True)
            else:
                qt = gpu_weight(name, w)
            spec, planes, ref_w = tlin.spec_of(qt.fmt), tlin.kernel_planes(qt), qt.dequantize(torch.float32)
            bias = torch.randn(n, device="cuda")
            for m in (1, 3, 33, 300):
                for dt in (torch.bfloat16, torch.float16):
                    x = torch.randn(m, k, device="cuda", dtype=dt)
                    ref = x.float() @ ref_w.T + bias
                    for cfg in cfgs:
                        out = torch.full((m, n), float("nan"), device="cuda", dtype=dt)
                        try:
                            tlin.run(x, planes, spec, n, k, bias.to(dt), cfg=cfg, out=out)
                        except triton.runtime.errors.OutOfResources as e:  # never chosen: the tuner skips it too
                            print(f"skip {name} {cfg}: {str(e)[:80]}")
                            continue
                        ok = bool(torch.isfinite(out).all())
                        err = ((out.float() - ref).norm() / ref.norm()).item() if ok else float("inf")
                        worst = max(worst, err)
                        if not err <= 1e-2:
                            print(f"FAIL {name} N={n} K={k} M={m} {dt} {cfg}: rel err {err:.3e} (finite={ok})")
        print(f"check {name}: ok so far, worst rel err {worst:.2e}", flush=True)
    print(f"gpu check done: worst relative error {worst:.2e} (limit 1e-2)")


def print_summary(rows) -> None:
    """The acceptance ratios of the fused-kernel issue, from this run's rows."""
    def get(k, n, m, method):
        return next((r for r in rows if (r["K"], r["N"], r["M"], r["method"]) == (k, n, m, method)), None)

    print("\nsummary: speedup vs bf16 (and vs tinygemm at M=1)")
    seen = {r["method"] for r in rows}
    methods = [mt for mt in ["tinygemm g128", *GPU_FORMATS] if mt in seen]
    shapes = sorted({(r["K"], r["N"]) for r in rows}, key=lambda s: -s[0] * s[1])
    ms = sorted({r["M"] for r in rows})
    print(f"{'method':<15} {'K x N':>12} " + " ".join(f"{'M=' + str(m):>7}" for m in ms) + f" {'vs tiny@1':>9}")
    for meth in methods:
        for k, n in shapes:
            cells = []
            for m in ms:
                r = get(k, n, m, meth)
                cells.append(f"{r['x_bf16']:>6.2f}x" if r else f"{'-':>7}")
            r1, t1 = get(k, n, 1, meth), get(k, n, 1, "tinygemm g128")
            vt = f"{t1['us'] / r1['us']:>8.2f}x" if r1 and t1 else f"{'-':>9}"
            print(f"{meth:<15} {f'{k}x{n}':>12} " + " ".join(cells) + f" {vt}")


def tune(args, shapes, ms, bw) -> None:
    """Time candidate configs per (M bucket, K, N) on int4-e8m0 weights; write the fastest to the table
    (keys '*|M|K|N': the configs count bytes, so they serve every format). With another
    `--tune-preset` the keys are 'FAMILY|M|K|N' for fp4, palettes and affine codes (`decode_family`) or
    'BITS|M|K|N', which `choose` prefers for formats of that family or those bits."""
    import json
    import os

    from lowbit.kernels import triton_linear as tlin

    entries = {}
    for shape in shapes:
        k, n = map(int, shape.split("x"))
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        qt = lowbit.quantize_tensor(w.float(), args.tune_preset)
        spec = tlin.spec_of(qt.fmt)
        c = copies_for(qt.nbytes)
        copies = [tlin.kernel_planes(qt)] + [
            {p: (v.clone() if isinstance(v, torch.Tensor) else v) for p, v in tlin.kernel_planes(qt).items()}
            for _ in range(c - 1)]
        for m in ms:
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(c)]
            best = best_other = None  # over all candidates / without the Hopper int4 kernel's
            for cfg in tlin.candidates(spec, m, k, n):
                if args.tune_paths and cfg["path"] not in args.tune_paths:
                    continue
                try:
                    t = graph_time([lambda i=i: tlin.run(xs[i], copies[i], spec, n, k, None, cfg=cfg) for i in range(c)], reps=5)
                except Exception as e:  # a config that does not compile (shared memory, say) is skipped
                    print(f"  skip {cfg}: {type(e).__name__}: {str(e)[:120]}")
                    continue
                print(f"  K={k} N={n} M={m} {t:8.1f} us  {cfg}", flush=True)
                if best is None or t < best[0]:
                    best = (t, cfg)
                if cfg["path"] != "gluon4" and (best_other is None or t < best_other[0]):
                    best_other = (t, cfg)
            if best is None:
                continue
            key = "*" if args.tune_preset == "int4-e8m0" else (tlin.decode_family(spec) or str(spec.bits))
            bucket = f"{tlin.m_bucket(m)}|{k}|{n}"
            if best_other is not None:  # the entry other formats read ('*': all of them)
                entries[f"{key}|{bucket}"] = dict(best_other[1], us=round(best_other[0], 2))
            if tlin.gluon4_config(spec, m, k, n) is not None:  # what calls the int4 kernel could take read
                entries[f"gluon4|{bucket}"] = dict(best[1], us=round(best[0], 2))
            print(f"best K={k} N={n} M={m}: {best[0]:.1f} us {best[1]}", flush=True)
        del copies, qt, w
    try:  # merge: entries measured now replace those of the same key, the others are kept
        with open(args.tune) as f:
            entries = {**json.load(f).get("entries", {}), **entries}
    except (OSError, ValueError):
        pass
    table = {"device": torch.cuda.get_device_name(0), "format": "int4-e8m0 weights, bf16 activations",
             "command": "python benchmarks/matmul.py --device cuda --tune TABLE [--m ...]", "entries": entries}
    tmp = args.tune + ".tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    os.replace(tmp, args.tune)  # atomic: readers see the old table or the new one, never half
    print(f"wrote {len(entries)} entries to {args.tune}")


if __name__ == "__main__":
    main()
