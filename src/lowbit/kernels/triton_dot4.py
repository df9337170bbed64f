"""Tensor-core matmul for packed codes (M = 2..256): the codes reach the MMA straight from shared
memory, decoded in the registers of the MMA's operand layout. Formats: 4- and 2-bit integer codes
(symmetric or affine), e2m1 (mxfp4), int8 codes (a scale per block or per row), fp8 (mxfp8).

Only imported when Triton is importable (through `triton_linear._kern`). The general `_dot_kernel`
(triton_kernels.py) decodes every code to fp32 in a blocked layout, scales it, converts it to the
MMA dtype and then moves the tile into the MMA's operand layout: about 8 instructions a weight,
which caps it near 2 T weights/s. Here nothing but elementwise work lies between the load of the
codes and `tl.dot`, so Triton moves the layout conversion before the decode: the raw code tile is
copied into shared memory (cp.async, pipelined), read back with ldmatrix directly in the operand
layout of the (wgmma) product, and decoded there, in registers, by one PTX block per 32-bit word.

Byte layout. The stored data plane (N, K/2) uint8 holds code 2j in the low nibble of byte j and
code 2j+1 in its high nibble; read as uint16 (little-endian), element u holds codes 4u + i in its
bits 4i..4i+3 (i = 0..3). The kernel decodes each nibble position i into its own tile n_i
[BLOCK_N, BKU] (columns 4u + i) and contracts it with the matching strided columns of x:

    y = sum_i n_i @ x[:, i::4]^T        (four products per iteration, no shuffles of the codes)

8-bit planes (N, K) read as uint16 hold codes 2u and 2u + 1 in their two bytes: two positions,
y = n_0 @ x[:, 0::2]^T + n_1 @ x[:, 1::2]^T (NPOS = 2); 2-bit planes hold codes 8u + p in bits
2p..2p+1: eight positions (NPOS = 8, `_crumb_products`).

Decode (PTX from `nibble_ptx`, per 32-bit word = two uint16 elements):
    4-bit integers (`asm_nibbles`; 2-bit ones the same with 2-bit fields and off = 2):
    shr     t, w, 4i                      nibble i of each 16-bit half to its bits 0..3
    lop3    v, t, 0x000F000F, MAGIC       v = MAGIC + c, exact (MAGIC = 128.0 in bf16, 1024.0 in fp16,
                                          where the unit in the last place is 1)
    fma     out, v, s, -(MAGIC + off) s   bf16 with E8M0 scales: exact, one instruction
    or: fma t, v, 1, -(MAGIC + off); fma out, t, s, z   (other scales / zero points: c - off is exact,
                                          then one rounding to the weight in 16 bits)
    where off = 8 for symmetric codes (v = c - 8) and 0 for affine ones (w = c s + z).
    e2m1 (`asm_fp4`): the three magnitude bits placed as a 16-bit float's lowest exponent bits and
    top mantissa bit, the sign as its sign, then two multiplies (by 2^126 / 2^14: exact, the e2m1
    value; by the scale).
    int8 (`asm_bytes`): fp16 1024 + (c ^ 0x80) by PRMT, minus 1152; bf16 (8 significant bits) by
    its two nibbles, 16 (128 + hi) - 2304 + (128 + lo), each step exact.
    fp8 (`asm_fp8`): as e2m1, seven bits placed and the sign, then the two multiplies.
The scale (and zero point) of each element comes in as a tile of the codes' shape, broadcast from
one value per block; per-row scales (int8) multiply the sums after the loop instead.

Under TRITON_INTERPRET=1 (no inline assembly) `ASM=False` decodes with plain Triton in fp32 (the
interpreter's bf16 dot is wrong, so DOT_DTYPE is fp32 there).
"""

from __future__ import annotations

import triton
import triton.language as tl

from lowbit.kernels.triton_modes import kernel_module

# the split-K epilogue, compiled in this module's mode
split_k_total = kernel_module("triton_split_k").split_k_total
clamped_range = kernel_module("triton_tile").clamped_range


@triton.jit
def _e2m1(c):
    """fp32 value of the e2m1 codes c (int32, 0..15: sign, e1, e0, m), the twin of `asm_fp4`."""
    e = (c >> 1) & 3
    m = (c & 1).to(tl.float32)
    mag = tl.where(e == 0, 0.5 * m, tl.math.exp2((e - 1).to(tl.float32)) * (1.0 + 0.5 * m))
    return tl.where((c & 8) != 0, -mag, mag)


