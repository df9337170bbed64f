"""New tokens' keys and values quantized straight into a `LowbitKVLayer`'s planes: one Triton launch.

The reference path (`reference.quantize_kv`, then a copy into each plane) is about 14 small torch
ops per tensor; in a batch-1 decode step on a GPU each costs its launch, ~0.5 ms per layer on an
H200 host (benchmarks/RESULTS.md, 2026-11-25 session 22), more than the attention itself. This
kernel does the same arithmetic in one launch for keys and values together: per token and kv head,
per group of `GROUP` values of the head dim, s = max|x| / QMAX rounded to fp16 (the stored scale),
codes = round-half-even(x / s) clamped to +-QMAX, int4 codes offset by 8 and packed two per byte
(even dim in the low nibble). Divisions are IEEE round-to-nearest (`div_rn`), as torch's are, so the
planes are bit-identical to the reference's (tests/test_attention_kernels.py).

Plane layouts (contiguous): key codes (B, Hkv, cap, W), scales (B, Hkv, cap, D / GROUP) fp16,
value codes the same or tile-blocked (B, Hkv, cap / VBLK, W, VBLK) (`reference.block_tokens`);
W = D (int8) or D / 2 (int4).

Example (GPU, or CPU under TRITON_INTERPRET=1):
    >>> quantize_append_triton(layer.planes, layer.length, k_new, v_new, bits=8, group=64)  # doctest: +SKIP
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..kernels.launch import int_class, launch_remembered
from .reference import QMAX


@triton.jit
def _quantize_row(src, dst_codes, dst_scales, code_offs, scale_row,
                  D: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, QM: tl.constexpr):
    """One token's D values of one kv head -> its scales (at dst_scales + scale_row * NG) and codes
    (at dst_codes + code_offs, W of them)."""
    NG: tl.constexpr = D // GROUP
    x = tl.reshape(tl.load(src + tl.arange(0, D)).to(tl.float32), (NG, GROUP))
    s = tl.math.div_rn(tl.max(tl.abs(x), axis=1), QM * 1.0)
    s16 = tl.minimum(s, 65504.0).to(tl.float16)
    tl.store(dst_scales + scale_row * NG + tl.arange(0, NG), s16)
    sf = s16.to(tl.float32)
    sf = tl.where(sf > 0, sf, 1.0)
    # round half to even as torch.round does: adding and removing 1.5 * 2^23 leaves no fraction bits
    # (|x / s| <= QMAX here, far inside the trick's 2^22 range; each step is an IEEE fp32 add)
    c = (tl.math.div_rn(x, sf[:, None]) + 12582912.0) - 12582912.0
    c = tl.reshape(tl.minimum(tl.maximum(c, -QM * 1.0), QM * 1.0), (D,))
    if BITS == 8:
        codes = c.to(tl.int8)
    else:
        lo, hi = tl.split(tl.reshape((c + 8.0).to(tl.int32), (D // 2, 2)))
        codes = (lo | (hi << 4)).to(tl.uint8)
    tl.store(dst_codes + code_offs, codes)


@triton.jit
def _quantize_append(k_ptr, v_ptr, kd_ptr, ks_ptr, vd_ptr, vs_ptr, start, Hkv, cap,
                     s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                     D: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, QM: tl.constexpr,
                     VBLK: tl.constexpr):
    t = tl.program_id(0)  # the new token
    bh = tl.program_id(1)  # (batch, kv head)
    b = bh // Hkv
    h = bh % Hkv
    pos = start + t
    W: tl.constexpr = D if BITS == 8 else D // 2
    row = bh.to(tl.int64) * cap + pos
    w = tl.arange(0, W)
    _quantize_row(k_ptr + b.to(tl.int64) * s_kb + h * s_kh + t * s_kn, kd_ptr, ks_ptr, row * W + w, row,
                  D, GROUP, BITS, QM)
    if VBLK:  # tile-blocked values: block pos // VBLK, then dim w, then the token's place in the block
        v_offs = (bh.to(tl.int64) * (cap // VBLK) + pos // VBLK) * (W * VBLK) + w * VBLK + pos % VBLK
    else:
        v_offs = row * W + w
    _quantize_row(v_ptr + b.to(tl.int64) * s_vb + h * s_vh + t * s_vn, vd_ptr, vs_ptr, v_offs, row,
                  D, GROUP, BITS, QM)


def quantize_append_triton(planes: list[torch.Tensor], start: int, k: torch.Tensor, v: torch.Tensor, *,
                           bits: int, group: int | None, plans: dict | None = None) -> None:
    """Quantize k, v (B, Hkv, n, D) into tokens start .. start + n - 1 of `planes` ([key codes, key
    scales, value codes, value scales], fp16 scales, contiguous; value codes token-major 4-D or
    tile-blocked 5-D), as `reference.quantize_kv` would, in one launch. `plans`: a dict kept while
    the planes stay the same tensors, where the launch is remembered (`kernels.launch`)."""
    B, Hkv, n, D = k.shape
    kd, ks, vd, vs = planes
    cap = kd.shape[2]
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    grid = (n, B * Hkv)
    args = (k, v, kd, ks, vd, vs, start, Hkv, cap,
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2))
    consts = dict(D=D, GROUP=group or D, BITS=bits, QM=QMAX[bits], VBLK=vd.shape[-1] if vd.dim() == 5 else 0,
                  num_warps=1)
    key = None
    if plans is not None and not torch.compiler.is_compiling():  # slots k, v, start; planes by identity
        key = (grid, tuple(consts.values()), id(kd), id(ks), id(vd), id(vs), k.dtype, v.dtype, k.stride(), v.stride(),
               k.data_ptr() % 16 == 0, v.data_ptr() % 16 == 0, int_class(start))
    launch_remembered(plans, key, _quantize_append, grid, args, consts, slots=(0, 1, 6))
