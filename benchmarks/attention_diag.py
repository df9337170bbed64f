"""Compiler facts for the decode kernels (registers, shared memory, spills, MMA kind, async copies).

    python benchmarks/attention_diag.py       # needs a CUDA GPU (compiles for the device present)
"""
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lowbit.attention.reference import quantize_kv  # noqa: E402
from lowbit.attention.triton_decode import _decode_split, _decode_split_vt, decode_attention_triton, token_major  # noqa: E402

q = torch.randn(8, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(8, 8, 1024, 128, device="cuda", dtype=torch.bfloat16)
for bits, group in ((8, None), (4, 32)):
    (kd, ks), (vd, vs) = quantize_kv(k, bits, group), quantize_kv(k, bits, group)
    decode_attention_triton(q, kd, ks, vd, vs, 1024, bits=bits)  # generic path (d-major values)
    for warps in (1, 2):
        for bn in (64, 128):
            decode_attention_triton(q, kd, ks, token_major(vd), vs, 1024, bits=bits, num_warps=warps, block_n=bn)
    decode_attention_triton(q, kd, ks, token_major(vd), vs, 1024, bits=bits, num_warps=4, swap=False)
for name, fn in (("generic", _decode_split), ("token-major", _decode_split_vt)):
    try:
        items = list(fn.device_caches[0][0].items())
    except Exception as e:  # the cache's shape differs between Triton versions
        print("no kernel cache access:", type(e).__name__, e)
        items = []
    for key, kern in items:
        asm = kern.asm
        ptx = asm.get("ptx", "")
        print(f"{name}: regs {kern.n_regs} spills {kern.n_spills} shared {kern.metadata.shared} warps {kern.metadata.num_warps} | "
              f"wgmma {ptx.count('wgmma.mma_async')} mma.sync {ptx.count('mma.sync')} cp.async {ptx.count('cp.async')} "
              f"ld.global.v4 {len(re.findall(r'ld.global[^;]*v4', ptx))} | {str(key)[-120:]}")