@triton.jit
def _fp8(c, E5M2: tl.constexpr):
    """fp32 value of the fp8 codes c (int32, 0..255; e4m3 or e5m2), the twin of `asm_fp8`."""
    MB: tl.constexpr = 2 if E5M2 else 3
    BIAS: tl.constexpr = 15 if E5M2 else 7
    e = (c >> MB) & ((1 << (7 - MB)) - 1)
    m = (c & ((1 << MB) - 1)).to(tl.float32) * (1.0 / (1 << MB))
    mag = tl.where(e == 0, m * tl.math.exp2(1.0 - BIAS), tl.math.exp2((e - BIAS).to(tl.float32)) * (1.0 + m))
    return tl.where((c & 128) != 0, -mag, mag)


@triton.jit
def _nibbles(w, s, z, CODE: tl.constexpr, ASM: tl.constexpr, DT: tl.constexpr, NIB_ASM: tl.constexpr):
    """The code-position tiles (DT, w's shape) of the uint16 tile `w` (held as int16): four nibble
    positions n_i = (c_i - off) * s + z (CODE 0: off 8; 2: affine, off 0, + z), or e2m1 values
    times s (CODE 3); two byte positions for int8 codes (CODE 1: n_0, n_1 = c_j * s, returned as
    n_0, n_1, n_0, n_1) and fp8 codes (CODE 4 e4m3, 5 e5m2: their values times s). s, z: DT tiles
    of w's shape; NIB_ASM: the `nibble_ptx` text from the host (2-bit codes: `_crumbs`)."""
    if ASM:
        if CODE == 1 or CODE == 4 or CODE == 5:
            if DT == tl.float16:
                n0, n1 = tl.inline_asm_elementwise(NIB_ASM, "=r,=r,r,r,r", [w, s, z], dtype=(tl.float16, tl.float16),
                                                   is_pure=True, pack=2)
            else:
                n0, n1 = tl.inline_asm_elementwise(NIB_ASM, "=r,=r,r,r,r", [w, s, z],
                                                   dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)
            n2 = n0
            n3 = n1
        elif DT == tl.float16:
            n0, n1, n2, n3 = tl.inline_asm_elementwise(NIB_ASM, "=r,=r,=r,=r,r,r,r", [w, s, z],
                                                       dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
                                                       is_pure=True, pack=2)
        else:
            n0, n1, n2, n3 = tl.inline_asm_elementwise(NIB_ASM, "=r,=r,=r,=r,r,r,r", [w, s, z],
                                                       dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16),
                                                       is_pure=True, pack=2)
    else:
        wi = w.to(tl.int32)
        sf = s.to(tl.float32)
        if CODE == 2:
            off = 0
            zf = z.to(tl.float32)
        else:  # z is not used (see the PTX)
            off = 8
            zf = sf * 0.0
        if CODE == 1:  # bytes, two's complement
            n0 = ((((wi & 255) ^ 128) - 128).to(tl.float32) * sf).to(DT)
            n1 = (((((wi >> 8) & 255) ^ 128) - 128).to(tl.float32) * sf).to(DT)
            n2 = n0
            n3 = n1
        elif CODE == 4 or CODE == 5:
            n0 = (_fp8(wi & 255, CODE == 5) * sf).to(DT)
            n1 = (_fp8((wi >> 8) & 255, CODE == 5) * sf).to(DT)
            n2 = n0
            n3 = n1
        elif CODE == 3:
            n0 = (_e2m1(wi & 15) * sf).to(DT)
            n1 = (_e2m1((wi >> 4) & 15) * sf).to(DT)
            n2 = (_e2m1((wi >> 8) & 15) * sf).to(DT)
            n3 = (_e2m1((wi >> 12) & 15) * sf).to(DT)
        else:
            n0 = (((wi & 15) - off).to(tl.float32) * sf + zf).to(DT)
            n1 = ((((wi >> 4) & 15) - off).to(tl.float32) * sf + zf).to(DT)
            n2 = ((((wi >> 8) & 15) - off).to(tl.float32) * sf + zf).to(DT)
            n3 = ((((wi >> 12) & 15) - off).to(tl.float32) * sf + zf).to(DT)
    return n0, n1, n2, n3


