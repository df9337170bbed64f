"""Triton kernels: y = x @ W^T with W decoded from its stored planes in registers (fp32 math).

Only imported when Triton is importable (see `triton_linear.py`). The kernels read the planes in
their stored layout (no repack): the data plane is (N, KB) uint8, row n holding the codes of
weight row n packed along K, low bits first (formats/packing.py), so a byte holds PER = 8 / BITS
codes and code i of byte j is column j * PER + i (an int32 word: CPW = 32 / BITS codes, code j of
word t is column t * CPW + j).

Tiles. The tile and dequantize kernels load [BLOCK_N, NB_T, BB] bytes: BLOCK_N rows, NB_T scale
blocks of BB bytes (16-byte runs along K per thread, coalesced), decode each code position and
join them back into column order (`_values`), so the per-block scale is one [BLOCK_N, NB_T] load
and the activations are read contiguously. The GEMV works on int32 words instead (see
`_gemv_w_kernel`: one word and its activations per thread, nothing shared between threads).

Decoding (CODE, all exact in fp32):
    0 symmetric int, offset binary:    v = c - 2^(BITS-1)
    1 int8 two's complement:           v = (c ^ 0x80) - 128
    2 unsigned (affine int):           v = c            (w = v * scale + zero)
       (0-2 without an int-to-float conversion: f = 1 + u / 2^BITS is built by putting the code's
        bits u into an fp32 mantissa, then v = 2^BITS f - offset; see `_mantissa`)
    3 fp4 e2m1: fp16 bits s<<15 | em<<9, value * 2^14 (CMUL, folded into the block scale)
    4 fp8 e4m3: fp16 bits s<<15 | em<<7, value * 2^8  (CMUL)
    5 fp8 e5m2: fp16 bits c<<8 (e5m2 is the top byte of an fp16)
    6 palette: v = lut[row // LUT_DIV, c]  (a gather from a table of 2^BITS entries, cached in L1)
Scales (SMODE): 0 none, 1 float per block, 2 E8M0 per block (2^(s-127): bits s<<23), 3 float per row.

Paths:
    _gemv_w_kernel   M <= 4, rows of whole int32 words: CUDA-core FMAs, full K per program.
    _gemv_kernel     the same on bytes, for rows that are not whole words (K * bits % 32 != 0).
    _dot_kernel      tensor cores: tiles decoded to the activation dtype and fed to tl.dot; SWAP
                     computes W @ x^T (weights as the wide operand, for small M), split-K with a
                     last-arriving-program reduction (one kernel; counters reset by that program).
    _dequant_kernel  writes the dense weight for a cuBLAS matmul (large M).
(4-bit integer, e2m1 and int8 codes at M = 2..256 have their own path, `triton_dot4._dot4_kernel`, which decodes in
the MMA's operand layout at ~1.4 instructions a weight.)

Measured limit (H200, see benchmarks/RESULTS.md): all paths decode about 1.7-2 T weights/s; the
decode is ~8 SASS instructions a weight, mostly on the half-rate INT32 pipe, so the kernels are
bound by instruction issue rather than by memory bandwidth.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lowbit.kernels.triton_modes import kernel_module

# the split-K epilogue, compiled in this module's mode
split_k_total = kernel_module("triton_split_k").split_k_total
clamped_range = kernel_module("triton_tile").clamped_range
split_blocks = kernel_module("triton_tile").split_blocks


@triton.jit
def _mantissa(t, pos: tl.constexpr, BITS: tl.constexpr):
    """fp32 1 + u / 2^BITS for the BITS-bit field u at bit `pos` of int32 `t` (shift + one LOP3)."""
    SH: tl.constexpr = 23 - BITS - pos
    if SH >= 0:
        t = t << SH
    else:
        t = t >> (-SH)
    return ((t & (((1 << BITS) - 1) << (23 - BITS))) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _decode(b, i: tl.constexpr, lut_ptr, lut_row, BITS: tl.constexpr, CODE: tl.constexpr):
    """fp32 value (before any scale) of code `i` of the bytes `b` (int32 holding one byte each)."""
    if CODE == 2:  # unsigned: c = 2^BITS (f - 1)
        v = _mantissa(b, i * BITS, BITS) * (1 << BITS) - (1 << BITS)
    elif CODE <= 1:  # offset binary, or two's complement with the sign bit flipped into offset binary
        if CODE == 1:
            b = b ^ 0x80
        v = _mantissa(b, i * BITS, BITS) * (1 << BITS) - ((1 << BITS) + (1 << (BITS - 1)))
    else:
        c = (b >> (i * BITS)) & ((1 << BITS) - 1)
        if CODE == 3:
            h = ((c & 8) << 12) | ((c & 7) << 9)
            v = h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        elif CODE == 4:
            h = ((c & 0x80) << 8) | ((c & 0x7F) << 7)
            v = h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        elif CODE == 5:
            h = c << 8
            v = h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        else:
            v = tl.load(lut_ptr + lut_row * (1 << BITS) + c).to(tl.float32)
    return v


@triton.jit
def _values(b, lut_ptr, lut_row, BITS: tl.constexpr, CODE: tl.constexpr):
    """Codes of the byte tile `b` [R, NB, BB] decoded in column order: [R, NB, BB * 8 / BITS]
    (code i of byte j is column j * PER + i: joining the per-position values interleaves them)."""
    if BITS == 8:
        v = _decode(b, 0, lut_ptr, lut_row, BITS, CODE)
    elif BITS == 4:
        v = tl.join(_decode(b, 0, lut_ptr, lut_row, BITS, CODE), _decode(b, 1, lut_ptr, lut_row, BITS, CODE))
        v = tl.reshape(v, [v.shape[0], v.shape[1], v.shape[2] * 2])
    else:  # 2 bits: join(join(c0, c2), join(c1, c3)) puts code i at position 2 * (i // 2) + i % 2
        v = tl.join(tl.join(_decode(b, 0, lut_ptr, lut_row, BITS, CODE), _decode(b, 2, lut_ptr, lut_row, BITS, CODE)),
                    tl.join(_decode(b, 1, lut_ptr, lut_row, BITS, CODE), _decode(b, 3, lut_ptr, lut_row, BITS, CODE)))
        v = tl.reshape(v, [v.shape[0], v.shape[1], v.shape[2] * 4])
    return v


@triton.jit
def _block_scale(s_ptr, z_ptr, rows, blk, mask, stride_sn, SMODE: tl.constexpr, HAS_ZERO: tl.constexpr,
                 CMUL: tl.constexpr = 1.0):
    """(scale, zero) of blocks `blk` of `rows`, fp32 (zero is 0 when the format has none); the
    element decoder's constant factor CMUL is folded into the scale (exact: a power of two)."""
    s = tl.load(s_ptr + rows * stride_sn + blk, mask=mask, other=0)
    if SMODE == 2:
        s = (s.to(tl.int32) << 23).to(tl.float32, bitcast=True)
    else:
        s = s.to(tl.float32)
    if CMUL != 1.0:
        s = s * CMUL
    if HAS_ZERO:
        z = tl.load(z_ptr + rows * stride_sn + blk, mask=mask, other=0).to(tl.float32)
    else:
        z = s * 0.0
    return s, z


