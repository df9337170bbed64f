"""The fast GEMV (M <= 4): codes decoded two at a time in packed 16-bit registers, by inline PTX.

Only imported when Triton is importable (through `triton_linear._kern`). Why a second GEMV: the
plain Triton GEMV (`triton_kernels._gemv_w_kernel`) spends about 8 SASS instructions per weight,
so on an H200 it decodes ~2 T weights/s, well below what the memory delivers for 4-bit codes
(~8 T weights/s). Here one LOP3 turns two 4-bit codes into two 16-bit floats at once and one
HFMA2 multiplies both with their activations:

    word w (int32) = 8 codes, code i in bits [4i, 4i+4)        (the stored layout, no repack)
    LOP3(w >> 4i, 0x000F000F, MAGIC)  -> 16-bit pair (MAGIC + c_i / 8, MAGIC + c_{i+4} / 8)
    MAGIC = 16.0 in bf16 (0x4180) or 128.0 in fp16 (0x5800): there the unit in the last place is
    1/8, so the code's bits land in the mantissa as c / 8 exactly. Subtracting MAGIC + off / 8
    (exact) gives v = (c - off) / 8, in [-1, 2): small, so the products with the activations stay
    far from 16-bit overflow. The factor 8 goes into the block scale.

A word costs 3 shifts + 4 LOP3 + 4 subtractions + 4 pair FMAs + 3 to widen the pair sum to fp32:
18 instructions for 8 weights. The activations are paired to match, (x_i, x_{i+4}), once per
program and reused for all BLOCK_N rows. 2-bit codes work the same way with 8 pairs (i, i+8) a
word. int8 codes go to fp32 through one PRMT each into an fp32 mantissa (2^23 + c).

Precision: the products of a word are summed in the activation dtype (bf16: 8-bit mantissa) and
then in fp32; that adds about one 16-bit rounding per word's partial sum to the result.

Under TRITON_INTERPRET=1 (no inline assembly) `ASM=False` selects a plain-Triton twin of the word
dot product with the same values in fp32; the CI tests run that twin, the GPU runs the assembly.

Formats (CODE as in triton_kernels.py): 4-bit and 2-bit integer codes, symmetric (CODE 0) or
affine (CODE 2, w = c * s + z), int8 (CODE 1, two's complement bytes), fp4 e2m1 (CODE 3, FP4:
PRMT table lookups) and 4-bit palettes (CODE 6, LUT: 16-entry PRMT lookups, the program's palette
held in eight registers); scales per block (fp16 / bf16 / fp32 or E8M0, SMODE 1 / 2) or per row
(SMODE 3). The PTX of each word's dot product is built in `gemv_ptx.py`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lowbit.kernels.triton_modes import kernel_module

# the split-K epilogue, compiled in this module's mode
split_k_total = kernel_module("triton_split_k").split_k_total
clamped_range = kernel_module("triton_tile").clamped_range


@triton.jit
def _lo_pair(a, b):
    """16-bit pair (low half of a, low half of b)."""
    return (a & 0xFFFF) | (b << 16)


@triton.jit
def _hi_pair(a, b):
    """16-bit pair (high half of a, high half of b)."""
    return ((a >> 16) & 0xFFFF) | (b & -65536)


@triton.jit
def _half_sums(q, F16: tl.constexpr):
    """fp32 sum of the two 16-bit floats in each int32 of `q`."""
    if F16:
        lo = (q & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = ((q >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:  # bf16 -> fp32 is the bf16 as the top half of the fp32 bits
        lo = (q << 16).to(tl.float32, bitcast=True)
        hi = (q & -65536).to(tl.float32, bitcast=True)
    return lo + hi


@triton.jit
def _load_x(x_row, word, K, BITS: tl.constexpr, ASM: tl.constexpr):
    """The raw activations of the words `word` ([R, C]) as int32 [R, C, CPW // 2]: int j of a word
    holds its columns (2j, 2j + 1). One vector load per word (16 bytes for 4-bit codes, 32 for
    2-bit, 8 for int8), split in registers by `_x_operands`: 4-byte loads 16 bytes apart cost four
    times the L1 wavefronts, and the L1 (not DRAM) was the limit of this loop (ncu: L1/TEX 90 %,
    DRAM 33 %). Loaded one iteration ahead and only split when used: anything computed from a load
    in the iteration that issues it waits for that load there (SASS: the loop stalled on its own
    prefetch). Twin (ASM=False): an unused zero."""
    CPW: tl.constexpr = 32 // BITS
    NI: tl.constexpr = CPW // 2
    if ASM:
        wmask = word * CPW < K
        xi = x_row.to(tl.pointer_type(tl.int32), bitcast=True) + word * NI
        q = tl.load(xi[:, :, None] + tl.arange(0, NI)[None, None, :], mask=wmask[:, :, None], other=0)
    else:
        q = (word * 0)[:, :, None] + tl.zeros([1, 1, NI], tl.int32)
    return q


@triton.jit
def _x_operands(q, BITS: tl.constexpr, F16: tl.constexpr, HAS_ZERO: tl.constexpr, ASM: tl.constexpr,
                FP4: tl.constexpr = False):
    """The activations of `_load_x` (raw int32 [R, C, NI]) as `_words_dot` takes them: 8 int32
    tensors [R, C] (4-bit: pairs (x_i, x_{i+4}) in the first four; fp4: (x_2j, x_2j+1), as in
    memory; 2-bit: pairs (x_i, x_{i+8}); int8: the four activations as fp32 bits), and each word's
    activation sum (fp32, for zero points; 0 unless HAS_ZERO). Twin (ASM=False): unused zeros."""
    R: tl.constexpr = q.shape[0]
    C: tl.constexpr = q.shape[1]
    # (one return at the end: the JIT compiles the statements after a static return too)
    if not ASM:
        p0 = tl.sum(q, axis=2)
        p1, p2, p3, p4, p5, p6, p7, xs = p0, p0, p0, p0, p0, p0, p0, p0.to(tl.float32)
    elif BITS == 8:
        qa, qb = tl.split(q)  # ints (x0, x1), (x2, x3)
        if F16:
            p0 = (qa & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32).to(tl.int32, bitcast=True)
            p1 = (qa >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32).to(tl.int32, bitcast=True)
            p2 = (qb & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32).to(tl.int32, bitcast=True)
            p3 = (qb >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32).to(tl.int32, bitcast=True)
        else:  # bf16 -> fp32 is the bf16 as the top half of the fp32 bits
            p0, p1, p2, p3 = qa << 16, qa & -65536, qb << 16, qb & -65536
        p4, p5, p6, p7, xs = p0, p1, p2, p3, qa * 0.0
    else:
        if HAS_ZERO:
            xs = tl.sum(_half_sums(q, F16), axis=2)
        else:
            xs = tl.sum(q, axis=2) * 0.0
        if BITS == 4:
            qa, qb = tl.split(q.reshape(R, C, 2, 2))  # ints (0, 2), (1, 3)
            q0, q2 = tl.split(qa)
            q1, q3 = tl.split(qb)
            if FP4:
                p0, p1, p2, p3 = q0, q1, q2, q3
            else:
                p0, p1, p2, p3 = _lo_pair(q0, q2), _hi_pair(q0, q2), _lo_pair(q1, q3), _hi_pair(q1, q3)
            p4, p5, p6, p7 = p0, p1, p2, p3
        else:
            qe, qo = tl.split(q.reshape(R, C, 2, 2, 2))  # int j = 4a + 2b + c: c = 0 / 1
            qe0, qe1 = tl.split(qe)  # j = 4a, 4a + 2
            qo0, qo1 = tl.split(qo)  # j = 4a + 1, 4a + 3
            q0, q4 = tl.split(qe0)
            q2, q6 = tl.split(qe1)
            q1, q5 = tl.split(qo0)
            q3, q7 = tl.split(qo1)
            p0, p1, p2, p3 = _lo_pair(q0, q4), _hi_pair(q0, q4), _lo_pair(q1, q5), _hi_pair(q1, q5)
            p4, p5, p6, p7 = _lo_pair(q2, q6), _hi_pair(q2, q6), _lo_pair(q3, q7), _hi_pair(q3, q7)
    return p0, p1, p2, p3, p4, p5, p6, p7, xs


@triton.jit
def _lut_tables(lut_ptr, ls_ptr, g, HAS_LS: tl.constexpr, F16: tl.constexpr):
    """Palette g (16 entries, times its int8 table's scale with HAS_LS) as the eight byte tables of
    `_asm_word_lut4` (int32 scalars t0..t7) and the power of two f they were divided by: the
    entries are scaled so that the largest magnitude lies in [1, 2), then rounded to the activation
    dtype, and the kernel multiplies its sums by f. So the 16-bit products stay near the size of
    the activations (no fp16 underflow for a palette of small weights, no overflow for a large one)."""
    v = tl.load(lut_ptr + g * 16 + tl.arange(0, 16)).to(tl.float32)
    if HAS_LS:
        v = v * tl.load(ls_ptr + g).to(tl.float32)
    amax = tl.max(tl.abs(v), 0)
    e = tl.where(amax > 0, ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, 0)  # floor(log2 amax)
    v = v * ((127 - e) << 23).to(tl.float32, bitcast=True)  # exact: a power of two
    if F16:
        h = v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    else:  # round to nearest even by hand (the interpreter's fp32 -> bf16 conversion truncates)
        b = v.to(tl.int32, bitcast=True)
        h = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF
    sh = (tl.arange(0, 4) * 8)[None, :]
    lw = tl.sum((h & 0xFF).reshape(4, 4) << sh, axis=1)  # [4]: word i = low bytes of entries 4i..4i+3
    hw = tl.sum((h >> 8).reshape(4, 4) << sh, axis=1)
    i4 = tl.arange(0, 4)
    t0, t1 = tl.sum(tl.where(i4 == 0, lw, 0), 0), tl.sum(tl.where(i4 == 1, lw, 0), 0)
    t2, t3 = tl.sum(tl.where(i4 == 2, lw, 0), 0), tl.sum(tl.where(i4 == 3, lw, 0), 0)
    t4, t5 = tl.sum(tl.where(i4 == 0, hw, 0), 0), tl.sum(tl.where(i4 == 1, hw, 0), 0)
    t6, t7 = tl.sum(tl.where(i4 == 2, hw, 0), 0), tl.sum(tl.where(i4 == 3, hw, 0), 0)
    return t0, t1, t2, t3, t4, t5, t6, t7, ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _words_dot(w, x0, x1, x2, x3, x4, x5, x6, x7, x_row, word, K, tabs, BITS: tl.constexpr, SIGNED: tl.constexpr,
               F16: tl.constexpr, ASM: tl.constexpr, FP4: tl.constexpr, WORD_ASM: tl.constexpr, LUT: tl.constexpr):
    """fp32 dot product of each int32 word of `w` [BN, R, C] with its activations (x0..x7 from
    `_load_x`, [R, C]; the twin reads x_row + the code columns of `word` itself) by the PTX
    `WORD_ASM` (`word_asm`). 4 / 2-bit values are (c - off) / 8 (the caller scales by 8); int8
    values are c (two's complement); fp4 values are exact; palette (LUT) values are the table's
    entries over its factor (`tabs`: the eight byte tables of `_lut_tables`; the twin: (palette
    pointer, its scale))."""
    CPW: tl.constexpr = 32 // BITS
    if ASM:
        if LUT:
            z = w * 0
            r = tl.inline_asm_elementwise(WORD_ASM, "=r,r,r,r,r,r,r,r,r,r,r,r,r,r",
                                          [w, x0[None], x1[None], x2[None], x3[None], z + tabs[0], z + tabs[1],
                                           z + tabs[2], z + tabs[3], z + tabs[4], z + tabs[5], z + tabs[6],
                                           z + tabs[7]], dtype=tl.int32, is_pure=True, pack=1)
        elif FP4:  # + the four lookup tables as operands (they stay in registers across the loop)
            z = w * 0
            if F16:
                t0, t1, t2, t3 = z + 0, z + 0, z + 0x3E3C3800, z + 0x46444240
            else:
                t0, t1, t2, t3 = z - 1065353216, z - 1065336832, z + 0x3F3F3F00, z + 0x40404040
            r = tl.inline_asm_elementwise(WORD_ASM, "=r,r,r,r,r,r,r,r,r,r",
                                          [w, x0[None], x1[None], x2[None], x3[None], t0, t1, t2, t3],
                                          dtype=tl.int32, is_pure=True, pack=1)
        elif BITS == 2:
            r = tl.inline_asm_elementwise(WORD_ASM, "=r,r,r,r,r,r,r,r,r,r",
                                          [w, x0[None], x1[None], x2[None], x3[None], x4[None], x5[None], x6[None],
                                           x7[None]], dtype=tl.int32, is_pure=True, pack=1)
        else:  # int8, 4-bit integers
            r = tl.inline_asm_elementwise(WORD_ASM, "=r,r,r,r,r,r", [w, x0[None], x1[None], x2[None], x3[None]],
                                          dtype=tl.int32, is_pure=True, pack=1)
        r = r.to(tl.float32, bitcast=True)
    else:  # the twin, in fp32
        wmask = word * CPW < K
        r = w.to(tl.float32) * 0.0
        if BITS == 8:
            w = w ^ -2139062144  # 0x80808080: two's complement bytes -> offset binary
        for i in tl.static_range(CPW):
            ci = (w >> (i * BITS)) & ((1 << BITS) - 1)
            c = ci.to(tl.float32)
            if LUT:
                v = tl.load(tabs[0] + ci).to(tl.float32) * tabs[1]
            elif FP4:  # e2m1: sign, exponent e (bias 1), one mantissa bit
                e = (ci >> 1) & 3
                mag = tl.where(e == 0, (ci & 1).to(tl.float32) * 0.5,
                               tl.math.exp2((e - 1).to(tl.float32)) * (1.0 + (ci & 1).to(tl.float32) * 0.5))
                v = tl.where((ci & 8) != 0, -mag, mag)
            elif BITS == 8:
                v = c - 128.0
            elif SIGNED:
                v = (c - (1 << (BITS - 1))) * 0.125
            else:
                v = c * 0.125
            r += v * tl.load(x_row + word * CPW + i, mask=wmask, other=0.0).to(tl.float32)[None]
    return r


@triton.jit
def _words_xsum(x_row, word, K, BITS: tl.constexpr):
    """Sum of each word's activations (fp32, [R, C]): the zero-point term of affine codes."""
    CPW: tl.constexpr = 32 // BITS
    s = tl.zeros(word.shape, tl.float32)
    for i in tl.static_range(CPW):
        s += tl.load(x_row + word * CPW + i, mask=word * CPW < K, other=0.0).to(tl.float32)
    return s


@triton.jit
def _load_scales(s_ptr, z_ptr, rows, stride_sn, word, wmask, gblk, gmask, SMODE: tl.constexpr,
                 HAS_ZERO: tl.constexpr, WB: tl.constexpr, WPT: tl.constexpr):
    """The raw (scale, zero) of `rows` for the words `word` [R, WPT], as stored: [BN, R] (one per
    group of WPT words when a block holds whole groups: blocks `gblk`) or [BN, R, WPT] (one per
    word); zeros for per-row or scale-free formats. `_scale_values` converts them where they are
    used (one iteration after the load, see `_load_x`)."""
    # indexed group-major and permuted, like the codes (`_load_all`): the same thread layout
    if SMODE == 1 or SMODE == 2:
        if WB % WPT == 0:
            offs = rows[None, :] * stride_sn + gblk[:, None]
            m = gmask[:, None]
            s = tl.load(s_ptr + offs, mask=m, other=0).permute(1, 0)
            z = tl.load(z_ptr + offs, mask=m, other=0).permute(1, 0) if HAS_ZERO else s
        else:
            offs = rows[None, :, None] * stride_sn + (word // WB)[:, None, :]
            m = wmask[:, None, :]
            s = tl.load(s_ptr + offs, mask=m, other=0).permute(1, 0, 2)
            z = tl.load(z_ptr + offs, mask=m, other=0).permute(1, 0, 2) if HAS_ZERO else s
    else:
        s = tl.zeros([rows.shape[0], gblk.shape[0]], tl.float32)
        z = s
    return s, z


@triton.jit
def _scale_values(s, z, SMODE: tl.constexpr, HAS_ZERO: tl.constexpr):
    """fp32 (scale, zero) from `_load_scales`' raw values: E8M0 bytes (SMODE 2) are the fp32
    exponent field; (0, 0) for per-row or scale-free formats."""
    if SMODE == 2:
        s = (s.to(tl.int32) << 23).to(tl.float32, bitcast=True)
    else:
        s = s.to(tl.float32)
    if HAS_ZERO and (SMODE == 1 or SMODE == 2):
        z = z.to(tl.float32)
    else:
        z = s * 0.0
    return s, z


@triton.jit
def _step(wv, x0, x1, x2, x3, x4, x5, x6, x7, xs, s, z, x_row, word, wmask, K, KW, tabs, BITS: tl.constexpr,
          SIGNED: tl.constexpr, SMODE: tl.constexpr, HAS_ZERO: tl.constexpr, SMUL: tl.constexpr, F16: tl.constexpr,
          WB: tl.constexpr, WPT: tl.constexpr, ASM: tl.constexpr, PROBE: tl.constexpr, FP4: tl.constexpr,
          WORD_ASM: tl.constexpr, LUT: tl.constexpr):
    """One iteration's scaled partial sums [BLOCK_N, NWG] from its words, activations (and their
    sums per word, `xs`, for zero points; the twin recomputes them) and scales."""
    if HAS_ZERO and not ASM:
        xs = _words_xsum(x_row, tl.where(wmask, word, KW), K, BITS)
    if PROBE == 1:
        p = wv.to(tl.float32)
    else:
        p = _words_dot(wv, x0, x1, x2, x3, x4, x5, x6, x7, x_row, tl.where(wmask, word, KW), K, tabs, BITS,
                       SIGNED, F16, ASM, FP4, WORD_ASM, LUT)  # [BLOCK_N, NWG, WPT]
    if PROBE == 2 or not (SMODE == 1 or SMODE == 2):
        part = tl.sum(p, axis=2) * SMUL
    elif WB % WPT == 0:  # one scale per group of WPT words
        part = tl.sum(p, axis=2) * (s * SMUL)
        if HAS_ZERO:
            part += z * tl.sum(xs, axis=1)[None, :]
    else:  # a scale per word
        part = p * (s * SMUL)
        if HAS_ZERO:
            part += z * xs[None]
        part = tl.sum(part, axis=2)
    return part


@triton.jit
def _load_all(w_row, x_row, s_ptr, z_ptr, rows, stride_sn, w0, local, gblk0, k_hi, K, KW, BITS: tl.constexpr,
              SMODE: tl.constexpr, HAS_ZERO: tl.constexpr, WB: tl.constexpr, WPT: tl.constexpr, NWG: tl.constexpr,
              ASM: tl.constexpr):
    """One step's raw loads, for the words w0 + `local` [NWG, WPT] of `rows`: codes [BN, NWG, WPT],
    activations (`_load_x`) and scales (`_load_scales`); masked past k_hi."""
    word = w0 + local
    wmask = word < k_hi
    # loaded as [NWG, BN, WPT] and permuted: Triton then spreads the threads over the groups (each
    # thread holds one group of every row), the layout of the activations, so the activations need
    # no exchange between threads (loaded as [BN, NWG, WPT], 4 threads shared a group's activations
    # through shared memory, with a barrier, every iteration)
    wv = tl.load(w_row[None, :, None] + word[:, None, :], mask=wmask[:, None, :], other=0).permute(1, 0, 2)
    xq = _load_x(x_row, tl.where(wmask, word, KW), K, BITS, ASM)
    sr, zr = _load_scales(s_ptr, z_ptr, rows, stride_sn, word, wmask, w0 // WB + gblk0,
                          (w0 + tl.arange(0, NWG) * WPT) < k_hi, SMODE, HAS_ZERO, WB, WPT)
    return wv, xq, sr, zr


@triton.jit
def _use(wv, xq, sr, zr, x_row, word, k_hi, K, KW, tabs, BITS: tl.constexpr, SIGNED: tl.constexpr,
         SMODE: tl.constexpr, HAS_ZERO: tl.constexpr, SMUL: tl.constexpr, F16: tl.constexpr, WB: tl.constexpr,
         WPT: tl.constexpr, ASM: tl.constexpr, PROBE: tl.constexpr, FP4: tl.constexpr, WORD_ASM: tl.constexpr,
         LUT: tl.constexpr):
    """One step's scaled partial sums [BLOCK_N, NWG] from its raw loads (`_load_all`)."""
    # fp4 and palettes take the activation pairs as they lie in memory
    x0, x1, x2, x3, x4, x5, x6, x7, xs = _x_operands(xq, BITS, F16, HAS_ZERO, ASM, FP4 or LUT)
    s, z = _scale_values(sr, zr, SMODE, HAS_ZERO)
    return _step(wv, x0, x1, x2, x3, x4, x5, x6, x7, xs, s, z, x_row, word, word < k_hi, K, KW, tabs, BITS, SIGNED,
                 SMODE, HAS_ZERO, SMUL, F16, WB, WPT, ASM, PROBE, FP4, WORD_ASM, LUT)


@triton.jit
def _gemv_fast_kernel(x_ptr, w_ptr, s_ptr, z_ptr, rs_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, lut_ptr, ls_ptr,
                      M, N, K, KW, stride_xm, stride_wn, stride_sn, stride_ym, WPS, LUT_DIV,
                      BITS: tl.constexpr, SIGNED: tl.constexpr, SMODE: tl.constexpr, HAS_ZERO: tl.constexpr,
                      HAS_RS: tl.constexpr, HAS_BIAS: tl.constexpr, SMUL: tl.constexpr, F16: tl.constexpr,
                      WB: tl.constexpr, NWG: tl.constexpr, BLOCK_N: tl.constexpr, ASM: tl.constexpr,
                      WPT: tl.constexpr = 4, SPLIT_K: tl.constexpr = 1,
                      FP4: tl.constexpr = False, WORD_ASM: tl.constexpr = "", PROBE: tl.constexpr = 0,
                      LUT: tl.constexpr = False, HAS_LS: tl.constexpr = False, GLU: tl.constexpr = False):
    """y[m, rows] = x[m] @ W[rows]^T for BLOCK_N rows; each thread holds WPT consecutive words
    (4: one 16-byte load) of every row, NWG groups of WPT words per step, and the activations of
    those words once for all rows, in its own registers. WB: words per scale block; SMUL: the
    decode's constant factor (8 for 4 / 2-bit codes) times any format constant, folded into the
    scales. Words, activations and scales are loaded one step ahead into registers, two steps a
    trip (see the loop; Triton's cp.async pipeline, tried as an option, was 1.6-2.4x slower here:
    benchmarks/RESULTS.md).
    SPLIT_K > 1: program (pid, k) takes the words [k * WPS, (k + 1) * WPS) (WPS a multiple of
    NWG * WPT) and the last program to finish a row block adds the fp32 partial sums from the
    workspace `ws_ptr` [SPLIT_K, M, N] (arrival counter `cnt_ptr`, reset to 0 by that program):
    small-N shapes get enough warps in flight without larger, slower programs.
    LUT: 4-bit palette codes; every row of a program uses palette (first row) // LUT_DIV (the host
    picks BLOCK_N so), times its int8 table's scale `ls_ptr` with HAS_LS (`_lut_tables`).
    GLU: the rows are (gate, up) pairs (row 2j gate j, row 2j + 1 up j; BLOCK_N even) and y[m, j] =
    silu(gate j) * up j, from the fp32 sums (a gated MLP's activation in the epilogue: one kernel
    and one (M, N / 2) write instead of a second launch over (M, N); `lowbit.nn.gated`).
    PROBE (diagnostics only, wrong results): 1 no decode, 2 no scales."""
    pid = tl.program_id(0)
    pid_m = pid % M
    rows, rmask, rows_c = clamped_range(pid // M, BLOCK_N, N)
    w_row = w_ptr + rows_c.to(tl.int64) * stride_wn
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
    WORDS: tl.constexpr = NWG * WPT
    k_lo = tl.program_id(1) * WPS
    k_hi = tl.minimum(k_lo + WPS, KW)
    local = tl.arange(0, NWG)[:, None] * WPT + tl.arange(0, WPT)[None, :]  # [NWG, WPT]
    gblk0 = tl.arange(0, NWG) * WPT // WB  # scale block of each group of WPT words (WB % WPT == 0)
    lut_mul = 1.0
    if LUT:
        g = ((pid // M) * BLOCK_N) // LUT_DIV
        if ASM:
            t0, t1, t2, t3, t4, t5, t6, t7, lut_mul = _lut_tables(lut_ptr, ls_ptr, g, HAS_LS, F16)
            tabs = (t0, t1, t2, t3, t4, t5, t6, t7)
        else:  # the twin reads the palette itself
            tabs = (lut_ptr + g * 16, tl.load(ls_ptr + g).to(tl.float32) if HAS_LS else 1.0)
    else:
        tabs = (0, 0)
    # everything the loop reads (words, activations, scales) is loaded one step ahead, raw, and
    # what is computed from them (activation pairs, scale values) is computed in the step that
    # uses them, so that no instruction waits for the loads its own step issued. Two steps per
    # trip with two sets of registers (a, b): a loop that carried one set would copy the loads
    # into it at the end of every step, and those copies wait for the loads (SASS).
    wa, xa, sa, za = _load_all(w_row, x_row, s_ptr, z_ptr, rows_c, stride_sn, k_lo, local, gblk0, k_hi, K, KW,
                               BITS, SMODE, HAS_ZERO, WB, WPT, NWG, ASM)
    # zeros [BLOCK_N, NWG] made from the codes so that they share the layout of the partial sums
    # (a tl.zeros accumulator had its own, and every step converted through shared memory)
    acc = tl.sum(wa, axis=2).to(tl.float32) * 0.0
    for w0 in range(k_lo, k_hi, 2 * WORDS):
        wb, xb, sb, zb = _load_all(w_row, x_row, s_ptr, z_ptr, rows_c, stride_sn, w0 + WORDS, local, gblk0, k_hi, K,
                                   KW, BITS, SMODE, HAS_ZERO, WB, WPT, NWG, ASM)
        acc += _use(wa, xa, sa, za, x_row, w0 + local, k_hi, K, KW, tabs, BITS, SIGNED, SMODE, HAS_ZERO, SMUL, F16,
                    WB, WPT, ASM, PROBE, FP4, WORD_ASM, LUT)
        wa, xa, sa, za = _load_all(w_row, x_row, s_ptr, z_ptr, rows_c, stride_sn, w0 + 2 * WORDS, local, gblk0, k_hi,
                                   K, KW, BITS, SMODE, HAS_ZERO, WB, WPT, NWG, ASM)
        acc += _use(wb, xb, sb, zb, x_row, w0 + WORDS + local, k_hi, K, KW, tabs, BITS, SIGNED, SMODE, HAS_ZERO,
                    SMUL, F16, WB, WPT, ASM, PROBE, FP4, WORD_ASM, LUT)
    y = tl.sum(acc, axis=1) * lut_mul
    if SMODE == 3:
        y = y * tl.load(s_ptr + rows_c * stride_sn, mask=rmask, other=0).to(tl.float32)
    if HAS_RS:
        y = y * tl.load(rs_ptr + rows_c, mask=rmask, other=0).to(tl.float32)
    last = True
    if SPLIT_K > 1:  # fp32 partials to the workspace; the last program on these rows writes y
        last, y = split_k_total(ws_ptr, cnt_ptr, y, pid_m.to(tl.int64) * N + rows, rmask, tl.program_id(1), pid,
                                M * N, SPLIT_K)
    if last:
        if HAS_BIAS:
            y += tl.load(b_ptr + rows_c, mask=rmask, other=0).to(tl.float32)
        if GLU:
            gate, up = tl.split(tl.reshape(y, (BLOCK_N // 2, 2)))
            h = gate / (1.0 + tl.exp(-gate)) * up
            half = (pid // M) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            tl.store(y_ptr + pid_m.to(tl.int64) * stride_ym + half, h.to(y_ptr.dtype.element_ty), mask=half < N // 2)
        else:
            tl.store(y_ptr + pid_m.to(tl.int64) * stride_ym + rows, y.to(y_ptr.dtype.element_ty), mask=rmask)