@triton.jit
def _crumbs(w, s, z, CODE: tl.constexpr, ASM: tl.constexpr, DT: tl.constexpr, NIB_ASM: tl.constexpr):
    """The eight 2-bit position tiles (DT, w's shape) of the uint16 tile `w`: c_p = (code p - off) s
    + z (bits 2p..2p+1; CODE 0: off 2, CODE 2: affine, off 0, + z); NIB_ASM: `asm_nibbles(..., bits=2)`."""
    if ASM:
        if DT == tl.float16:
            c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
                NIB_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r", [w, s, z], dtype=(tl.float16,) * 8, is_pure=True, pack=2)
        else:
            c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
                NIB_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r", [w, s, z], dtype=(tl.bfloat16,) * 8, is_pure=True, pack=2)
    else:
        wi = w.to(tl.int32)
        sf = s.to(tl.float32)
        if CODE == 2:
            off = 0
            zf = z.to(tl.float32)
        else:
            off = 2
            zf = sf * 0.0
        c0 = (((wi & 3) - off).to(tl.float32) * sf + zf).to(DT)
        c1 = ((((wi >> 2) & 3) - off).to(tl.float32) * sf + zf).to(DT)
        c2 = ((((wi >> 4) & 3) - off).to(tl.float32) * sf + zf).to(DT)
        c3 = ((((wi >> 6) & 3) - off).to(tl.float32) * sf + zf).to(DT)
        c4 = ((((wi >> 8) & 3) - off).to(tl.float32) * sf + zf).to(DT)
        c5 = ((((wi >> 10) & 3) - off).to(tl.float32) * sf + zf).to(DT)
        c6 = ((((wi >> 12) & 3) - off).to(tl.float32) * sf + zf).to(DT)
        c7 = ((((wi >> 14) & 3) - off).to(tl.float32) * sf + zf).to(DT)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _crumb_products(w, s, z, xk, x_rows, u, u_hi, mmask, plane, acc, CODE: tl.constexpr, ASM: tl.constexpr,
                    DT: tl.constexpr, NIB_ASM: tl.constexpr, XPERM: tl.constexpr, BLOCK_M: tl.constexpr,
                    BKU: tl.constexpr):
    """acc + the eight products of 2-bit codes (`_crumbs`) with x's columns 8u + p: from the host's
    split planes (XPERM, `plane` elements apart) or split here (column 8u + 4a + 2b + c = position
    p = 4a + 2b + c)."""
    c0, c1, c2, c3, c4, c5, c6, c7 = _crumbs(w, s, z, CODE, ASM, DT, NIB_ASM)
    if XPERM:
        xt = x_rows[None, :] + u[:, None]
        xmask = (u < u_hi)[:, None] & mmask[None, :]
        acc = tl.dot(c0, tl.load(xt, mask=xmask, other=0.0).to(DT), acc)
        acc = tl.dot(c1, tl.load(xt + plane, mask=xmask, other=0.0).to(DT), acc)
        acc = tl.dot(c2, tl.load(xt + 2 * plane, mask=xmask, other=0.0).to(DT), acc)
        acc = tl.dot(c3, tl.load(xt + 3 * plane, mask=xmask, other=0.0).to(DT), acc)
        acc = tl.dot(c4, tl.load(xt + 4 * plane, mask=xmask, other=0.0).to(DT), acc)
        acc = tl.dot(c5, tl.load(xt + 5 * plane, mask=xmask, other=0.0).to(DT), acc)
        acc = tl.dot(c6, tl.load(xt + 6 * plane, mask=xmask, other=0.0).to(DT), acc)
        acc = tl.dot(c7, tl.load(xt + 7 * plane, mask=xmask, other=0.0).to(DT), acc)
    else:
        xc0, xc1 = tl.split(xk.to(DT).reshape(BLOCK_M, BKU, 2, 2, 2))  # c = 0 / 1
        xb00, xb01 = tl.split(xc0)  # b = 0 / 1
        xb10, xb11 = tl.split(xc1)
        x0, x4 = tl.split(xb00)  # a = 0 / 1
        x2, x6 = tl.split(xb01)
        x1, x5 = tl.split(xb10)
        x3, x7 = tl.split(xb11)
        acc = tl.dot(c0, tl.trans(x0), acc)
        acc = tl.dot(c1, tl.trans(x1), acc)
        acc = tl.dot(c2, tl.trans(x2), acc)
        acc = tl.dot(c3, tl.trans(x3), acc)
        acc = tl.dot(c4, tl.trans(x4), acc)
        acc = tl.dot(c5, tl.trans(x5), acc)
        acc = tl.dot(c6, tl.trans(x6), acc)
        acc = tl.dot(c7, tl.trans(x7), acc)
    return acc


