"""lowbit attention kernels vs PyTorch SDPA on one GPU, in one process (no transformers needed).

    python benchmarks/attention.py                       # prefill + decode tables, bf16
    python benchmarks/attention.py --tune                # also sweep kernel configs, report the best
    python benchmarks/attention.py --only decode --json out.json
    python benchmarks/attention.py --only decode --decode-shapes 1,1024 1,4096 2,8192   # other rows
    python benchmarks/attention.py --only drafts --draft-tokens 4 8   # a few query tokens, float / quantized cache
    python benchmarks/attention.py --only continue --decode-shapes 1,16384 4,4096   # a prompt continuing a cache

Prefill: forward TFLOP/s (4*B*H*S*S*D flops, half when causal) for B*S = 32k tokens, H = 16,
D = 128, S in {1k, 4k, 16k}, causal and not: lowbit's default prefill (the warp-specialized Gluon
kernel on sm_90, else the Triton kernel) and the Triton kernel vs SDPA forced to the FLASH and the
CUDNN backends, medians of `triton.testing.do_bench` over interleaved rounds in the same run, plus
the relative error ||o - ref|| / ||ref|| against the fp32 reference twin (on the first 2 sequences).
Decode: one query token, GQA 32/8 heads, D = 128, (B, S) in {(1, 8192), (8, 8192), (32, 4096)}:
lowbit's flash-decoding over an int8 cache (one fp16 scale per token per head) and an int4 cache
(one fp16 scale per 32 values; "int4/tok": one per token) vs SDPA on a bf16 cache (the fastest of
its backends, GQA native); a second line per row: lowbit on the same bf16 cache (flash-decoding,
`decode_attention_float`, and the prefill kernel at Sq = 1 it replaced there). The value codes are stored tile-blocked, as `LowbitKVCache` stores them
for the fused kernel (`reference.block_tokens`).
Each timed call reads a different cache copy (rotating over enough copies to exceed the L2), and
the calls are captured in a CUDA graph so launch gaps (Python) do not count for either side; SDPA and
lowbit are timed in interleaved rounds (median of 3), after a short warm-up of the GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lowbit.attention.reference import (attention_reference, block_tokens, dequantize_kv, quantize_kv,  # noqa: E402
                                       unblock_tokens)
from lowbit.attention.triton_decode import decode_attention_float, decode_attention_triton  # noqa: E402
from lowbit.attention.triton_prefill import CONFIGS, _gluon_prefill, flash_attention_triton  # noqa: E402


def bench_ms(fn, reps: int = 50) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=reps, return_mode="median")


def rel_err(o: torch.Tensor, ref: torch.Tensor) -> float:
    return float((o.float() - ref.float()).norm() / ref.float().norm())


def prefill(args, rows: list) -> None:
    dev, dt = "cuda", getattr(torch, args.dtype)
    H, D = 16, 128
    # the Triton kernel's (config, host-side TMA descriptors); config = (BLOCK_M, BLOCK_N, warps, stages[, ws])
    tune = ([(c, True) for c in ((64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 2), (128, 128, 8, 3), (128, 64, 8, 3),
                                 (128, 64, 4, 3))] + [((64, 64, 4, 3), False)]) if args.tune else [(CONFIGS[D], True)]
    gp = _gluon_prefill()
    print(f"\nprefill: B*S = 32768 tokens, H = {H}, D = {D}, {args.dtype}; TFLOP/s (median of {args.rounds} "
          "interleaved rounds); lowbit = the default choice (Gluon warp-specialized kernel on sm_90), "
          "triton = the Triton kernel")
    print(f"{'S':>6} {'causal':>6} {'lowbit':>8} {'FLASH':>8} {'CUDNN':>8} {'x FLASH':>8} {'x CUDNN':>8} {'triton':>8} "
          f"{'rel err':>9}  kernel / triton config")
    for S in (1024, 4096, 16384):
        B = 32768 // S
        g = torch.Generator(device=dev).manual_seed(S)
        q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dt, generator=g) for _ in range(3))
        for causal in (False, True):
            flops = 4 * B * H * S * S * D / (2 if causal else 1)
            tf = lambda ms: flops / ms / 1e9  # noqa: E731
            best = None
            for cfg in tune:
                try:
                    ms = bench_ms(lambda: flash_attention_triton(q, k, v, causal=causal, config=cfg[0], host_desc=cfg[1]))
                except Exception as e:  # a config that does not fit (shared memory) is skipped, and said
                    print(f"   config {cfg}: {type(e).__name__}: {str(e)[:80]}")
                    continue
                if args.tune:
                    print(f"   config {cfg}: {tf(ms):.0f} TFLOP/s")
                if best is None or ms < best[0]:
                    best = (ms, cfg)
            use_gluon = gp is not None and gp.supports(q, k, v, causal=causal)

            def sdpa(be):
                def call():
                    with sdpa_kernel([be]):
                        F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                return call

            fns = {"lowbit": lambda: flash_attention_triton(q, k, v, causal=causal, gluon=use_gluon),
                   "triton": lambda: flash_attention_triton(q, k, v, causal=causal, config=best[1][0],
                                                            host_desc=best[1][1]),
                   "FLASH": sdpa(SDPBackend.FLASH_ATTENTION), "CUDNN": sdpa(SDPBackend.CUDNN_ATTENTION)}
            times = {name: [] for name in fns}
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    try:
                        times[name].append(tf(bench_ms(fn)))
                    except RuntimeError as e:
                        print(f"   {name}: unavailable ({str(e)[:60]})")
                        times[name].append(float("nan"))
            res = {name: statistics.median(t) for name, t in times.items()}
            o = torch.full_like(q[:2], float("nan"))
            flash_attention_triton(q[:2], k[:2], v[:2], causal=causal, gluon=use_gluon, out=o)
            err = rel_err(o, attention_reference(q[:2].float(), k[:2].float(), v[:2].float(), causal=causal))
            ours = res["lowbit"]
            kernel = "gluon" if use_gluon else "triton"
            row = {"kind": "prefill", "S": S, "B": B, "causal": causal, "lowbit_tflops": ours, "kernel": kernel,
                   "triton_tflops": res["triton"], "flash_tflops": res["FLASH"], "cudnn_tflops": res["CUDNN"],
                   "rel_err": err, "triton_config": best[1]}
            rows.append(row)
            print(f"{S:>6} {str(causal):>6} {ours:>8.0f} {res['FLASH']:>8.0f} {res['CUDNN']:>8.0f} "
                  f"{ours / res['FLASH']:>7.2f}x {ours / res['CUDNN']:>7.2f}x {res['triton']:>8.0f} {err:>9.2e}  "
                  f"{kernel} / {best[1]}")
        del q, k, v
        torch.cuda.empty_cache()


def check(args, rows: list) -> None:
    """Every supported head dim, causal or not, GQA, padding ranges, fp16 and bf16 vs the fp32 twin."""
    print("\nprefill accuracy: rel err vs fp32 reference (B=2, H=8, Hkv=2, Sq=Sk=1000, padded rows)")
    g = torch.Generator(device="cuda").manual_seed(0)
    start = torch.tensor([0, 37], dtype=torch.int32, device="cuda")
    end = torch.tensor([1000, 990], dtype=torch.int32, device="cuda")
    for dt in (torch.bfloat16, torch.float16):
        line = []
        for D in (64, 80, 96, 128, 256):
            q = torch.randn(2, 1000, 8, D, device="cuda", dtype=dt, generator=g).transpose(1, 2)
            k, v = (torch.randn(2, 2, 1000, D, device="cuda", dtype=dt, generator=g) for _ in range(2))
            worst = 0.0
            for causal in (False, True):
                o = flash_attention_triton(q, k, v, causal=causal, kv_start=start, kv_end=end)
                ref = attention_reference(q.float(), k.float(), v.float(), causal=causal, kv_start=start, kv_end=end)
                worst = max(worst, rel_err(o, ref))
            rows.append({"kind": "check", "dtype": str(dt), "D": D, "rel_err": worst})
            line.append(f"D={D}: {worst:.2e}")
        print(f"  {str(dt):<15} " + "  ".join(line))


def _graph_time_us(fn, n_calls: int, reps: int = 20) -> float:
    """Median per-call time of `n_calls` calls (fn(i)) captured in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(n_calls):  # warm-up: compile, allocate
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n_calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / n_calls)
    return statistics.median(times)