@triton.jit
def _row_scale(s_ptr, rs_ptr, ls_ptr, rows, lut_row, rmask, stride_sn,
               SMODE: tl.constexpr, HAS_RS: tl.constexpr, HAS_LS: tl.constexpr):
    """Per-output-row multiplier: per-row scale (SMODE 3) x palette scales."""
    r = tl.full(rows.shape, 1.0, tl.float32)
    if SMODE == 3:
        r = r * tl.load(s_ptr + rows * stride_sn, mask=rmask, other=0).to(tl.float32)
    if HAS_RS:
        r = r * tl.load(rs_ptr + rows, mask=rmask, other=0).to(tl.float32)
    if HAS_LS:
        r = r * tl.load(ls_ptr + lut_row, mask=rmask, other=0).to(tl.float32)
    return r


@triton.jit
def _gemv_w_kernel(x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, rs_ptr, ls_ptr, b_ptr, y_ptr,
                   M, N, K, KW, stride_xm, stride_wn, stride_sn, stride_ym, lut_div,
                   BITS: tl.constexpr, CODE: tl.constexpr, SMODE: tl.constexpr, HAS_ZERO: tl.constexpr,
                   HAS_RS: tl.constexpr, HAS_LS: tl.constexpr, HAS_BIAS: tl.constexpr, CMUL: tl.constexpr,
                   WB: tl.constexpr, NW: tl.constexpr, BLOCK_N: tl.constexpr):
    """GEMV for integer codes, one int32 word (32 / BITS codes) per thread and row.

    Layout matters more than anything here: each thread owns whole words (the tile's word order is
    permuted so Triton does not merge four words into one thread) and the activations of exactly
    those words, loaded once and reused for all BLOCK_N rows in registers; scales are applied per
    word (read through L1), so nothing crosses threads inside the loop. A code becomes
    f = 1 + u / 2^BITS by a shift and one LOP3 into an fp32 mantissa: per weight, shift, LOP3, FFMA
    (integer codes); minifloat and palette codes go through _decode. WB: words per scale block.
    """
    CPW: tl.constexpr = 32 // BITS
    XW: tl.constexpr = 8 if CPW > 8 else CPW
    pid = tl.program_id(0)
    pid_m = pid % M
    rows, rmask, rows_c = clamped_range(pid // M, BLOCK_N, N)
    lut_row = rows_c // lut_div
    i = tl.arange(0, NW)
    perm = (i % 4) * (NW // 4) + i // 4  # consecutive threads: words w, w + NW/4, ... (sectors stay whole)
    w_row = w_ptr + rows_c.to(tl.int64) * stride_wn
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
    acc = tl.zeros([BLOCK_N, NW], tl.float32)
    word = perm
    wv_next = tl.load(w_row[:, None] + word[None, :], mask=(word < KW)[None, :], other=0)
    for w0 in range(0, KW, NW):
        word = w0 + perm
        wmask = word < KW
        wv = wv_next
        nword = word + NW
        wv_next = tl.load(w_row[:, None] + nword[None, :], mask=(nword < KW)[None, :], other=0)
        if SMODE == 1 or SMODE == 2:
            s, z = _block_scale(s_ptr, z_ptr, rows_c[:, None], (word // WB)[None, :], wmask[None, :],
                                stride_sn, SMODE, HAS_ZERO, CMUL)
        if CODE == 1:
            wv = wv ^ -2139062144  # 0x80808080 as int32: two's complement bytes -> offset binary
        # this word's activations, at most 8 (16 bytes) per load so each thread keeps its own
        kx = word[:, None] * CPW + tl.arange(0, XW)[None, :]
        xb = tl.load(x_row + kx, mask=kx < K, other=0.0).to(tl.float32)  # [NW, min(CPW, 8)]
        xsum = tl.sum(xb, axis=1)  # [NW]
        p = tl.zeros([BLOCK_N, NW], tl.float32)
        if CPW == 4:
            p = _acc_codes2(p, wv, tl.reshape(xb, [NW, 2, 2]), 0, 1, BITS, 2, CODE, lut_ptr, lut_row)
        elif CPW == 8:
            p = _acc_codes2(p, wv, tl.reshape(xb, [NW, 2, 2, 2]), 0, 1, BITS, 3, CODE, lut_ptr, lut_row)
        else:  # 16 codes a word: the second half of the word's activations
            p = _acc_codes2(p, wv, tl.reshape(xb, [NW, 2, 2, 2]), 0, 1, BITS, 3, CODE, lut_ptr, lut_row)
            kx2 = kx + 8
            xb2 = tl.load(x_row + kx2, mask=kx2 < K, other=0.0).to(tl.float32)
            xsum += tl.sum(xb2, axis=1)
            p = _acc_codes2(p, wv, tl.reshape(xb2, [NW, 2, 2, 2]), 8, 1, BITS, 3, CODE, lut_ptr, lut_row)
        if CODE == 2:
            pw = p * (1 << BITS) - (1 << BITS) * xsum[None, :]
        elif CODE <= 1:
            pw = p * (1 << BITS) - ((1 << BITS) + (1 << (BITS - 1))) * xsum[None, :]
        else:
            pw = p
        if SMODE == 1 or SMODE == 2:
            pw = pw * s
            if HAS_ZERO:
                pw += z * xsum[None, :]
        acc += pw
    y = tl.sum(acc, axis=1) * _row_scale(s_ptr, rs_ptr, ls_ptr, rows_c, lut_row, rmask, stride_sn,
                                         SMODE, HAS_RS, HAS_LS)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows_c, mask=rmask, other=0).to(tl.float32)
    tl.store(y_ptr + pid_m.to(tl.int64) * stride_ym + rows, y.to(y_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _acc_codes2(p, wv, x, J0: tl.constexpr, STEP: tl.constexpr, BITS: tl.constexpr, LEVELS: tl.constexpr,
                CODE: tl.constexpr, lut_ptr, lut_row):
    """p += v_j(wv) * x_j for a 2-D word tile [BLOCK_N, NW] and activations [NW, 2, ...] whose
    trailing axes are the bits of the code position j (lowest last); integer codes give
    v = f (the mantissa form, corrected per word by the caller), others their decoded value."""
    if LEVELS == 0:
        if CODE <= 2:
            p += _mantissa(wv, J0 * BITS, BITS) * x[None, :]
        else:
            c = (wv >> (J0 * BITS)) & ((1 << BITS) - 1)
            p += _decode(c, 0, lut_ptr, lut_row[:, None], BITS, CODE) * x[None, :]
    else:
        x0, x1 = tl.split(x)
        p = _acc_codes2(p, wv, x0, J0, STEP * 2, BITS, LEVELS - 1, CODE, lut_ptr, lut_row)
        p = _acc_codes2(p, wv, x1, J0 + STEP, STEP * 2, BITS, LEVELS - 1, CODE, lut_ptr, lut_row)
    return p


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, rs_ptr, ls_ptr, b_ptr, y_ptr,
                 M, N, K, KB, stride_xm, stride_wn, stride_sn, stride_ym, lut_div,
                 BITS: tl.constexpr, CODE: tl.constexpr, SMODE: tl.constexpr, HAS_ZERO: tl.constexpr,
                 HAS_RS: tl.constexpr, HAS_LS: tl.constexpr, HAS_BIAS: tl.constexpr, CMUL: tl.constexpr,
                 BB: tl.constexpr, NB_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """GEMV for every format, byte tiles decoded in column order (used where rows are not whole
    int32 words, e.g. int8 or palettes with K % 4 != 0; _gemv_w_kernel is the fast one)."""
    PER: tl.constexpr = 8 // BITS
    B: tl.constexpr = BB * PER  # codes per scale block (per chunk for per-row formats)
    pid = tl.program_id(0)  # one axis (N / BLOCK_N can pass 65535); m varies fastest, so the
    pid_m = pid % M          # programs for the rows of x run together and share the tile in L2
    rows, rmask, rows_c = clamped_range(pid // M, BLOCK_N, N)  # masked lanes read row 0 (valid memory)
    lut_row = rows_c // lut_div
    jb = tl.arange(0, NB_T)
    w_row = w_ptr + rows_c.to(tl.int64) * stride_wn
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
    nblk = (KB + BB - 1) // BB
    acc = tl.zeros([BLOCK_N, NB_T], tl.float32)
    byte = jb[:, None] * BB + tl.arange(0, BB)[None, :]  # [NB_T, BB]
    wv_next = tl.load(w_row[:, None, None] + byte[None, :, :], mask=(byte < KB)[None, :, :], other=0)
    if SMODE == 1 or SMODE == 2:
        s_next, z_next = _block_scale(s_ptr, z_ptr, rows_c[:, None], jb[None, :], (jb < nblk)[None, :],
                                      stride_sn, SMODE, HAS_ZERO, CMUL)
    for blk0 in range(0, nblk, NB_T):  # loads one iteration ahead
        blk = blk0 + jb
        wv = wv_next.to(tl.int32)
        nbyte = (blk[:, None] + NB_T) * BB + tl.arange(0, BB)[None, :]
        wv_next = tl.load(w_row[:, None, None] + nbyte[None, :, :], mask=(nbyte < KB)[None, :, :], other=0)
        if SMODE == 1 or SMODE == 2:
            s, z = s_next, z_next
            s_next, z_next = _block_scale(s_ptr, z_ptr, rows_c[:, None], blk[None, :] + NB_T,
                                          (blk + NB_T < nblk)[None, :], stride_sn, SMODE, HAS_ZERO, CMUL)
        kk = blk[:, None] * B + tl.arange(0, B)[None, :]
        x3 = tl.load(x_row + kk, mask=kk < K, other=0.0).to(tl.float32)  # [NB_T, B], contiguous
        v = _values(wv, lut_ptr, lut_row[:, None, None], BITS, CODE)  # [BLOCK_N, NB_T, B]
        bsum = tl.sum(v * x3[None, :, :], axis=2)  # [BLOCK_N, NB_T]: one dot product per scale block
        if SMODE == 1 or SMODE == 2:
            bsum = bsum * s
            if HAS_ZERO:
                bsum += z * tl.sum(x3, axis=1)[None, :]
        acc += bsum
    y = tl.sum(acc, axis=1) * _row_scale(s_ptr, rs_ptr, ls_ptr, rows_c, lut_row, rmask, stride_sn,
                                         SMODE, HAS_RS, HAS_LS)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows_c, mask=rmask, other=0).to(tl.float32)
    tl.store(y_ptr + pid_m.to(tl.int64) * stride_ym + rows, y.to(y_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _dot_kernel(x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, rs_ptr, ls_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
                M, N, K, KB, stride_xm, stride_wn, stride_sn, stride_ym, lut_div, blocks_per_split,
                BITS: tl.constexpr, CODE: tl.constexpr, SMODE: tl.constexpr, HAS_ZERO: tl.constexpr,
                HAS_RS: tl.constexpr, HAS_LS: tl.constexpr, HAS_BIAS: tl.constexpr, CMUL: tl.constexpr,
                BB: tl.constexpr, NB_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                SPLIT_K: tl.constexpr, SWAP: tl.constexpr, DOT_DTYPE: tl.constexpr):
    PER: tl.constexpr = 8 // BITS
    B: tl.constexpr = BB * PER
    BK: tl.constexpr = NB_T * B  # columns per iteration
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows, rmask, rows_c = clamped_range(pid_n, BLOCK_N, N)
    lut_row = rows_c // lut_div
    ms, mmask, ms_c = clamped_range(pid_m, BLOCK_M, M)
    jb = tl.arange(0, NB_T)
    blk_lo, blk_hi = split_blocks(pid_k, blocks_per_split, KB, BB)
    w_row = w_ptr + rows_c.to(tl.int64) * stride_wn
    x_rows = x_ptr + ms_c.to(tl.int64) * stride_xm
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    blk = blk_lo + jb
    byte = blk[:, None] * BB + tl.arange(0, BB)[None, :]
    wv_next = tl.load(w_row[:, None, None] + byte[None, :, :], mask=((byte < KB) & (blk[:, None] < blk_hi))[None, :, :],
                      other=0)
    if SMODE == 1 or SMODE == 2:
        s_next, z_next = _block_scale(s_ptr, z_ptr, rows_c[:, None], blk[None, :], (blk < blk_hi)[None, :],
                                      stride_sn, SMODE, HAS_ZERO, CMUL)
    for blk0 in range(blk_lo, blk_hi, NB_T):  # weights and scales loaded one iteration ahead
        blk = blk0 + jb
        wv = wv_next.to(tl.int32)
        nblk_ = blk + NB_T
        nbyte = nblk_[:, None] * BB + tl.arange(0, BB)[None, :]
        wv_next = tl.load(w_row[:, None, None] + nbyte[None, :, :],
                          mask=((nbyte < KB) & (nblk_[:, None] < blk_hi))[None, :, :], other=0)
        if SMODE == 1 or SMODE == 2:
            s, z = s_next, z_next
            s_next, z_next = _block_scale(s_ptr, z_ptr, rows_c[:, None], nblk_[None, :], (nblk_ < blk_hi)[None, :],
                                          stride_sn, SMODE, HAS_ZERO, CMUL)
        v = _values(wv, lut_ptr, lut_row[:, None, None], BITS, CODE)  # [BLOCK_N, NB_T, B]
        if SMODE == 1 or SMODE == 2:
            v = v * s[:, :, None]
            if HAS_ZERO:
                v += z[:, :, None]
        a = tl.reshape(v, [BLOCK_N, BK]).to(DOT_DTYPE)
        kk = blk0 * B + tl.arange(0, BK)
        kmask = (kk < K) & (kk < blk_hi * B)
        if SWAP:  # x^T tile [BK, BLOCK_M]
            xt = tl.load(x_rows[None, :] + kk[:, None], mask=kmask[:, None] & mmask[None, :], other=0.0)
            acc = tl.dot(a, xt.to(DOT_DTYPE), acc)
        else:  # x tile [BLOCK_M, BK]
            xt = tl.load(x_rows[:, None] + kk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
            acc = tl.dot(xt.to(DOT_DTYPE), tl.trans(a), acc)
    r = _row_scale(s_ptr, rs_ptr, ls_ptr, rows_c, lut_row, rmask, stride_sn, SMODE, HAS_RS, HAS_LS)
    if SWAP:
        out = acc * r[:, None]
        offs = ms_c.to(tl.int64)[None, :] * stride_ym + rows[:, None]
        omask = rmask[:, None] & mmask[None, :]
        woffs = ms_c[None, :] * N + rows[:, None]
    else:
        out = acc * r[None, :]
        offs = ms_c.to(tl.int64)[:, None] * stride_ym + rows[None, :]
        omask = mmask[:, None] & rmask[None, :]
        woffs = ms_c[:, None] * N + rows[None, :]
    last = True
    if SPLIT_K > 1:  # fp32 partials to the workspace; the last program on this tile writes y
        tile = pid_m * tl.num_programs(0) + pid_n
        last, out = split_k_total(ws_ptr, cnt_ptr, out, woffs, omask, pid_k, tile, M * N, SPLIT_K)
    if last:
        if HAS_BIAS:
            if SWAP:
                out += tl.load(b_ptr + rows_c, mask=rmask, other=0).to(tl.float32)[:, None]
            else:
                out += tl.load(b_ptr + rows_c, mask=rmask, other=0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, lut_ptr, rs_ptr, ls_ptr, out_ptr,
                    N, K, KB, stride_wn, stride_sn, stride_on, lut_div,
                    BITS: tl.constexpr, CODE: tl.constexpr, SMODE: tl.constexpr, HAS_ZERO: tl.constexpr,
                    HAS_RS: tl.constexpr, HAS_LS: tl.constexpr, CMUL: tl.constexpr,
                    BB: tl.constexpr, NB_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[n, k] = W[n, k] in out's dtype, for the cuBLAS path (one pass: read packed, write dense)."""
    PER: tl.constexpr = 8 // BITS
    B: tl.constexpr = BB * PER
    pid_k = tl.program_id(1)
    rows, rmask, rows_c = clamped_range(tl.program_id(0), BLOCK_N, N)
    lut_row = rows_c // lut_div
    blk = pid_k * NB_T + tl.arange(0, NB_T)
    byte = blk[:, None] * BB + tl.arange(0, BB)[None, :]
    wv = tl.load(w_ptr + rows_c.to(tl.int64)[:, None, None] * stride_wn + byte[None, :, :],
                 mask=(byte < KB)[None, :, :], other=0).to(tl.int32)
    v = _values(wv, lut_ptr, lut_row[:, None, None], BITS, CODE)  # [BLOCK_N, NB_T, B]
    if SMODE == 1 or SMODE == 2:
        s, z = _block_scale(s_ptr, z_ptr, rows_c[:, None], blk[None, :], (blk < (KB + BB - 1) // BB)[None, :],
                            stride_sn, SMODE, HAS_ZERO, CMUL)
        v = v * s[:, :, None]
        if HAS_ZERO:
            v += z[:, :, None]
    r = _row_scale(s_ptr, rs_ptr, ls_ptr, rows_c, lut_row, rmask, stride_sn, SMODE, HAS_RS, HAS_LS)
    v = v * r[:, None, None]
    kk = blk[:, None] * B + tl.arange(0, B)[None, :]  # [NB_T, B], contiguous along the row
    tl.store(out_ptr + rows_c.to(tl.int64)[:, None, None] * stride_on + kk[None, :, :], v.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None, None] & (kk < K)[None, :, :])


@triton.jit
def _silu_mul_pairs_kernel(y_ptr, out_ptr, total, BLOCK: tl.constexpr):
    """out[i] = silu(y[2i]) * y[2i + 1] over a contiguous (M, 2N) -> (M, N), in fp32: the gated
    MLP's product after a matmul path without the GLU epilogue (one launch where the plain-torch
    twin, `reference.silu_mul_pairs`, takes five)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    g = tl.load(y_ptr + 2 * offs, mask=mask, other=0).to(tl.float32)
    u = tl.load(y_ptr + 2 * offs + 1, mask=mask, other=0).to(tl.float32)
    tl.store(out_ptr + offs, (g / (1.0 + tl.exp(-g)) * u).to(out_ptr.dtype.element_ty), mask=mask)