@triton.jit
def _x_and_scales(x_rows, s_row, z_row, mmask, u0, u_hi, k_lim, UB: tl.constexpr, NB_T: tl.constexpr,
                  BKU: tl.constexpr, HAS_ZERO: tl.constexpr, XPERM: tl.constexpr, NPOS: tl.constexpr,
                  ROW_SCALE: tl.constexpr):
    """The activation tile [BLOCK_M, NPOS BKU] (columns NPOS u0 ...; a placeholder with XPERM) and
    the raw scale / zero tiles [BLOCK_N, NB_T] (the placeholder s for z without zero points; both
    placeholders with ROW_SCALE, whose scales are applied after the loop) of the iteration at u0
    (zeros past u_hi)."""
    if XPERM:
        xk = mmask
    else:
        kk = NPOS * u0 + tl.arange(0, NPOS * BKU)
        xk = tl.load(x_rows[:, None] + kk[None, :], mask=mmask[:, None] & (kk < k_lim)[None, :], other=0.0)
    if ROW_SCALE:
        s = mmask
        z = mmask
    else:
        blk = u0 // UB + tl.arange(0, NB_T)
        bmask = (blk * UB < u_hi)[None, :]
        s = tl.load(s_row[:, None] + blk[None, :], mask=bmask, other=0)
        if HAS_ZERO:
            z = tl.load(z_row[:, None] + blk[None, :], mask=bmask, other=0)
        else:
            z = s
    return xk, s, z


