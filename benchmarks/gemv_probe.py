"""Where the fast GEMV's time goes (GPU diagnostics): the kernel with parts switched off.

PROBE 0 full, 1 no decode (the words summed as floats: memory + loop only), 2 no scale loads,
3 no activation loads (masked). Same timing method as matmul.py (CUDA graph, copies past L2).
Run: PYTHONPATH=src python benchmarks/gemv_probe.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import lowbit  # noqa: E402
from lowbit.kernels import triton_linear as tlin  # noqa: E402
from matmul import copies_for, graph_time  # noqa: E402

for preset, shape in (("int4-e8m0", (8192, 8192)), ("int4-e8m0", (4096, 4096)), ("int8", (8192, 8192))):
    n, k = shape
    w = (torch.randn(n, k, device="cuda") * 0.02)
    qt = lowbit.quantize_tensor(w, preset)
    spec = tlin.spec_of(qt.fmt)
    c = copies_for(qt.nbytes)
    copies = [{p: (v.clone() if isinstance(v, torch.Tensor) else v) for p, v in tlin.kernel_planes(qt).items()}
              for _ in range(c)]
    xs = [torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _ in range(c)]
    for bn, nw, nwg in ((8, 4, 128), (16, 4, 32), (32, 4, 32), (32, 8, 32), (64, 8, 32)):
        cells = []
        for probe in (0, 1, 2):
            cfg = {"path": "gemv2", "BLOCK_N": bn, "num_warps": nw, "NWG": nwg, "PROBE": probe}
            try:
                t = graph_time([lambda i=i: tlin.run(xs[i], copies[i], spec, n, k, None, cfg=cfg) for i in range(c)], reps=5)
                cells.append(f"{t:7.1f}")
            except Exception as e:
                cells.append(f"{type(e).__name__[:7]:>7}")
        gb = qt.nbytes / 1e9
        print(f"{preset:<10} {n}x{k} BN={bn:<3} warps={nw} NWG={nwg}  us full/nodecode/noscale: {' '.join(cells)}"
              f"   (weights {gb * 1e3:.1f} MB)", flush=True)
