"""Compiler facts for the decode kernel (registers, shared memory, spills, MMA kind, async copies)."""
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lowbit.attention.reference import quantize_kv  # noqa: E402
from lowbit.attention.triton_decode import _decode_split, decode_attention_triton  # noqa: E402

q = torch.randn(8, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(8, 8, 1024, 128, device="cuda", dtype=torch.bfloat16)
for bits, group in ((8, None), (4, 32)):
    (kd, ks), (vd, vs) = quantize_kv(k, bits, group), quantize_kv(k, bits, group)
    for swap in (False, True):
        decode_attention_triton(q, kd, ks, vd, vs, 1024, bits=bits, swap=swap)
try:
    items = list(_decode_split.device_caches[0][0].items())
except Exception as e:  # the cache's shape differs between Triton versions
    print("no kernel cache access:", type(e).__name__, e)
    items = []
for key, kern in items:
    asm = kern.asm
    ptx, ttgir = asm.get("ptx", ""), asm.get("ttgir", "")
    print(f"regs {kern.n_regs} spills {kern.n_spills} shared {kern.metadata.shared} | wgmma {ptx.count('wgmma.mma_async')} "
          f"mma.sync {ptx.count('mma.sync')} cp.async {ptx.count('cp.async')} ld.global.v4 {len(re.findall(r'ld.global[^;]*v4', ptx))} "
          f"convert_layout {ttgir.count('convert_layout')} local_alloc {ttgir.count('local_alloc')} | {str(key)[-160:]}")
