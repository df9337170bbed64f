"""Tensor-core matmul for 4-bit integer codes (M = 5..256): nibbles decoded four at a time by PTX.

Only imported when Triton is importable (through `triton_linear._kern`). The general `_dot_kernel`
(triton_kernels.py) decodes every code to fp32, scales it and converts it to the MMA dtype: about 8
instructions a weight, which caps it near 2 T weights/s. Here a byte tile goes through one inline
PTX block per 4 bytes (8 codes):

    prmt  t, b, 0, 0x4140          -> bytes (b0, 0, b1, 0): one byte in each 16-bit half
    lop3  v, t, 0x000F000F, MAGIC  -> 16-bit pair (MAGIC + lo(b0) / 8, MAGIC + lo(b1) / 8)
    fma   v, v, 1, -(MAGIC + off/8) -> exact pair ((lo(b0) - off) / 8, (lo(b1) - off) / 8)

(the high nibbles the same after a 4-bit shift; MAGIC = 16.0 in bf16 or 128.0 in fp16, where the
unit in the last place is 1/8, as in triton_gemv.py). 16 instructions for 8 weights; the (c - off) / 8
are exact in the MMA dtype; one more pair FMA applies the block's scale (times 8) and zero point,
rounding once to the weight in the MMA dtype (as dequantize-then-cast would). The low and high
nibble tiles are joined back into column order and fed to one `tl.dot` per iteration (NB_T scale
blocks), accumulating in fp32. Weights are the wide operand (W @ x^T, BLOCK_N rows by BLOCK_M
activations), split-K with the last-arriving program reducing.

Under TRITON_INTERPRET=1 (no inline assembly) `ASM=False` decodes the nibbles with plain Triton in
fp32 (the interpreter's bf16 dot is wrong, so DOT_DTYPE is fp32 there).

Formats: 4-bit symmetric (CODE 0: v = c - 8) or affine (CODE 2: w = c * s + z) codes with a scale
per block (fp16 / bf16 / fp32, SMODE 1, or E8M0, SMODE 2).
"""

from __future__ import annotations

import triton
import triton.language as tl

from lowbit.kernels.triton_modes import kernel_module

# the split-K epilogue, compiled in this module's mode
split_k_total = kernel_module("triton_split_k").split_k_total
clamped_range = kernel_module("triton_tile").clamped_range
split_blocks = kernel_module("triton_tile").split_blocks


def _asm_nibbles(f16: bool, off: int) -> str:
    """PTX: $0, $1 = the low nibbles of the 4 bytes in $4 as 16-bit ((c - off) / 8) * s + z, two per
    register (byte 0 in the low half of $0); $2, $3 = the high nibbles. $5, $6 hold the scales of
    the 4 bytes as pairs (bytes 0-1, 2-3), $7, $8 the zero points."""
    magic16 = 0x5800 if f16 else 0x4180
    neg16 = (magic16 + off) | 0x8000  # -(MAGIC + off / 8): same exponent, so the bits add
    one16 = 0x3C00 if f16 else 0x3F80
    ty = "f16x2" if f16 else "bf16x2"
    lines = ["{", ".reg .b32 t, u, v, mg, ng, one;",
             f"mov.b32 mg, {hex(magic16 * 0x10001)};", f"mov.b32 ng, {hex(neg16 * 0x10001)};",
             f"mov.b32 one, {hex(one16 * 0x10001)};"]
    for out_lo, out_hi, sel, sc, zp in (("$0", "$2", "0x4140", "$5", "$7"), ("$1", "$3", "0x4342", "$6", "$8")):
        lines += [f"prmt.b32 t, $4, 0, {sel};",            # two bytes, one per 16-bit half
                  "shr.b32 u, t, 4;",
                  "lop3.b32 v, t, 0x000F000F, mg, 0xEA;",  # (t & mask) | magic
                  f"fma.rn.{ty} v, v, one, ng;",           # exact (c - off) / 8
                  f"fma.rn.{ty} {out_lo}, v, {sc}, {zp};",  # one rounding: the weight in 16 bits
                  "lop3.b32 v, u, 0x000F000F, mg, 0xEA;",
                  f"fma.rn.{ty} v, v, one, ng;",
                  f"fma.rn.{ty} {out_hi}, v, {sc}, {zp};"]
    lines.append("}")
    return "\n".join(lines)


