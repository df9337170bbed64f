"""The fast GEMV (path gemv2) config by config, next to bf16 cuBLAS and tinygemm (GPU diagnostics).

For each (K, N) shape: bf16 `F.linear` and tinygemm int4 g128 at M=1, then every preset x config
of `_gemv_fast_kernel` (BLOCK_N rows per program, warps, NWG groups of WPT words per iteration,
K split SPLIT_K ways), with PROBE 1 (no decode) and 2 (no scales) beside the full kernel when
`--probe` is given. Same timing method as matmul.py (CUDA
graph, weight copies past the L2).

With `--m 16 64`: the packed-nibble tensor-core path `dot4` instead (configs BN,BM,NB_T,warps,
STAGES,SPLIT_K[,XPERM]), next to bf16 and the table's current choice at that M.

Run: PYTHONPATH=src python benchmarks/gemv_probe.py [--presets int4-e8m0 int8] [--probe] [--m 16]
"""
import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import lowbit  # noqa: E402
from lowbit.kernels import triton_linear as tlin  # noqa: E402
from matmul import GPU_SHAPES, copies_for, graph_time, tinygemm_weight  # noqa: E402

# (BLOCK_N, num_warps, NWG, WPT[, SPLIT_K])
DEFAULT_CONFIGS = [(4, 1, 32, 4), (4, 2, 64, 4), (2, 1, 32, 4), (8, 1, 32, 4), (16, 4, 32, 4), (4, 1, 32, 4, 2),
                   (8, 1, 32, 2, 2), (8, 1, 32, 1, 4), (16, 1, 32, 1, 4), (16, 2, 64, 1, 4), (8, 1, 32, 1, 8)]

def plane_copies(qt) -> list[dict]:
    """Enough copies of the kernel planes of `qt` that cycling through them reads device memory."""
    return [{p: (v.clone() if isinstance(v, torch.Tensor) else v) for p, v in tlin.kernel_planes(qt).items()}
            for _ in range(copies_for(qt.nbytes))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["int4-e8m0"])
    ap.add_argument("--shapes", nargs="+", default=GPU_SHAPES, help="KxN")
    ap.add_argument("--configs", nargs="+", default=None, help="BN,warps,NWG,WPT[,SPLIT_K] (default: a grid)")
    ap.add_argument("--probe", action="store_true", help="also time PROBE 1 (no decode) and 2 (no scales)")
    ap.add_argument("--m", type=int, nargs="+", default=None, help="dot4 at these M instead of the GEMV at M=1")
    args = ap.parse_args()
    if args.m:
        return dot4_main(args)
    configs = [tuple(map(int, c.split(","))) for c in args.configs] if args.configs else DEFAULT_CONFIGS
    configs = [c + (1,) * (5 - len(c)) for c in configs]
    torch.manual_seed(0)
    for shape in args.shapes:
        k, n = map(int, shape.split("x"))
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        c = copies_for(n * k * 2)
        ws, xs = [w] + [w.clone() for _ in range(c - 1)], [x.clone() for _ in range(c)]
        t_bf16 = graph_time([lambda i=i: torch.nn.functional.linear(xs[i], ws[i]) for i in range(c)])
        del ws
        tiny = tinygemm_weight(w)
        c = copies_for(tiny[0].numel() * 4)
        tps, xs = [tiny] + [(tiny[0].clone(), tiny[1].clone()) for _ in range(c - 1)], [x.clone() for _ in range(c)]
        t_tiny = graph_time([lambda i=i: torch._weight_int4pack_mm(xs[i], tps[i][0], 128, tps[i][1]) for i in range(c)])
        del tps
        print(f"\nK={k} N={n} M=1: bf16 {t_bf16:.1f} us, tinygemm g128 {t_tiny:.1f} us", flush=True)
        for preset in args.presets:
            qt = lowbit.quantize_tensor(w.float(), preset)
            spec = tlin.spec_of(qt.fmt)
            copies = plane_copies(qt)
            c = len(copies)
            xs = [x.clone() for _ in range(c)]
            ref = torch.nn.functional.linear(x.float(), qt.dequantize().float())
            best = None
            for bn, nw, nwg, wpt, sk in configs:
                cells = []
                for probe in ((0, 1, 2) if args.probe else (0,)):
                    cfg = {"path": "gemv2", "BLOCK_N": bn, "num_warps": nw, "NWG": nwg, "WPT": wpt, "SPLIT_K": sk,
                           "PROBE": probe}
                    try:
                        t = graph_time([lambda i=i: tlin.run(xs[i], copies[i], spec, n, k, None, cfg=cfg)
                                        for i in range(c)], reps=5)
                        cells.append(f"{t:7.1f}")
                        if probe == 0:
                            y = tlin.run(x, copies[0], spec, n, k, None, cfg=cfg).float()
                            err = ((y - ref).norm() / ref.norm()).item()
                            if best is None or t < best[0]:
                                best = (t, (bn, nw, nwg, wpt, sk))
                    except Exception as e:  # noqa: BLE001 - a config that does not fit is reported, not fatal
                        cells.append(f"{type(e).__name__[:7]:>7}")
                        err = float("nan")
                print(f"  {preset:<10} BN={bn:<3} warps={nw} NWG={nwg:<3} WPT={wpt} SPLIT={sk:<2} us {' '.join(cells)}"
                      f"  x bf16 {t_bf16 / float(cells[0]) if cells[0].strip()[0].isdigit() else 0:5.2f}"
                      f"  x tiny {t_tiny / float(cells[0]) if cells[0].strip()[0].isdigit() else 0:5.2f}  err {err:.1e}",
                      flush=True)
            if best:
                print(f"  best {preset}: {best[0]:.1f} us {best[1]} = {t_bf16 / best[0]:.2f}x bf16, "
                      f"{t_tiny / best[0]:.2f}x tinygemm, {qt.nbytes / best[0] / 1e6:.2f} TB/s", flush=True)
            del copies
        torch.cuda.empty_cache()