def _warm_up(dev: str, dt: torch.dtype, seconds: float = 0.5) -> None:
    """Keep the GPU busy for a moment first, so that the first rows are not timed at idle clocks
    (plain runs used to read 3-10% slower than the same kernels later in a --tune sweep)."""
    a = torch.randn(8192, 8192, device=dev, dtype=dt)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ a
    torch.cuda.synchronize()


def decode(args, rows: list) -> None:
    """Decode rows. Every timed candidate (SDPA's backends, lowbit's configs) is timed in ROUNDS
    interleaved rounds and its median kept, so a drift of the GPU's state during the run (clocks,
    what ran before) cannot favour whichever side happened to be timed first; the float references
    for the error columns are computed after all timing."""
    dev, dt = "cuda", getattr(torch, args.dtype)
    H, HKV, D = 32, 8, 128
    rounds = 3
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"\ndecode: GQA {H}/{HKV}, D = {D}, one query token, {args.dtype} queries; microseconds per call "
          f"(median of {rounds} interleaved rounds, CUDA graph)")
    print(f"{'B':>3} {'S':>6} {'SDPA bf16':>10} {'int8':>8} {'int4':>8} {'int4/tok':>8} {'x int8':>7} {'x int4':>7} "
          f"{'x int4/t':>8} {'err int8':>9} {'err int4':>9} {'err 4/tok':>9}")
    if args.tune:  # the token-major fast path (swap=True): warps, tile, stages, programs per SM, fused merge
        def mk(w, bn, st, pp, fused=True, **kw):
            return dict(num_warps=w, block_n=bn, num_stages=st, programs_per_sm=pp, fused=fused, **kw)
        tune = {"int8": [{}, mk(2, 128, 2, 4, False), mk(2, 128, 3, 2), mk(2, 128, 2, 3), mk(2, 128, 2, 5),
                         mk(1, 64, 2, 8), mk(1, 64, 3, 6), mk(1, 128, 2, 6)],
                "int4": [{}, mk(1, 64, 3, 8, False), mk(1, 64, 3, 10), mk(1, 128, 3, 4)],
                "int4t": [{}, mk(1, 128, 3, 4, False), mk(1, 128, 4, 4), mk(1, 128, 3, 3), mk(1, 128, 3, 6),
                          mk(1, 64, 3, 8), mk(1, 64, 4, 4), mk(1, 128, 2, 8), mk(1, 64, 3, 8, int_mma=True),
                          mk(2, 128, 3, 4, int_mma=True)]}
    else:
        tune = {"int8": [{}], "int4": [{}], "int4t": [{}]}
    # the float (bf16) cache through lowbit: flash-decoding (`decode_attention_float`, configs as
    # (block_n, num_warps, num_stages, programs_per_sm) + swap) and, for reference, the prefill kernel
    # at Sq = 1 (how lowbit attention decoded on a float cache before 2026-11-26)
    def fcfg(bn, w, st, pp, swap=False):
        return dict(config=(bn, w, st, pp), swap=swap)
    tune["float"] = ([{}, fcfg(64, 4, 2, 8), fcfg(128, 4, 3, 4), fcfg(64, 2, 3, 8), fcfg(32, 2, 3, 16),
                      fcfg(64, 4, 3, 8, True), fcfg(128, 4, 3, 4, True), fcfg(64, 4, 4, 6), fcfg(128, 8, 3, 2),
                      fcfg(32, 2, 3, 8), fcfg(32, 1, 3, 16), fcfg(64, 2, 3, 16), fcfg(128, 8, 2, 2),
                      fcfg(128, 4, 3, 2), fcfg(64, 2, 4, 8), fcfg(128, 8, 3, 2, True)]
                     if args.tune or args.float_tune else [{}])
    _warm_up(dev, dt)
    for B, S in args.decode_shapes:
        kv_bytes = 2 * B * HKV * S * D * 2
        copies = max(2, math.ceil(3 * l2 / kv_bytes))
        g = torch.Generator(device=dev).manual_seed(B * S)
        ks = [torch.randn(B, HKV, S, D, device=dev, dtype=dt, generator=g) for _ in range(copies)]
        vs = [torch.randn(B, HKV, S, D, device=dev, dtype=dt, generator=g) for _ in range(copies)]
        qs = [torch.randn(B, H, 1, D, device=dev, dtype=dt, generator=g) for _ in range(copies)]
        n_calls = 4 * copies
        cands = {}  # (side, name) -> fn(i); the MATH backend is left out (never the fastest, and huge)
        for name, be in (("default", None), ("FLASH", SDPBackend.FLASH_ATTENTION),
                         ("EFFICIENT", SDPBackend.EFFICIENT_ATTENTION), ("CUDNN", SDPBackend.CUDNN_ATTENTION)):
            def run(i, be=be):
                if be is None:
                    return F.scaled_dot_product_attention(qs[i % copies], ks[i % copies], vs[i % copies], enable_gqa=True)
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(qs[i % copies], ks[i % copies], vs[i % copies], enable_gqa=True)
            cands[("sdpa", name)] = run
        formats = {"int8": (8, None), "int4": (4, 32), "int4t": (4, None)}
        planes = {}
        for label, (bits, group) in formats.items():
            # values stored tile-blocked, as LowbitKVCache stores them for the fused kernel
            pl = [(quantize_kv(ks[i], bits, group), quantize_kv(vs[i], bits, group)) for i in range(copies)]
            planes[label] = [(kp, (block_tokens(vp[0]), vp[1])) for kp, vp in pl]
            for j, cfg in enumerate(tune[label]):
                def run(i, cfg=cfg, label=label, bits=bits):
                    (kd, ksc), (vd, vsc) = planes[label][i % copies]
                    return decode_attention_triton(qs[i % copies], kd, ksc, vd, vsc, S, bits=bits, **cfg)
                cands[(label, j)] = run
        for j, cfg in enumerate(tune["float"]):
            cands[("float", j)] = lambda i, cfg=cfg: decode_attention_float(qs[i % copies], ks[i % copies],
                                                                            vs[i % copies], **cfg)
        cands[("prefill1", 0)] = lambda i: flash_attention_triton(qs[i % copies], ks[i % copies], vs[i % copies])
        times: dict = {key: [] for key in cands}
        for _ in range(rounds if not args.tune else 1):
            for key, fn in cands.items():
                if times[key] is None:
                    continue
                try:
                    times[key].append(_graph_time_us(fn, n_calls))
                except ValueError:  # a combination the format does not allow
                    times[key] = None
                except Exception as e:
                    if key[0] in ("sdpa", "float", "prefill1") or args.tune:
                        print(f"   {key}: {type(e).__name__} {str(e)[:80]}")
                    times[key] = None
        med = {key: statistics.median(t) for key, t in times.items() if t}
        if args.tune:  # the sweep was one round: time the best of each side again, interleaved
            best = [min((k for k in med if k[0] == side), key=med.get) for side in ("sdpa", *formats, "float")]
            for key in best:
                times[key] = []
            for _ in range(rounds):
                for key in best:
                    times[key].append(_graph_time_us(cands[key], n_calls))
            for key, t in sorted(med.items(), key=lambda kv: (kv[0][0], kv[1])):
                print(f"   {key[0]} {key[1] if key[0] == 'sdpa' else tune[key[0]][key[1]]}: {t:.1f} us")
            med.update({key: statistics.median(times[key]) for key in best})
        sd_key = min((k for k in med if k[0] == "sdpa"), key=med.get)
        out = {"kind": "decode", "B": B, "S": S, "sdpa_us": med[sd_key], "sdpa_backend": sd_key[1], "rounds": rounds}
        if args.tune:  # what reading the int4/tok planes' bytes costs at all here: a torch sum over as many bytes
            nbytes = B * HKV * S * (D + 4)
            bufs = [torch.randn(nbytes // 2, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(copies)]
            out["read_floor_us"] = _graph_time_us(lambda i: bufs[i % copies].sum(dtype=torch.float32), n_calls)
            print(f"   read floor: torch sum over {nbytes / 1e6:.1f} MB: {out['read_floor_us']:.1f} us")
            del bufs
        ref_exact = attention_reference(qs[0].float(), ks[0].float(), vs[0].float())
        for label, (bits, group) in formats.items():
            key = min((k for k in med if k[0] == label), key=med.get)
            cfg = tune[label][key[1]]
            (kd, ksc), (vd, vsc) = planes[label][0]
            o = decode_attention_triton(qs[0], kd, ksc, vd, vsc, S, bits=bits, **cfg)
            ref_q = attention_reference(qs[0].float(), dequantize_kv(kd, ksc, bits, D),
                                        dequantize_kv(unblock_tokens(vd), vsc, bits, D))
            out[f"{label}_us"], out[f"{label}_config"] = med[key], cfg
            out[f"{label}_rounds_us"] = times[key]
            out[f"{label}_err_vs_float_cache"] = rel_err(o, ref_exact)
            out[f"{label}_err_vs_dequantized"] = rel_err(o, ref_q)
        out["sdpa_rounds_us"] = times[sd_key]
        fkeys = [k for k in med if k[0] == "float"]
        if args.float_tune and not args.tune:
            print("   float configs: " + ", ".join(f"{tune['float'][k[1]] or 'default'} {med[k]:.1f}"
                                                   for k in sorted(fkeys, key=med.get)))
        fkey = min(fkeys, key=med.get) if fkeys else None
        out["float_us"] = med[fkey] if fkey else None
        out["float_config"] = tune["float"][fkey[1]] if fkey else None
        out["float_err"] = (rel_err(decode_attention_float(qs[0], ks[0], vs[0], **out["float_config"]), ref_exact)
                            if fkey else None)
        out["prefill1_us"] = med.get(("prefill1", 0))
        rows.append(out)
        print(f"{B:>3} {S:>6} {out['sdpa_us']:>10.1f} {out['int8_us']:>8.1f} {out['int4_us']:>8.1f} {out['int4t_us']:>8.1f} "
              f"{out['sdpa_us'] / out['int8_us']:>6.2f}x {out['sdpa_us'] / out['int4_us']:>6.2f}x "
              f"{out['sdpa_us'] / out['int4t_us']:>7.2f}x {out['int8_err_vs_float_cache']:>9.2e} "
              f"{out['int4_err_vs_float_cache']:>9.2e} {out['int4t_err_vs_float_cache']:>9.2e}")
        print(f"     SDPA backend {sd_key[1]}; configs int8 {out['int8_config']} int4 {out['int4_config']} "
              f"int4/tok {out['int4t_config']}")
        pre = out["prefill1_us"]
        if fkey is None:
            print("     float cache through lowbit: flash-decoding failed")
        else:
            print(f"     float cache through lowbit: flash-decoding {out['float_us']:.1f} us "
                  f"({out['sdpa_us'] / out['float_us']:.2f}x SDPA, err {out['float_err']:.2e}, "
                  f"{out['float_config'] or 'default'}); prefill kernel at Sq = 1 "
                  + (f"{pre:.1f} us ({out['sdpa_us'] / pre:.2f}x)" if pre else "failed"))
        del ks, vs, qs, planes, cands
        torch.cuda.empty_cache()


def _interleaved_medians(cands: dict, n_calls: int, rounds: int = 3) -> dict:
    """Microseconds per call of each candidate (fn(i), `n_calls` calls in a CUDA graph), timed in
    `rounds` interleaved rounds; the medians by name."""
    times: dict = {key: [] for key in cands}
    for _ in range(rounds):
        for key, fn in cands.items():
            times[key].append(_graph_time_us(fn, n_calls))
    return {key: statistics.median(t) for key, t in times.items()}


def _causal_case(B: int, S: int, SQ: int, H: int, HKV: int, D: int, dt: torch.dtype, dev: str = "cuda"):
    """SQ query tokens against S cached keys on a bf16 / fp16 cache, causal aligned to the end:
    (copies, ks, vs, qs, sdpa): enough copies of the cache to rotate past the L2, and SDPA given
    the causal mask as a tensor (its `is_causal` aligns to the top left), a call on copy n."""
    copies = max(2, math.ceil(3 * torch.cuda.get_device_properties(0).L2_cache_size / (2 * B * HKV * S * D * 2)))
    g = torch.Generator(device=dev).manual_seed(B * S + SQ)
    ks = [torch.randn(B, HKV, S, D, device=dev, dtype=dt, generator=g) for _ in range(copies)]
    vs = [torch.randn(B, HKV, S, D, device=dev, dtype=dt, generator=g) for _ in range(copies)]
    qs = [torch.randn(B, H, SQ, D, device=dev, dtype=dt, generator=g) for _ in range(copies)]
    j, i = torch.arange(S, device=dev), torch.arange(SQ, device=dev)
    mask = (j[None, :] <= i[:, None] + (S - SQ))[None, None]

    def sdpa(n: int) -> torch.Tensor:
        return F.scaled_dot_product_attention(qs[n % copies], ks[n % copies], vs[n % copies], attn_mask=mask,
                                              enable_gqa=True)

    return copies, ks, vs, qs, sdpa


def drafts(args, rows: list) -> None:
    """A few query tokens at once on a float cache (speculative decoding's draft tokens; causal,
    aligned to the end of the cache): lowbit's flash-decoding (`decode_attention_float`, what
    `flash_attention` runs there) vs the prefill kernel (what it ran before) vs SDPA with the causal
    mask as a tensor (its `is_causal` aligns to the top left). GQA 32/8, D = 128; CUDA graph, median
    of 3 interleaved rounds."""
    dt = getattr(torch, args.dtype)
    H, HKV, D = 32, 8, 128
    print(f"\ndraft tokens on a float cache: GQA {H}/{HKV}, D = {D}, causal, {args.dtype}; microseconds per call")
    print(f"{'B':>3} {'S':>6} {'Sq':>3} {'SDPA+mask':>10} {'prefill':>8} {'lowbit':>8} {'x SDPA':>7} {'x prefill':>9} "
          f"{'err':>9}")
    for B, S in args.decode_shapes:
        for SQ in args.draft_tokens:
            copies, ks, vs, qs, sdpa = _causal_case(B, S, SQ, H, HKV, D, dt)
            cands = {
                "sdpa": sdpa,
                "prefill": lambda n: flash_attention_triton(qs[n % copies], ks[n % copies], vs[n % copies], causal=True),
                "lowbit": lambda n: decode_attention_float(qs[n % copies], ks[n % copies], vs[n % copies], causal=True)}
            med = _interleaved_medians(cands, 4 * copies)
            ref = attention_reference(qs[0].float(), ks[0].float(), vs[0].float(), causal=True)
            err = rel_err(cands["lowbit"](0), ref)
            rows.append({"kind": "drafts", "B": B, "S": S, "Sq": SQ, **{f"{k}_us": v for k, v in med.items()},
                         "err": err})
            print(f"{B:>3} {S:>6} {SQ:>3} {med['sdpa']:>10.1f} {med['prefill']:>8.1f} {med['lowbit']:>8.1f} "
                  f"{med['sdpa'] / med['lowbit']:>6.2f}x {med['prefill'] / med['lowbit']:>8.2f}x {err:>9.2e}")
            del ks, vs, qs, sdpa, cands
            torch.cuda.empty_cache()


def continuing(args, rows: list) -> None:
    """A prompt continuing a float cache (multi-turn chat, chunked prefill): Sq new tokens against
    Sk cached keys, causal aligned to the end. `flash_attention` (what `attention="lowbit"` runs;
    its choice in the last column) vs the prefill kernel and the split kernel in 64-row blocks
    (`run_float_decode`) it chooses between, vs SDPA given the causal mask as a tensor. Then the same
    on an int8 cache (one fp16 scale per token, values tile-blocked as `LowbitKVCache` keeps them):
    the split kernel on the planes (`decode_attention_triton`) vs the cache dequantized, then
    `flash_attention` (what the HF attention runs where `split_kernel_wins` says no, and ran for every
    such call before session 33). GQA 32/8, D = 128; CUDA graph, median of 3 interleaved rounds."""
    from lowbit.attention import flash_attention
    from lowbit.attention.triton_decode import SPLIT_ROWS, split_kernel_wins, run_float_decode

    dt = getattr(torch, args.dtype)
    H, HKV, D = 32, 8, 128
    print(f"\na prompt continuing a float cache: GQA {H}/{HKV}, D = {D}, causal, {args.dtype}; microseconds per call")
    print(f"{'B':>3} {'Sk':>6} {'Sq':>5} {'rows':>5} {'SDPA+mask':>10} {'prefill':>8} {'split':>8} {'lowbit':>8} "
          f"{'x SDPA':>7} {'x prefill':>9} {'err':>9}  chosen  {'int8: dequant+fa':>16} {'split':>7} {'x':>6}")
    for B, S in args.decode_shapes:
        for SQ in args.continue_tokens:
            copies, ks, vs, qs, sdpa = _causal_case(B, S, SQ, H, HKV, D, dt)
            rows_kv = SQ * H // HKV
            cands = {
                "sdpa": sdpa,
                "prefill": lambda n: flash_attention_triton(qs[n % copies], ks[n % copies], vs[n % copies], causal=True),
                "lowbit": lambda n: flash_attention(qs[n % copies], ks[n % copies], vs[n % copies], causal=True)}
            if rows_kv <= SPLIT_ROWS:
                cands["split"] = lambda n: run_float_decode(qs[n % copies], ks[n % copies], vs[n % copies], causal=True)
                q8 = [(quantize_kv(kk, 8), quantize_kv(vv, 8)) for kk, vv in zip(ks, vs)]
                q8 = [(kd, kscale, block_tokens(vd), vscale, vd) for (kd, kscale), (vd, vscale) in q8]

                def dequant_fa(n):
                    kd, kscale, _, vscale, vd = q8[n % copies]
                    return flash_attention(qs[n % copies], dequantize_kv(kd, kscale, 8, D, dt),
                                           dequantize_kv(vd, vscale, 8, D, dt), causal=True)

                cands["q8_before"] = dequant_fa
                cands["q8_split"] = lambda n: decode_attention_triton(qs[n % copies], *q8[n % copies][:4], S, bits=8,
                                                                      causal=True)
            med = _interleaved_medians(cands, 2 * copies)
            err = float("nan")
            if B * SQ * S <= 1 << 26:
                ref = attention_reference(qs[0].float(), ks[0].float(), vs[0].float(), causal=True)
                err = rel_err(cands["lowbit"](0), ref)
            chosen = "split" if rows_kv <= SPLIT_ROWS and split_kernel_wins(B, rows_kv, S) else "prefill"
            rows.append({"kind": "continuing", "B": B, "S": S, "Sq": SQ, **{f"{k}_us": v for k, v in med.items()},
                         "err": err, "chosen": chosen})
            split = f"{med['split']:>8.1f}" if "split" in med else f"{'-':>8}"
            q8col = (f"  {med['q8_before']:>16.1f} {med['q8_split']:>7.1f} {med['q8_before'] / med['q8_split']:>5.2f}x"
                     if "q8_split" in med else "")
            print(f"{B:>3} {S:>6} {SQ:>5} {rows_kv:>5} {med['sdpa']:>10.1f} {med['prefill']:>8.1f} {split} "
                  f"{med['lowbit']:>8.1f} {med['sdpa'] / med['lowbit']:>6.2f}x {med['prefill'] / med['lowbit']:>8.2f}x "
                  f"{err:>9.2e}  {chosen:7s}{q8col}", flush=True)
            del ks, vs, qs, sdpa, cands
            q8 = None
            torch.cuda.empty_cache()


def quantized_drafts(args, rows: list) -> None:
    """A few query tokens at once on an int8 / int4 cache (one fp16 scale per token, or per 32 values:
    "int4"), causal: the fast kernel (`_decode_split_vt` with (head, token) rows, tile-blocked values,
    as `LowbitKVCache` stores them) vs what these calls ran before session 33 ("before": the value
    plane copied back to d-major, then the generic kernel) and the generic kernel alone on d-major
    values vs one query token on the fast kernel (the floor a step of drafts can reach) vs SDPA on a
    bf16 cache with the causal mask.
    `--draft-configs`: extra `decode_attention_triton` keyword sets for the fast kernel (a sweep)."""
    dev, dt = "cuda", getattr(torch, args.dtype)
    H, HKV, D = 32, 8, 128
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    extra = [json.loads(c) for c in args.draft_configs]
    print(f"\ndraft tokens on a quantized cache: GQA {H}/{HKV}, D = {D}, causal, {args.dtype}; microseconds per call")
    print(f"{'fmt':>6} {'B':>3} {'S':>6} {'Sq':>3} {'SDPA+mask':>10} {'before':>8} {'generic':>8} {'fast':>8} "
          f"{'1 token':>8} {'x SDPA':>7} {'x before':>8} {'err':>9}" + "".join(f" {'cfg' + str(i):>8}" for i in range(len(extra))))
    for fmt, (bits, group) in (("int8", (8, None)), ("int4t", (4, None)), ("int4", (4, 32))):
        for B, S in args.decode_shapes:
            for SQ in args.draft_tokens:
                copies = max(2, math.ceil(3 * l2 / (B * HKV * S * D * bits // 4)))
                g = torch.Generator(device=dev).manual_seed(B * S + SQ)
                planes, floats = [], []
                for _ in range(copies):
                    k = torch.randn(B, HKV, S, D, device=dev, dtype=dt, generator=g)
                    v = torch.randn(B, HKV, S, D, device=dev, dtype=dt, generator=g)
                    (kd, ksc), (vd, vsc) = quantize_kv(k, bits, group), quantize_kv(v, bits, group)
                    planes.append((kd, ksc, vd, block_tokens(vd), vsc))
                    if len(floats) < max(2, math.ceil(3 * l2 / (4 * B * HKV * S * D))):
                        floats.append((k, v))
                qs = [torch.randn(B, H, SQ, D, device=dev, dtype=dt, generator=g) for _ in range(copies)]
                q1 = [q[:, :, -1:].contiguous() for q in qs]
                j, i = torch.arange(S, device=dev), torch.arange(SQ, device=dev)
                mask = (j[None, :] <= i[:, None] + (S - SQ))[None, None]
                nf = len(floats)
                cands = {
                    "sdpa": lambda n: F.scaled_dot_product_attention(qs[n % copies], *floats[n % nf], attn_mask=mask,
                                                                     enable_gqa=True),
                    "before": lambda n: decode_attention_triton(qs[n % copies], *planes[n % copies][:2],
                                                                unblock_tokens(planes[n % copies][3]),
                                                                planes[n % copies][4], S, bits=bits, causal=True),
                    "generic": lambda n: decode_attention_triton(qs[n % copies], *planes[n % copies][:3],
                                                                 planes[n % copies][4], S, bits=bits, causal=True),
                    "fast": lambda n: decode_attention_triton(qs[n % copies], *planes[n % copies][:2],
                                                              *planes[n % copies][3:], S, bits=bits, causal=True),
                    "one": lambda n: decode_attention_triton(q1[n % copies], *planes[n % copies][:2],
                                                             *planes[n % copies][3:], S, bits=bits)}
                for c, kw in enumerate(extra):
                    cands[f"cfg{c}"] = lambda n, kw=kw: decode_attention_triton(
                        qs[n % copies], *planes[n % copies][:2], *planes[n % copies][3:], S, bits=bits, causal=True, **kw)
                med = _interleaved_medians(cands, 4 * copies)
                kd, ksc, vd, _, vsc = planes[0]
                ref = attention_reference(qs[0].float(), dequantize_kv(kd, ksc, bits, D), dequantize_kv(vd, vsc, bits, D),
                                          causal=True)
                err = rel_err(cands["fast"](0), ref)
                assert rel_err(cands["generic"](0), ref) < 2e-2 and all(rel_err(cands[f"cfg{c}"](0), ref) < 2e-2
                                                                       for c in range(len(extra)))
                rows.append({"kind": "quantized_drafts", "format": fmt, "B": B, "S": S, "Sq": SQ,
                             **{f"{k}_us": v for k, v in med.items()}, "err": err})
                print(f"{fmt:>6} {B:>3} {S:>6} {SQ:>3} {med['sdpa']:>10.1f} {med['before']:>8.1f} {med['generic']:>8.1f} "
                      f"{med['fast']:>8.1f} {med['one']:>8.1f} {med['sdpa'] / med['fast']:>6.2f}x "
                      f"{med['before'] / med['fast']:>7.2f}x "
                      f"{err:>9.2e}" + "".join(f" {med[f'cfg{c}']:>8.1f}" for c in range(len(extra))), flush=True)
                del planes, floats, qs, q1
                torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["prefill", "decode", "drafts", "continue"])
    ap.add_argument("--continue-tokens", nargs="+", type=int, default=[32, 64, 128, 256], metavar="SQ",
                    help="new tokens per row of the continuing-prompt table (--only continue)")
    ap.add_argument("--draft-tokens", nargs="+", type=int, default=[4, 8], metavar="SQ",
                    help="query tokens per row of the drafts tables (--only drafts)")
    ap.add_argument("--draft-configs", nargs="*", default=[], metavar="JSON",
                    help="extra keyword sets for the quantized-cache drafts' fast kernel, e.g. "
                         "'{\"block_n\": 64, \"num_warps\": 4}'")
    ap.add_argument("--no-float-drafts", action="store_true", help="only the quantized-cache drafts table")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--tune", action="store_true", help="sweep kernel configs and report the best (slower)")
    ap.add_argument("--json", help="write all rows as JSON")
    ap.add_argument("--float-tune", action="store_true", help="sweep the float-cache decode's configs only")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved prefill rounds (median)")
    ap.add_argument("--decode-shapes", nargs="+", default=["1,8192", "8,8192", "32,4096"], metavar="B,S",
                    help="decode (batch, cache length) rows (default: the issue's three; e.g. add 1,1024 2,8192)")
    args = ap.parse_args()
    args.decode_shapes = [tuple(int(v) for v in s.split(",")) for s in args.decode_shapes]
    if not torch.cuda.is_available():
        sys.exit("benchmarks/attention.py needs a CUDA GPU (the CPU path is the reference, tested in tests/)")
    import triton

    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton {triton.__version__}")
    rows: list = []
    if args.only in (None, "prefill"):
        check(args, rows)
        prefill(args, rows)
    if args.only in (None, "decode"):
        decode(args, rows)
    if args.only == "continue":
        continuing(args, rows)
    if args.only == "drafts":
        if not args.no_float_drafts:
            drafts(args, rows)
        quantized_drafts(args, rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