@triton.jit
def _nibbles(b, sc, zp, F16: tl.constexpr, SIGNED: tl.constexpr, ASM: tl.constexpr, DT: tl.constexpr,
             NIB_ASM: tl.constexpr):
    """(low, high) nibble weights ((c - off) / 8) * sc + zp of the uint8 tile `b` in DT (off = 8 if
    SIGNED); `sc`, `zp`: DT tiles of b's shape (the block's scale times 8, its zero point); NIB_ASM:
    `_asm_nibbles(F16, off)`, chosen by the host."""
    if ASM:
        if F16:
            lo, hi = tl.inline_asm_elementwise(NIB_ASM, "=r,=r,=r,=r,r,r,r,r,r", [b, sc, zp],
                                               dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
        else:
            lo, hi = tl.inline_asm_elementwise(NIB_ASM, "=r,=r,=r,=r,r,r,r,r,r", [b, sc, zp],
                                               dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        bi = b.to(tl.int32)
        off: tl.constexpr = 8 if SIGNED else 0
        lo = ((bi & 15) - off).to(tl.float32) * 0.125 * sc.to(tl.float32) + zp.to(tl.float32)
        hi = ((bi >> 4) - off).to(tl.float32) * 0.125 * sc.to(tl.float32) + zp.to(tl.float32)
    return lo.to(DT), hi.to(DT)


@triton.jit
def _dot4_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
                 M, N, K, KB, stride_xm, stride_wn, stride_sn, stride_ym, blocks_per_split,
                 SIGNED: tl.constexpr, SMODE: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SMUL: tl.constexpr, BB: tl.constexpr, NB_T: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_M: tl.constexpr, SPLIT_K: tl.constexpr, STAGES: tl.constexpr, F16: tl.constexpr,
                 ASM: tl.constexpr, DOT_DTYPE: tl.constexpr, NIB_ASM: tl.constexpr = ""):
    """y[ms, rows] = x[ms] @ W[rows]^T: BLOCK_N weight rows x BLOCK_M activation rows, NB_T scale
    blocks of BB bytes per iteration, blocks [pid_k * blocks_per_split, ...) of K; SMUL: the
    decode's 8 times the format constant."""
    BK: tl.constexpr = 2 * BB  # codes per scale block
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows, rmask, rows_c = clamped_range(pid_n, BLOCK_N, N)
    ms, mmask, ms_c = clamped_range(pid_m, BLOCK_M, M)
    blk_lo, blk_hi = split_blocks(pid_k, blocks_per_split, KB, BB)
    w_row = w_ptr + rows_c.to(tl.int64) * stride_wn
    s_row = s_ptr + rows_c.to(tl.int64) * stride_sn
    z_row = z_ptr + rows_c.to(tl.int64) * stride_sn
    x_rows = x_ptr + ms_c.to(tl.int64) * stride_xm
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    # this split's end as column / byte limits (blocks past blk_hi read nothing)
    k_lim = tl.minimum(K, blk_hi * BK)
    kb_lim = tl.minimum(KB, blk_hi * BB)
    jb = tl.arange(0, NB_T)
    for blk0 in tl.range(blk_lo, blk_hi, NB_T, num_stages=STAGES):
        blk = blk0 + jb
        bmask = (rows * 0 + blk0)[:, None] + jb[None, :] < blk_hi  # [BLOCK_N, NB_T]
        byte = blk[:, None] * BB + tl.arange(0, BB)[None, :]  # [NB_T, BB]
        b = tl.load(w_row[:, None, None] + byte[None, :, :], mask=(byte < kb_lim)[None, :, :], other=0)
        s = tl.load(s_row[:, None] + blk[None, :], mask=bmask, other=0)
        if SMODE == 2:
            s = (s.to(tl.int32) << 23).to(tl.float32, bitcast=True)
        s = (s.to(tl.float32) * SMUL).to(DOT_DTYPE)
        if HAS_ZERO:
            z = tl.load(z_row[:, None] + blk[None, :], mask=bmask, other=0).to(DOT_DTYPE)
        else:
            z = s * 0
        lo, hi = _nibbles(b, tl.broadcast_to(s[:, :, None], [BLOCK_N, NB_T, BB]),
                          tl.broadcast_to(z[:, :, None], [BLOCK_N, NB_T, BB]), F16, SIGNED, ASM, DOT_DTYPE,
                          NIB_ASM)
        wv = tl.join(lo, hi).reshape(BLOCK_N, NB_T * BK)  # byte j holds columns 2j (low) and 2j + 1
        kk = blk0 * BK + tl.arange(0, NB_T * BK)
        xt = tl.load(x_rows[None, :] + kk[:, None], mask=(kk < k_lim)[:, None] & mmask[None, :], other=0.0)
        acc = tl.dot(wv, xt.to(DOT_DTYPE), acc)
    offs = ms_c.to(tl.int64)[None, :] * stride_ym + rows[:, None]
    omask = rmask[:, None] & mmask[None, :]
    last = True
    if SPLIT_K > 1:  # fp32 partials to the workspace; the last program on this tile writes y
        tile = pid_m * tl.num_programs(0) + pid_n
        last, acc = split_k_total(ws_ptr, cnt_ptr, acc, ms_c[None, :] * N + rows[:, None], omask, pid_k, tile, M * N,
                                  SPLIT_K)
    if last:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows_c, mask=rmask, other=0).to(tl.float32)[:, None]
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=omask)