# (BLOCK_N, BLOCK_M, NB_T, warps, STAGES, SPLIT_K, XPERM); configs whose BLOCK_M does not suit M are skipped
DOT4_CONFIGS = [(64, 16, 8, 4, 4, 4, 0), (64, 16, 8, 4, 4, 4, 1), (64, 16, 8, 4, 3, 2, 0), (64, 16, 8, 4, 3, 2, 1),
                (64, 16, 16, 4, 3, 2, 0), (64, 16, 16, 4, 3, 4, 0), (64, 16, 8, 4, 4, 8, 0), (128, 16, 8, 8, 4, 4, 0),
                (64, 16, 4, 4, 4, 4, 1), (64, 16, 8, 4, 6, 4, 1), (64, 32, 8, 4, 3, 2, 1),
                (64, 64, 8, 4, 3, 2, 1), (64, 64, 4, 4, 4, 2, 1), (64, 64, 8, 4, 3, 4, 1), (128, 64, 8, 8, 3, 2, 1),
                (64, 64, 8, 4, 4, 2, 1), (64, 64, 4, 4, 3, 2, 0), (128, 128, 4, 8, 3, 1, 1), (128, 128, 8, 8, 3, 1, 1),
                (64, 128, 4, 4, 3, 1, 1), (128, 256, 4, 8, 3, 1, 1), (64, 256, 4, 4, 3, 1, 1), (128, 128, 4, 8, 4, 2, 1)]


def dot4_main(args) -> None:
    configs = [tuple(map(int, c.split(","))) for c in args.configs] if args.configs else DOT4_CONFIGS
    configs = [c + (0,) * (7 - len(c)) for c in configs]
    torch.manual_seed(0)
    for shape in args.shapes:
        k, n = map(int, shape.split("x"))
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        c = copies_for(n * k * 2)
        ws = [w] + [w.clone() for _ in range(c - 1)]
        for preset in args.presets:
            qt = lowbit.quantize_tensor(w.float(), preset)
            spec = tlin.spec_of(qt.fmt)
            copies = plane_copies(qt)
            cq = len(copies)
            for m in args.m:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                xs = [x.clone() for _ in range(max(c, cq))]
                t_bf16 = graph_time([lambda i=i: torch.nn.functional.linear(xs[i], ws[i]) for i in range(c)])
                t_cur = graph_time([lambda i=i: tlin.run(xs[i], copies[i], spec, n, k, None) for i in range(cq)])
                ref = torch.nn.functional.linear(x.float(), qt.dequantize().float())
                print(f"\nK={k} N={n} M={m} {preset}: bf16 {t_bf16:.1f} us, table's choice "
                      f"{tlin.choose(spec, m, k, n)['path']} {t_cur:.1f} us ({t_bf16 / t_cur:.2f}x)", flush=True)
                best = None
                for bn, bm, nbt, nw, st, sk, xp in configs:
                    if not args.configs and not tlin.dot4_tile_suits(bm, m):
                        continue
                    cfg = {"path": "dot4", "BLOCK_N": bn, "BLOCK_M": bm, "NB_T": nbt, "num_warps": nw, "STAGES": st,
                           "SPLIT_K": sk, "XPERM": bool(xp)}
                    try:
                        t = graph_time([lambda i=i: tlin.run(xs[i], copies[i], spec, n, k, None, cfg=cfg)
                                        for i in range(cq)], reps=5)
                        y = tlin.run(x, copies[0], spec, n, k, None, cfg=cfg).float()
                        err = ((y - ref).norm() / ref.norm()).item()
                        best = min(best or (t, cfg), (t, cfg), key=lambda r: r[0])
                        print(f"  dot4 BN={bn:<3} BM={bm:<3} NB_T={nbt} warps={nw} STAGES={st} SPLIT={sk} XPERM={xp}  {t:7.1f} us"
                              f"  x bf16 {t_bf16 / t:5.2f}  err {err:.1e}", flush=True)
                    except Exception as e:  # noqa: BLE001 - a config that does not fit is reported, not fatal
                        print(f"  dot4 {cfg}: {type(e).__name__} {str(e)[:100]}", flush=True)
                if best:
                    print(f"  best dot4 {preset} M={m}: {best[0]:.1f} us = {t_bf16 / best[0]:.2f}x bf16 {best[1]}", flush=True)
            del copies
        del ws
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
