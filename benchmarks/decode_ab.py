"""A/B of the fused decode kernel: a git revision's `triton_decode.py` against the working tree's,
in one process, in interleaved rounds (same caches, same SDPA peer), on one GPU.

    python benchmarks/decode_ab.py                                   # HEAD vs working tree, defaults
    python benchmarks/decode_ab.py --rev HEAD~3 --shapes 8,8192 1,1024 --formats int4t
    python benchmarks/decode_ab.py --configs '{"programs_per_sm": 3}' '{"block_n": 64, "num_warps": 1}'
    python benchmarks/decode_ab.py --rev old --rev-file /path/to/old/triton_decode.py   # without git

Each row: the revision's defaults, the working tree's defaults, then the working tree with each
`--configs` dict of `decode_attention_triton` keyword arguments; us per call (median of --rounds
interleaved rounds, CUDA graph, caches rotating past the L2) and x SDPA (CUDNN backend, bf16 cache).
Before the timing, both sides' outputs are compared at a length that ends inside a tile, and each
side's relative error against fp32 attention over the float (unquantized) cache is printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import lowbit.attention.triton_decode as current  # noqa: E402
from attention import _graph_time_us, _warm_up  # noqa: E402
from lowbit.attention.reference import block_tokens, quantize_kv  # noqa: E402

FORMATS = {"int8": (8, None), "int4": (4, 32), "int4t": (4, None)}


def load_revision(rev: str, rev_file: str | None = None):
    """`triton_decode.py` as of git revision `rev` (or the copy `rev_file`), imported as a separate module."""
    if rev_file:
        src = Path(rev_file).read_text()
    else:
        res = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:src/lowbit/attention/triton_decode.py"],
                             capture_output=True, text=True)
        if res.returncode:
            sys.exit(f"decode_ab: git could not show {rev}'s triton_decode.py ({res.stderr.strip()}); "
                     f"pass a copy with --rev-file")
        src = res.stdout
    src = src.replace("from .reference import", "from lowbit.attention.reference import")
    src = src.replace("from ..kernels.", "from lowbit.kernels.")
    path = Path(tempfile.mkdtemp()) / "triton_decode_rev.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("triton_decode_rev", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", default="HEAD", help="git revision to compare against (default HEAD)")
    ap.add_argument("--rev-file", help="a copy of the old triton_decode.py to use instead of git "
                                       "(named --rev in the table)")
    ap.add_argument("--shapes", nargs="+", default=["8,8192", "32,4096", "1,8192"], metavar="B,S")
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--configs", nargs="*", default=[], metavar="JSON", help="extra kwargs dicts for the working tree")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/decode_ab.py needs a CUDA GPU")
    old = load_revision(args.rev, args.rev_file)
    sides = [(f"{args.rev} defaults", old, {}), ("tree defaults", current, {})]
    sides += [(f"tree {c}", current, json.loads(c)) for c in args.configs]
    dev, dt, H, HKV, D = "cuda", torch.bfloat16, 32, 8, 128
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"{torch.cuda.get_device_name(0)}: {args.rev} vs working tree, GQA {H}/{HKV}, D = {D}, bf16 queries")
    _warm_up(dev, dt, 1.0)
    for B, S in (tuple(int(v) for v in s.split(",")) for s in args.shapes):
        copies = max(2, math.ceil(3 * l2 / (2 * B * HKV * S * D * 2)))
        g = torch.Generator(device=dev).manual_seed(B * S)
        ks = [torch.randn(B, HKV, S, D, device=dev, dtype=dt, generator=g) for _ in range(copies)]
        vs = [torch.randn(B, HKV, S, D, device=dev, dtype=dt, generator=g) for _ in range(copies)]
        qs = [torch.randn(B, H, 1, D, device=dev, dtype=dt, generator=g) for _ in range(copies)]

        def sdpa(i):
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(qs[i % copies], ks[i % copies], vs[i % copies], enable_gqa=True)

        cands = {("SDPA", "cudnn"): sdpa}
        for fmt in args.formats:
            bits, group = FORMATS[fmt]
            planes = [(quantize_kv(ks[i], bits, group), quantize_kv(vs[i], bits, group)) for i in range(copies)]
            planes = [(kp, (block_tokens(vp[0]), vp[1])) for kp, vp in planes]
            for name, mod, kw in sides:
                def run(i, mod=mod, kw=kw, planes=planes, bits=bits, S=S):
                    (kd, ksc), (vd, vsc) = planes[i % copies]
                    return mod.decode_attention_triton(qs[i % copies], kd, ksc, vd, vsc, S, bits=bits, **kw)
                cands[(fmt, name)] = run
            (kd, ksc), (vd, vsc) = planes[0]
            n = max(1, S - 37)  # a length that ends inside a tile
            a = old.decode_attention_triton(qs[0], kd, ksc, vd, vsc, n, bits=bits).float()
            b = current.decode_attention_triton(qs[0], kd, ksc, vd, vsc, n, bits=bits).float()
            print(f"  ({B}, {S}) {fmt}: tree vs {args.rev}, relative difference {float((a - b).norm() / a.norm()):.2e}")
            kf, vf = ks[0][:, :, :n].float(), vs[0][:, :, :n].float()
            ref = F.scaled_dot_product_attention(qs[0].float(), kf, vf, enable_gqa=True)
            for name, mod, kw in sides:
                o = mod.decode_attention_triton(qs[0], kd, ksc, vd, vsc, n, bits=bits, **kw).float()
                print(f"    {name:<50} error vs the float cache {float((o - ref).norm() / ref.norm()):.3e}")
        times: dict = {key: [] for key in cands}
        for _ in range(args.rounds):
            for key, fn in cands.items():
                if times[key] is not None:
                    try:
                        times[key].append(_graph_time_us(fn, 4 * copies))
                    except Exception as e:  # a config the kernel refuses (shared memory, arguments)
                        print(f"  {key}: {type(e).__name__}: {str(e)[:100]}")
                        times[key] = None
        base = statistics.median(times[("SDPA", "cudnn")])
        print(f"(B, S) = ({B}, {S}): SDPA (CUDNN) {base:.1f} us")
        for (fmt, name), t in times.items():
            if fmt != "SDPA" and t:
                med = statistics.median(t)
                print(f"  {fmt:<6} {name:<50} {med:7.1f} us  {base / med:5.2f}x SDPA")
        del ks, vs, qs, cands
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