@triton.jit
def _dot4_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
                 M, N, K, KU, stride_xm, stride_wn, stride_sn, stride_ym, iters_per_split,
                 CODE: tl.constexpr, SMODE: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SMUL: tl.constexpr, UB: tl.constexpr, NB_T: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_M: tl.constexpr, SPLIT_K: tl.constexpr, STAGES: tl.constexpr, ASM: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, XPERM: tl.constexpr = False, NIB_ASM: tl.constexpr = "",
                 BITS: tl.constexpr = 4):
    """y[ms, rows] = x[ms] @ W[rows]^T: BLOCK_N weight rows x BLOCK_M activation rows; per iteration
    NB_T scale blocks of UB uint16 elements (NPOS UB codes each: 4 nibbles, 2 bytes (BITS 8) or 8
    2-bit codes (BITS 2)); split `pid_k` covers iterations [pid_k * iters_per_split, ...) of the
    KU uint16 elements per row; SMUL: the format's constant factor (folded into the scale). SMODE 3 (one
    scale per row): the codes go to the products unscaled and the scale multiplies the sums.
    XPERM: x comes split by code position, (NPOS, M, KU) contiguous (x_perm[i, m, u] = x[m,
    NPOS u + i], made by the host): its tiles then feed the products straight from shared memory,
    in Triton's cp.async pipeline (better where x tiles are large, M >= 32)."""
    NPOS: tl.constexpr = 16 // BITS  # codes per uint16 element
    ROW_SCALE: tl.constexpr = SMODE == 3
    BKU: tl.constexpr = NB_T * UB  # uint16 elements per row per iteration (NPOS BKU codes)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows, rmask, rows_c = clamped_range(pid_n, BLOCK_N, N)
    ms, mmask, ms_c = clamped_range(pid_m, BLOCK_M, M)
    u_lo = pid_k * iters_per_split * BKU
    u_hi = tl.minimum(u_lo + iters_per_split * BKU, KU)
    k_lim = tl.minimum(K, NPOS * u_hi)
    w_row = w_ptr + rows_c.to(tl.int64) * stride_wn
    s_row = s_ptr + rows_c.to(tl.int64) * stride_sn
    z_row = z_ptr + rows_c.to(tl.int64) * stride_sn
    x_rows = x_ptr + ms_c.to(tl.int64) * stride_xm
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    ou = tl.arange(0, BKU)
    # the activations and scales of the next iteration are loaded one iteration ahead, by hand: they
    # pass through registers (split by nibble position, broadcast per block), so Triton's cp.async
    # pipeline, which carries the code tiles, does not cover them, and an L2 round trip per
    # iteration would stall the loop
    xk_next, s_next, z_next = _x_and_scales(x_rows, s_row, z_row, mmask, u_lo, u_hi, k_lim, UB, NB_T, BKU, HAS_ZERO,
                                            XPERM, NPOS, ROW_SCALE)
    for u0 in tl.range(u_lo, u_hi, BKU, num_stages=STAGES):
        xk, s, z = xk_next, s_next, z_next
        xk_next, s_next, z_next = _x_and_scales(x_rows, s_row, z_row, mmask, u0 + BKU, u_hi, k_lim, UB, NB_T, BKU,
                                                HAS_ZERO, XPERM, NPOS, ROW_SCALE)
        u = u0 + ou
        w = tl.load(w_row[:, None] + u[None, :], mask=(u < u_hi)[None, :], other=0)  # [BLOCK_N, BKU] int16
        if ROW_SCALE:  # placeholders (the int8 PTX of a per-row format does not read them)
            s = tl.full([BLOCK_N, BKU], 1.0, DOT_DTYPE)
            z = s
        else:
            if SMODE == 2:  # E8M0: 2^(e - 127)
                s = (s.to(tl.int32) << 23).to(tl.float32, bitcast=True)
            s = (s.to(tl.float32) * SMUL).to(DOT_DTYPE)
            if HAS_ZERO:
                z = z.to(DOT_DTYPE)
            else:
                z = s  # a placeholder: symmetric codes have no zero point (`_nibbles` ignores it)
            s = tl.broadcast_to(s[:, :, None], [BLOCK_N, NB_T, UB]).reshape(BLOCK_N, BKU)
            z = tl.broadcast_to(z[:, :, None], [BLOCK_N, NB_T, UB]).reshape(BLOCK_N, BKU)
        if NPOS == 8:  # 2-bit codes
            acc = _crumb_products(w, s, z, xk, x_rows, u, u_hi, mmask, M * KU, acc, CODE, ASM, DOT_DTYPE, NIB_ASM,
                                  XPERM, BLOCK_M, BKU)
        elif XPERM:  # x_perm[i] tiles, transposed [BKU, BLOCK_M]
            n0, n1, n2, n3 = _nibbles(w, s, z, CODE, ASM, DOT_DTYPE, NIB_ASM)
            xt = x_rows[None, :] + u[:, None]
            xmask = (u < u_hi)[:, None] & mmask[None, :]
            plane = M * KU
            acc = tl.dot(n0, tl.load(xt, mask=xmask, other=0.0).to(DOT_DTYPE), acc)
            acc = tl.dot(n1, tl.load(xt + plane, mask=xmask, other=0.0).to(DOT_DTYPE), acc)
            if NPOS == 4:
                acc = tl.dot(n2, tl.load(xt + 2 * plane, mask=xmask, other=0.0).to(DOT_DTYPE), acc)
                acc = tl.dot(n3, tl.load(xt + 3 * plane, mask=xmask, other=0.0).to(DOT_DTYPE), acc)
        elif NPOS == 2:  # columns 2u + j of x for byte j
            n0, n1, n2, n3 = _nibbles(w, s, z, CODE, ASM, DOT_DTYPE, NIB_ASM)
            x0, x1 = tl.split(xk.to(DOT_DTYPE).reshape(BLOCK_M, BKU, 2))
            acc = tl.dot(n0, tl.trans(x0), acc)
            acc = tl.dot(n1, tl.trans(x1), acc)
        else:  # columns 4u + i of x for nibble i: (m, u, a, b) = column 4u + 2a + b
            n0, n1, n2, n3 = _nibbles(w, s, z, CODE, ASM, DOT_DTYPE, NIB_ASM)
            xe, xo = tl.split(xk.to(DOT_DTYPE).reshape(BLOCK_M, BKU, 2, 2))
            x0, x2 = tl.split(xe)
            x1, x3 = tl.split(xo)
            acc = tl.dot(n0, tl.trans(x0), acc)
            acc = tl.dot(n1, tl.trans(x1), acc)
            acc = tl.dot(n2, tl.trans(x2), acc)
            acc = tl.dot(n3, tl.trans(x3), acc)
    offs = ms_c.to(tl.int64)[None, :] * stride_ym + rows[:, None]
    omask = rmask[:, None] & mmask[None, :]
    last = True
    if SPLIT_K > 1:  # fp32 partials to the workspace; the last program on this tile writes y
        tile = pid_m * tl.num_programs(0) + pid_n
        last, acc = split_k_total(ws_ptr, cnt_ptr, acc, ms_c[None, :] * N + rows[:, None], omask, pid_k, tile, M * N,
                                  SPLIT_K)
    if last:
        if ROW_SCALE:
            acc *= (tl.load(s_row).to(tl.float32) * SMUL)[:, None]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows_c, mask=rmask, other=0).to(tl.float32)[:, None]
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=omask)
