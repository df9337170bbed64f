"""Flash-decoding over a quantized (int8 / int4) or float KV cache: one new query token, or a few,
against a long cache.

Stage 1: the cache of each (batch, kv head) is cut into `splits` chunks along the sequence; one
program per (chunk, batch, kv head) reads its chunk's codes and scales once, dequantizes them in
registers and runs the online softmax for all the query heads that share the kv head (GQA: the
group's heads are the rows of one small matrix product). It writes the chunk's normalized partial
output and its log-sum-exp. Stage 2 (`_decode_reduce`) merges the chunks.

Planes (see `reference.quantize_kv` for the byte layout): data (B, Hkv, cap, D) int8 or
(B, Hkv, cap, D/2) uint8 (int4, two codes per byte), scale (B, Hkv, cap, D / group) fp16 or
uint8 E8M0. Two stage-1 kernels:

* `_decode_split_vt`, the fast path (fp16 scales, value codes token-contiguous: tile-blocked as
  `LowbitKVCache` stores them, `reference.block_tokens`, or token-major, `token_major`): the
  P @ V product contracts over the tokens, and from a token-contiguous tile the codes reach the
  tensor cores through ldmatrix (a d-contiguous 8-bit tile would need one shared-memory load per
  element). Codes become fp16 two per
  instruction with the magic-number trick (a byte OR 0x6400 read as fp16 is 1024 + byte), never
  through int -> float conversions. By default the products are transposed (SWAP: the tile's
  tokens / dims are the MMA's M side, the G query heads of the group its N side, padded to 8
  rather than 16) and a program is one or two warps, so P stays in registers and the softmax
  needs no cross-warp reduction. int8 keys go to the int8 tensor cores with q rounded to int8 per
  row; per-token scales (int8, int4 with GROUP == D) are applied to the scores and folded into P,
  and the codes' constant offsets from the magic numbers are taken off after each product.
  With few splits the merge runs at the end of stage 1 (`fused`, `_merge_last`).
* `_decode_split`, the generic path (E8M0 scales, d-major values; a few query tokens, whose
  (query head, token) pairs are its rows, causal aligned to the end of the cache; and float caches,
  BITS 16: `decode_attention_float`, which `flash_attention` runs for one or a few query tokens).

Example (GPU):
    >>> from lowbit.attention import decode_attention                    # doctest: +SKIP
    >>> o = decode_attention(q, cache_layer)                              # doctest: +SKIP
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ..kernels.launch import cdiv, int_class, launch_remembered, next_pow2, spec_key
from .reference import DECODE_ROWS, SPLIT_ROWS, split_kernel_wins  # noqa: F401 (the rule, re-exported)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _codes(ptrs, s_ptrs, mask_n, BLOCK_N: tl.constexpr, WIDTH: tl.constexpr, GROUP_W: tl.constexpr,
           PER_TOKEN: tl.constexpr, BITS: tl.constexpr, NIBBLE: tl.constexpr, E8M0: tl.constexpr, DT: tl.constexpr):
    """One (BLOCK_N, WIDTH) tile of values in DT: int8 codes, or the low / high nibbles of int4
    bytes; per-block scales (GROUP_W columns of this tile per scale) are applied here, per-token
    ones are left to the caller (returned as a (BLOCK_N,) fp32 vector, 1.0 otherwise). BITS 16: a
    float cache, the values as stored (no scale plane is read)."""
    # (one return at the end: the JIT compiles the statements after a static return too)
    raw = tl.load(ptrs, mask=mask_n[:, None], other=0)
    if BITS == 16:
        x = raw.to(DT)
        s = tl.full([BLOCK_N], 1.0, tl.float32)
    else:
        if BITS == 8:
            x = raw
        elif NIBBLE == 0:
            x = (raw & 0xF).to(tl.int8) - 8
        else:
            x = (raw >> 4).to(tl.int8) - 8
        if PER_TOKEN:
            s = tl.load(s_ptrs, mask=mask_n, other=0)
            if E8M0:
                s = tl.math.exp2(s.to(tl.float32) - 127.0)
            x = x.to(DT)
            s = s.to(tl.float32)
        else:
            s = tl.load(s_ptrs, mask=mask_n[:, None], other=0)
            if E8M0:
                s = tl.math.exp2(s.to(tl.float32) - 127.0)
            x = x.to(tl.float32).reshape(BLOCK_N, WIDTH // GROUP_W, GROUP_W) * s.to(tl.float32)[:, :, None]
            x = x.reshape(BLOCK_N, WIDTH).to(DT)
            s = tl.full([BLOCK_N], 1.0, tl.float32)
    return x, s


@triton.jit
def _round_i8(x, INTERP: tl.constexpr):
    """Round to nearest (|x| <= 127) and convert to int8."""
    return tl.where(x >= 0, x + 0.5, x - 0.5).to(tl.int8)


@triton.jit
def _idot(a, b, INTERP: tl.constexpr):
    """int8 x int8 -> int32 matrix product (exact in fp32 for these sizes under the interpreter)."""
    if INTERP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32)).to(tl.int32)
    else:
        return tl.dot(a, b, out_dtype=tl.int32)


@triton.jit
def _chunk_bounds(KV_START, KV_END, b, split, SEQ, CHUNK, HAS_RANGES: tl.constexpr):
    """(kv_start, lo, hi): sequence b's first valid key (0 without ranges) and the token range
    [lo, hi) of chunk `split`, clipped to the sequence's end (kv_end, or SEQ)."""
    if HAS_RANGES:
        kv_start = tl.load(KV_START + b)
        kv_end = tl.minimum(tl.load(KV_END + b), SEQ)
    else:
        kv_start = 0
        kv_end = SEQ
    lo = split * CHUNK
    return kv_start, lo, tl.minimum(lo + CHUNK, kv_end)


@triton.jit
def _store_partial(OP, LSEP, acc0, acc1, m_i, l_i, has, row0, HEAD_D: tl.constexpr, G,
                   G_PAD: tl.constexpr, W: tl.constexpr, STEP: tl.constexpr, SWAP: tl.constexpr):
    """A stage-1 program's result: the normalized partial output of its G query rows (rows row0 ..
    row0 + G - 1 of OP; int8: acc0 holds all D columns, STEP 1; int4: acc0 / acc1 the even / odd
    columns, STEP 2) and their log2-sum-exp (-1e30 where the chunk had no valid token, so the merge
    gives it weight 0). acc0 / acc1 are (W, G_PAD) with SWAP, (G_PAD, W) without."""
    lse = tl.where(has, m_i + tl.math.log2(tl.maximum(l_i, 1e-30)), -1.0e30)
    offs_g = tl.arange(0, G_PAD)
    _store_rows(OP + row0 * HEAD_D, HEAD_D, acc0, acc1, 1.0 / tl.maximum(l_i, 1e-30), G, G_PAD, W, STEP, SWAP)
    tl.store(LSEP + row0 + offs_g, lse, mask=offs_g < G)


@triton.jit
def _store_rows(P, row_stride, acc0, acc1, inv, G, G_PAD: tl.constexpr, W: tl.constexpr,
                STEP: tl.constexpr, SWAP: tl.constexpr):
    """Rows g < G of P (row g at P + g * row_stride, in P's element type) = the accumulators times
    inv[g] (see `_store_partial` for acc0 / acc1 and STEP)."""
    offs_g = tl.arange(0, G_PAD)
    offs_w = tl.arange(0, W)
    ty = P.dtype.element_ty
    if SWAP:
        ptr = P + offs_g[None, :] * row_stride + offs_w[:, None] * STEP
        row_ok = offs_g[None, :] < G
        tl.store(ptr, (acc0 * inv[None, :]).to(ty), mask=row_ok)
        if STEP == 2:
            tl.store(ptr + 1, (acc1 * inv[None, :]).to(ty), mask=row_ok)
    else:
        ptr = P + offs_g[:, None] * row_stride + offs_w[None, :] * STEP
        row_ok = offs_g[:, None] < G
        tl.store(ptr, (acc0 * inv[:, None]).to(ty), mask=row_ok)
        if STEP == 2:
            tl.store(ptr + 1, (acc1 * inv[:, None]).to(ty), mask=row_ok)


@triton.jit
def _decode_split(Q, KD, KS, VD, VS, OP, LSEP, KV_START, KV_END, O, CNT,
                  stride_qb, stride_qh, stride_qs, stride_db, stride_dh, stride_dn, stride_sb, stride_sh, stride_sn,
                  stride_ob, stride_oh, H, HKV, SEQ, CHUNK, NSPLIT, qk_scale,
                  HEAD_D: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                  BITS: tl.constexpr, GROUP: tl.constexpr, E8M0: tl.constexpr, HAS_RANGES: tl.constexpr,
                  DT: tl.constexpr, SWAP: tl.constexpr, IMMA: tl.constexpr, INTERP: tl.constexpr,
                  FUSED: tl.constexpr = False, G_P2: tl.constexpr = 1, NS_PAD: tl.constexpr = 2,
                  NS_STEP: tl.constexpr = 1, SQ: tl.constexpr = 1, CAUSAL: tl.constexpr = False,
                  NRB: tl.constexpr = 1):
    """Stage 1 of the generic path (E8M0 scales, d-major values; float caches with BITS 16): see the
    module docstring. FUSED: the last program of each (batch, kv head) merges (`_merge_last`), O / CNT
    the output and arrival counters then (unused otherwise).
    SQ query tokens per sequence (float caches: a few tokens at once, e.g. speculative decoding): the
    program's rows are the G * SQ pairs (query head g, token i), row g * SQ + i, token i at q + i *
    stride_qs; CAUSAL: token i sees keys j <= i + SEQ - SQ (aligned to the end of the keys). The
    partials, the merge and the output then count G * SQ rows per kv head (the output (B, H, SQ, D)
    contiguous is (B, H * SQ, D) with row stride D).
    NRB > 1 (more rows than one program takes: a prompt continuing a cache, float caches): the rows
    are cut into NRB blocks of G_PAD, program_id(0) = chunk x NRB + block (the blocks of one chunk
    launch together, so its keys are read from memory about once); never FUSED."""
    split = tl.program_id(0) // NRB
    rb = tl.program_id(0) % NRB
    bh = tl.program_id(1)
    b = bh // HKV
    hk = bh % HKV
    PER_TOKEN: tl.constexpr = GROUP == HEAD_D
    # int8 and float (BITS 16) caches: one tile of D columns; int4: two tiles of D/2 columns (low
    # nibbles = even elements, high nibbles = odd elements), each multiplied with the matching half of q
    W: tl.constexpr = HEAD_D if BITS != 4 else HEAD_D // 2
    GW: tl.constexpr = GROUP if BITS != 4 else GROUP // 2
    NG: tl.constexpr = HEAD_D // GROUP
    R: tl.constexpr = G * SQ  # rows: (query head, token) pairs
    rows = rb * G_PAD + tl.arange(0, G_PAD)  # this program's rows (all of them when NRB == 1)
    n_rows = R - rb * G_PAD
    offs_w = tl.arange(0, W)
    STEP: tl.constexpr = 1 if BITS != 4 else 2
    q_rows = Q + b * stride_qb + (hk * G + rows[:, None] // SQ) * stride_qh + (rows[:, None] % SQ) * stride_qs
    q0 = tl.load(q_rows + offs_w[None, :] * STEP, mask=rows[:, None] < R, other=0.0).to(tl.float32) * qk_scale
    if BITS == 4:
        q1 = tl.load(q_rows + offs_w[None, :] * 2 + 1, mask=rows[:, None] < R, other=0.0).to(tl.float32) * qk_scale
    last_key = rows % SQ + (SEQ - SQ)  # CAUSAL: the last key each row sees
    if IMMA:  # int8 tensor cores: q to int8 per row (scale qs), the cache codes go in as they are
        qa = tl.max(tl.abs(q0), 1)
        if BITS == 4:
            qa = tl.maximum(qa, tl.max(tl.abs(q1), 1))
        qs = tl.maximum(qa, 1e-30) / 127.0
        q0 = _round_i8(q0 / qs[:, None], INTERP)
        if BITS == 4:
            q1 = _round_i8(q1 / qs[:, None], INTERP)
    else:
        q0 = q0.to(DT)
        if BITS == 4:
            q1 = q1.to(DT)
    kv_start, lo, hi = _chunk_bounds(KV_START, KV_END, b, split, SEQ, CHUNK, HAS_RANGES)
    offs_s = tl.arange(0, NG)
    base_d = b * stride_db + hk * stride_dh
    base_s = b * stride_sb + hk * stride_sh
    m_i = tl.full([G_PAD], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    KDT: tl.constexpr = tl.int8 if IMMA else DT
    if SWAP:  # transposed problem: the cache tile is the M side (>= 64 rows: Hopper's wgmma)
        q0t = tl.trans(q0)
        acc0 = tl.zeros([W, G_PAD], dtype=tl.float32)
        if BITS == 4:
            q1t = tl.trans(q1)
            acc1 = tl.zeros([W, G_PAD], dtype=tl.float32)
    else:
        acc0 = tl.zeros([G_PAD, W], dtype=tl.float32)
        if BITS == 4:
            acc1 = tl.zeros([G_PAD, W], dtype=tl.float32)
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        d_off = base_d + offs_n[:, None] * stride_dn + offs_w[None, :]
        if PER_TOKEN:
            s_off = base_s + offs_n * stride_sn
        else:
            s_off = base_s + offs_n[:, None] * stride_sn + offs_s[None, :]
        valid = mask_n & (offs_n >= kv_start)
        k0, sk = _codes(KD + d_off, KS + s_off, mask_n, BLOCK_N, W, GW, PER_TOKEN, BITS, 0, E8M0, KDT)
        if SWAP:
            st = tl.dot(k0, q0t)  # (BLOCK_N, G_PAD)
            if BITS == 4:
                k1, sk = _codes(KD + d_off, KS + s_off, mask_n, BLOCK_N, W, GW, PER_TOKEN, BITS, 1, E8M0, DT)
                st = tl.dot(k1, q1t, st)
            ok = valid[:, None]
            if CAUSAL:
                ok = ok & (offs_n[:, None] <= last_key[None, :])
            st = tl.where(ok, st * sk[:, None], -1.0e30)
            m_ij = tl.maximum(m_i, tl.max(st, 0))
            pt = tl.math.exp2(st - m_ij[None, :])
            alpha = tl.math.exp2(m_i - m_ij)
            l_i = l_i * alpha + tl.sum(pt, 0)
            v0, sv = _codes(VD + d_off, VS + s_off, mask_n, BLOCK_N, W, GW, PER_TOKEN, BITS, 0, E8M0, DT)
            pvt = (pt * sv[:, None]).to(DT)
            acc0 = tl.dot(tl.trans(v0), pvt, acc0 * alpha[None, :])
            if BITS == 4:
                v1, sv = _codes(VD + d_off, VS + s_off, mask_n, BLOCK_N, W, GW, PER_TOKEN, BITS, 1, E8M0, DT)
                acc1 = tl.dot(tl.trans(v1), pvt, acc1 * alpha[None, :])
        else:
            if IMMA:  # q codes . k codes on the int8 tensor cores (int32), then both scales
                qk = _idot(q0, tl.trans(k0), INTERP)
                if BITS == 4:
                    k1, sk = _codes(KD + d_off, KS + s_off, mask_n, BLOCK_N, W, GW, PER_TOKEN, BITS, 1, E8M0, KDT)
                    qk += _idot(q1, tl.trans(k1), INTERP)
                qk = qk.to(tl.float32) * qs[:, None]
            else:
                qk = tl.dot(q0, tl.trans(k0))
                if BITS == 4:
                    k1, sk = _codes(KD + d_off, KS + s_off, mask_n, BLOCK_N, W, GW, PER_TOKEN, BITS, 1, E8M0, KDT)
                    qk = tl.dot(q1, tl.trans(k1), qk)
            ok = valid[None, :]
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= last_key[:, None])
            qk = tl.where(ok, qk * sk[None, :], -1.0e30)
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - m_ij[:, None])
            alpha = tl.math.exp2(m_i - m_ij)
            l_i = l_i * alpha + tl.sum(p, 1)
            v0, sv = _codes(VD + d_off, VS + s_off, mask_n, BLOCK_N, W, GW, PER_TOKEN, BITS, 0, E8M0, DT)
            pv = (p * sv[None, :]).to(DT)
            acc0 = tl.dot(pv, v0, acc0 * alpha[:, None])
            if BITS == 4:
                v1, sv = _codes(VD + d_off, VS + s_off, mask_n, BLOCK_N, W, GW, PER_TOKEN, BITS, 1, E8M0, DT)
                acc1 = tl.dot(pv, v1, acc1 * alpha[:, None])
        m_i = m_ij
    # empty chunk (past the end, or all padding): lse = -1e30 so the merge gives it weight 0
    has = hi > tl.maximum(lo, kv_start)
    if BITS != 4:  # one tile holds all D columns (STEP 1): the odd-column slot goes unused
        acc1 = acc0
    if NRB == 1:
        _store_partial(OP, LSEP, acc0, acc1, m_i, l_i, has, (bh * NSPLIT + split) * R, HEAD_D, R, G_PAD, W, STEP, SWAP)
    else:
        _store_partial(OP, LSEP, acc0, acc1, m_i, l_i, has, (bh * NSPLIT + split) * R + rb * G_PAD, HEAD_D, n_rows,
                       G_PAD, W, STEP, SWAP)
    if FUSED:
        _merge_last(OP, LSEP, O, CNT, bh, b, hk, stride_ob, stride_oh, NSPLIT, HEAD_D, R, G_P2, NS_PAD, NS_STEP)


# ---------------------------------------------------------------------------------------------
# Token-major values ("vt" layout): the fast path
# ---------------------------------------------------------------------------------------------
# PV contracts over the tokens, and the tensor cores want each thread's operand pairs consecutive
# along the contraction: with the value plane stored d-major (token stride 1, i.e. the plane
# (B, Hkv, cap, W) viewed with strides (., ., 1, cap)), a value tile is K-contiguous in shared
# memory and reaches the MMA through ldmatrix, where a d-contiguous int8 tile needs one 8-bit
# shared load per element. The codes are turned into fp16 two at a time with the magic-number
# trick (byte | 0x6400 read as fp16 is 1024 + byte), never through int -> float conversions.

_CVT8 = tl.constexpr("""{
.reg .b32 t, m;
xor.b32 t, $2, 0x80808080;
mov.b32 m, 0x64646464;
prmt.b32 $0, t, m, 0x4140;
prmt.b32 $1, t, m, 0x4342;
}""")
# int8 code c -> fp16 1152 + c: the 1152 is taken off after the product (`OFF8`), not per value

_CVT4 = tl.constexpr("""{
.reg .b32 w4, c;
mov.b32 c, 0x64086408;
shr.b32 w4, $4, 4;
prmt.b32 $0, $4, $7, 0x4140;
prmt.b32 $1, $4, $7, 0x4342;
prmt.b32 $2, w4, $7, 0x4140;
prmt.b32 $3, w4, $7, 0x4342;
and.b32 $0, $0, 0x640F640F;
and.b32 $1, $1, 0x640F640F;
and.b32 $2, $2, 0x640F640F;
and.b32 $3, $3, 0x640F640F;
sub.f16x2 $0, $0, c;
sub.f16x2 $1, $1, c;
sub.f16x2 $2, $2, c;
sub.f16x2 $3, $3, c;
mul.f16x2 $0, $0, $5;
mul.f16x2 $1, $1, $6;
mul.f16x2 $2, $2, $5;
mul.f16x2 $3, $3, $6;
}""")


_NIB4 = tl.constexpr("""{
.reg .b32 l, h;
and.b32 l, $4, 0x0F0F0F0F;
and.b32 h, $4, 0xF0F0F0F0;
prmt.b32 $0, l, $5, 0x4140;
prmt.b32 $1, l, $5, 0x4342;
prmt.b32 $2, h, $5, 0x4140;
prmt.b32 $3, h, $5, 0x4342;
}""")
# int4 byte u (low nibble c0 + 8, high nibble c1 + 8) -> fp16 (1024 + c0 + 8, 1024 + 16 (c1 + 8)):
# three instructions per two values, with no per-value offset or scale; `_nib4` says how to undo them.

# The constant offsets of `_cvt8` / `_nib4` codes (and `_nib4`'s factor on the high nibbles), taken off
# after each product; the interpreter twins use smaller ones (exact in fp32). Module constants, so that
# the kernels and `_prep_q` share them (the kernels' INTERP argument is always `_INTERPRET`).
OFF8 = tl.constexpr(128.0 if _INTERPRET else 1152.0)
OFF_LO = tl.constexpr(8.0 if _INTERPRET else 1032.0)
OFF_HI = tl.constexpr(8.0 if _INTERPRET else 72.0)
HI_MUL = tl.constexpr(0.0625)


@triton.jit
def _cvt8(raw, INTERP: tl.constexpr):
    """int8 codes c -> c + OFF8 as fp16 (exact): four per 32-bit word (xor 0x80, then byte | 0x6400 is
    1024 + 128 + c). Products with these values are corrected by OFF8 times the other operand's sum
    (OFF8 = 1152, 128 for the twin)."""
    if INTERP:  # the twin: a smaller offset, exact in fp32, so the correction is exercised on CPU too
        return raw.to(tl.float32) + 128.0
    else:
        return tl.inline_asm_elementwise(_CVT8, "=r,=r,r", [raw], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _nib4(raw, INTERP: tl.constexpr):
    """int4 bytes (B, low nibble c0 + 8, high nibble c1 + 8) -> (lo, hi) fp16 tiles of raw's shape with
    lo = c0 + OFF_LO, hi = (c1 + OFF_HI) / HI_MUL (the module constants OFF_LO, OFF_HI, HI_MUL): the offsets and the factor are
    undone once per product, through the other operand, instead of once per value. OFF_LO, OFF_HI,
    HI_MUL = 1032, 72, 1/16 (8, 8, 1/16 for the twin): value_lo = lo - OFF_LO, value_hi = hi * HI_MUL - OFF_HI."""
    if INTERP:  # the twin: codes + 8 and 16 (codes + 8), exact in fp32
        lo = (raw & 0xF).to(tl.float32)
        hi = (raw & 0xF0).to(tl.float32)
        return lo, hi
    else:
        m = tl.full(raw.shape, 0x64646464, tl.int32)  # one register, not one per instance
        return tl.inline_asm_elementwise(_NIB4, "=r,=r,=r,=r,r,r,r,r,r", [raw, m], dtype=(tl.float16, tl.float16),
                                         is_pure=True, pack=4)


_NIB4I = tl.constexpr("""{
.reg .b32 t;
and.b32 $0, $2, 0x0F0F0F0F;
shr.u32 t, $2, 4;
and.b32 $1, t, 0x0F0F0F0F;
}""")


@triton.jit
def _nib4i(raw, INTERP: tl.constexpr):
    """int4 bytes -> (c0 + 8, c1 + 8) as int8 tiles of raw's shape (for the int8 tensor cores), four
    bytes per 32-bit word in three instructions."""
    if INTERP:
        return (raw & 0xF).to(tl.int8), (raw >> 4).to(tl.int8)
    else:
        return tl.inline_asm_elementwise(_NIB4I, "=r,=r,r", [raw], dtype=(tl.int8, tl.int8), is_pure=True, pack=4)


@triton.jit
def _cvt4(raw, s, INTERP: tl.constexpr):
    """int4 bytes -> (low nibbles, high nibbles) as fp16 values (code - 8) * s; s broadcast to raw's
    shape. Byte j holds elements 2j (low) and 2j+1 (high); the two results keep raw's shape."""
    if INTERP:
        lo = ((raw & 0xF).to(tl.int32) - 8).to(tl.float32) * s.to(tl.float32)
        hi = ((raw >> 4).to(tl.int32) - 8).to(tl.float32) * s.to(tl.float32)
        return lo, hi
    else:
        # the last input is the constant 0x64646464 (one register, not one per instance)
        m = tl.full(raw.shape, 0x64646464, tl.int32)
        return tl.inline_asm_elementwise(_CVT4, "=r,=r,=r,=r,r,r,r,r,r,r,r", [raw, s, m], dtype=(tl.float16, tl.float16),
                                         is_pure=True, pack=4)


@triton.jit
def _merge_last(OP, LSEP, O, CNT, bh, b, hk, stride_ob, stride_oh, NSPLIT,
                HEAD_D: tl.constexpr, G: tl.constexpr, G_P2: tl.constexpr, NS_PAD: tl.constexpr,
                NS_STEP: tl.constexpr):
    """Stage 2 inside stage 1 (`FUSED`): the program that finishes last among the NSPLIT programs of
    one (batch, kv head) merges their partial outputs, so no second kernel is launched. The counter
    is reset by that program, ready for the next call in stream order."""
    tl.debug_barrier()  # every thread's partial stores precede the release below (CTA barrier)
    done = tl.atomic_add(CNT + bh, 1, sem="acq_rel", scope="gpu")
    if done == NSPLIT - 1:
        tl.store(CNT + bh, 0)
        offs_g = tl.arange(0, G_P2)
        offs_s = tl.arange(0, NS_PAD)
        offs_d = tl.arange(0, HEAD_D)
        g_ok = offs_g < G
        rows = (bh * NSPLIT + offs_s[:, None]) * G + offs_g[None, :]
        if NS_STEP >= NS_PAD:  # one pass: the scores and the partial rows are loaded together
            ok = (offs_s[:, None] < NSPLIT) & g_ok[None, :]
            lse = tl.load(LSEP + rows, mask=ok, other=-1.0e30, cache_modifier=".cg")
            o = tl.load(OP + rows[:, :, None] * HEAD_D + offs_d[None, None, :], mask=ok[:, :, None], other=0.0,
                        cache_modifier=".cg")
            mx = tl.max(lse, 0)
            w = tl.where(lse > -1.0e29, tl.math.exp2(lse - mx[None, :]), 0.0)
            den = tl.sum(w, 0)
            acc = tl.sum(o * w[:, :, None], 0)
        else:
            lse = tl.load(LSEP + rows, mask=(offs_s[:, None] < NSPLIT) & g_ok[None, :], other=-1.0e30,
                          cache_modifier=".cg")
            mx = tl.max(lse, 0)
            den = tl.sum(tl.where(lse > -1.0e29, tl.math.exp2(lse - mx[None, :]), 0.0), 0)
            acc = tl.zeros([G_P2, HEAD_D], dtype=tl.float32)
            offs_c = tl.arange(0, NS_STEP)
            for s0 in tl.range(0, NSPLIT, NS_STEP):  # NS_STEP partials of the G heads at a time
                ss = s0 + offs_c
                rc = (bh * NSPLIT + ss[:, None]) * G + offs_g[None, :]
                ok = (ss[:, None] < NSPLIT) & g_ok[None, :]
                lc = tl.load(LSEP + rc, mask=ok, other=-1.0e30, cache_modifier=".cg")
                w = tl.where(lc > -1.0e29, tl.math.exp2(lc - mx[None, :]), 0.0)
                o = tl.load(OP + rc[:, :, None] * HEAD_D + offs_d[None, None, :], mask=ok[:, :, None], other=0.0,
                            cache_modifier=".cg")
                acc += tl.sum(o * w[:, :, None], 0)
        res = acc / tl.maximum(den, 1e-30)[:, None]
        h = hk * G + offs_g
        tl.store(O + b * stride_ob + h[:, None] * stride_oh + offs_d[None, :], res.to(O.dtype.element_ty),
                 mask=g_ok[:, None])


@triton.jit
def _prep_q(q_rows, offs_g, offs_w, G, qk_scale, BITS: tl.constexpr, PT: tl.constexpr, IMMA: tl.constexpr,
            SWAP: tl.constexpr, FT: tl.constexpr, INTERP: tl.constexpr):
    """The G query rows (pointers `q_rows`, padded to offs_g's length) as `_decode_split_vt`'s products
    take them: (q0, q1, qs, qoff); int8: q0 holds all D columns (q1 = q0); int4: q0 / q1 the even /
    odd columns (offs_w: the W column pairs). q is scaled by
    qk_scale; with IMMA rounded to int8 per row (scale qs, 1 otherwise); for int4 with one scale per
    token q1 carries the 1/16 of `_nib4`'s high nibbles; qoff is what the codes' constant offsets add
    to each score (taken off after the key product); with SWAP q0 / q1 come transposed (W, G_PAD)."""
    W: tl.constexpr = offs_w.shape[0]
    if BITS == 8:
        q0 = tl.load(q_rows + offs_w[None, :], mask=offs_g[:, None] < G, other=0.0).to(tl.float32) * qk_scale
        q1 = q0
    else:  # one contiguous row load, split into the even / odd columns in registers
        q = tl.load(q_rows + tl.arange(0, 2 * W)[None, :], mask=offs_g[:, None] < G, other=0.0).to(tl.float32)
        q0, q1 = tl.split(q.reshape(q.shape[0], W, 2))
        q0 = q0 * qk_scale
        q1 = q1 * qk_scale
    if IMMA:  # q rounded to int8 per row (scale qs); the cache codes go to the int8 tensor cores
        qa = tl.max(tl.abs(q0), 1)
        if BITS == 4:
            qa = tl.maximum(qa, tl.max(tl.abs(q1), 1))
        qs = tl.maximum(qa, 1e-30) / 127.0
        q0 = _round_i8(q0 / qs[:, None], INTERP)
        q1 = _round_i8(q1 / qs[:, None], INTERP)
    else:
        qs = tl.full([q0.shape[0]], 1.0, tl.float32)
        q0 = q0.to(FT)
        if BITS == 4 and PT:  # the high nibbles come 16x larger from `_nib4`
            q1 = q1 * HI_MUL
        q1 = q1.to(FT)
    if BITS == 4 and PT and IMMA:  # codes + 8 from `_nib4i`
        qoff = 8.0 * (tl.sum(q0.to(tl.float32), 1) + tl.sum(q1.to(tl.float32), 1))
    elif BITS == 4 and PT:
        qoff = OFF_LO * tl.sum(q0.to(tl.float32), 1) + (OFF_HI / HI_MUL) * tl.sum(q1.to(tl.float32), 1)
    elif BITS == 8 and not IMMA:
        qoff = OFF8 * tl.sum(q0.to(tl.float32), 1)
    else:
        qoff = qs * 0.0
    if SWAP:
        q0 = tl.trans(q0)
        q1 = tl.trans(q1)
    return q0, q1, qs, qoff


@triton.jit
def _decode_split_vt(Q, KD, KS, VD, VS, OP, LSEP, KV_START, KV_END, O, CNT,
                     stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vw,
                     stride_sb, stride_sh, stride_sn, stride_ob, stride_oh, H, HKV, SEQ, CAP, CHUNK, NSPLIT, qk_scale,
                     stride_qs, HEAD_D: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                     BITS: tl.constexpr, GROUP: tl.constexpr, HAS_RANGES: tl.constexpr, IMMA: tl.constexpr,
                     SWAP: tl.constexpr, FUSED: tl.constexpr, G_P2: tl.constexpr, NS_PAD: tl.constexpr,
                     NS_STEP: tl.constexpr, INTERP: tl.constexpr, DIRECT: tl.constexpr = False,
                     VBLK: tl.constexpr = 0, LATE_Q: tl.constexpr = False, SQ: tl.constexpr = 1,
                     CAUSAL: tl.constexpr = False, NRB: tl.constexpr = 1):
    """Stage 1 of flash-decoding for fp16 scales and token-major value planes (see above).

    Keys (B, Hkv, cap, W) d-contiguous, values (B, Hkv, W, cap) token-contiguous, W = D (int8) or
    D/2 (int4: byte j = elements 2j, 2j+1 of the token). One scale per token (int8, and int4 with
    GROUP == HEAD_D): applied to the scores (keys) and folded into the probabilities (values,
    normalized by the tile's largest scale so that fp16 keeps its precision); the codes go to the
    tensor cores with a constant offset (`_cvt8`, `_nib4`) that is taken off after each product
    through the sum of the other operand. int4 with one scale per GROUP < HEAD_D values: applied in
    the dequantization (`_cvt4`, one f16x2 multiply per two values). FUSED: stage 2 runs at the end
    of the last program of each (batch, kv head) (`_merge_last`). DIRECT (one chunk per (batch, kv
    head)): the program writes the output rows itself, no partials, no merge.
    SQ query tokens per sequence (a few at once: speculative decoding's drafts), as in `_decode_split`:
    the rows are the G * SQ pairs (query head g, token i), row g * SQ + i, token i at q + i * stride_qs;
    CAUSAL: token i sees keys j <= i + SEQ - SQ; the output (B, H, SQ, D) is (B, H * SQ, D) with row
    stride `stride_oh` (= D). NRB > 1: the rows in blocks of G_PAD, as in `_decode_split`.
    """
    split = tl.program_id(0) // NRB
    rb = tl.program_id(0) % NRB
    bh = tl.program_id(1)
    b = bh // HKV
    hk = bh % HKV
    W: tl.constexpr = HEAD_D if BITS == 8 else HEAD_D // 2
    NG: tl.constexpr = HEAD_D // GROUP
    GW: tl.constexpr = W // NG
    STEP: tl.constexpr = 1 if BITS == 8 else 2
    FT: tl.constexpr = tl.float32 if INTERP else tl.float16
    PT: tl.constexpr = GROUP == HEAD_D  # one scale per token
    R: tl.constexpr = G * SQ  # rows: (query head, token) pairs
    offs_g = rb * G_PAD + tl.arange(0, G_PAD)  # this program's rows (all of them when NRB == 1)
    offs_w = tl.arange(0, W)
    q_rows = Q + b * stride_qb + (hk * G + offs_g[:, None] // SQ) * stride_qh + (offs_g[:, None] % SQ) * stride_qs
    last_key = offs_g % SQ + (SEQ - SQ)  # CAUSAL: the last key each row sees
    # LATE_Q: q is loaded and prepared in the loop's first trip. Prepared before the loop, it holds back
    # the pipeline's first tile loads until q arrives (sm_90 SASS: the prologue's cp.async after the
    # wait; a timeline of the programs put q's arrival 0.9-1.4 us after their start on an H200), but
    # carried through the loop it costs registers and a little per tile: faster for int4 per 32 values
    # only (the host's default, `decode_attention_triton`)
    KQT: tl.constexpr = tl.int8 if IMMA else FT
    if LATE_Q:  # placeholders of the prepared values' types
        if SWAP:
            q0 = tl.zeros([W, G_PAD], KQT)
        else:
            q0 = tl.zeros([G_PAD, W], KQT)
        q1 = q0
        qs = tl.zeros([G_PAD], dtype=tl.float32)
        qoff = qs
    else:
        q0, q1, qs, qoff = _prep_q(q_rows, offs_g, offs_w, R, qk_scale, BITS, PT, IMMA, SWAP, FT, INTERP)
    kv_start, lo, hi = _chunk_bounds(KV_START, KV_END, b, split, SEQ, CHUNK, HAS_RANGES)
    k_base = KD + b * stride_kb + hk * stride_kh
    v_base = VD + b * stride_vb + hk * stride_vh
    s_base = b * stride_sb + hk * stride_sh
    m_i = tl.full([G_PAD], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    if SWAP:  # transposed products: the tile's tokens / dims are the M side, the G rows the N side
        acc0 = tl.zeros([W, G_PAD], dtype=tl.float32)
        if BITS == 4:
            acc1 = tl.zeros([W, G_PAD], dtype=tl.float32)
    else:
        acc0 = tl.zeros([G_PAD, W], dtype=tl.float32)
        if BITS == 4:
            acc1 = tl.zeros([G_PAD, W], dtype=tl.float32)
    offs_ng = tl.arange(0, NG)
    mv_run = 1.0  # SWAP and PT: the value accumulators' unit (see the value product below)
    for start_n in tl.range(lo, hi, BLOCK_N):
        if LATE_Q:
            if start_n == lo:
                q0, q1, qs, qoff = _prep_q(q_rows, offs_g, offs_w, R, qk_scale, BITS, PT, IMMA, SWAP, FT, INTERP)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        valid = mask_n & (offs_n >= kv_start)
        # the code tiles are read up to the planes' capacity CAP, not to hi: a multiple of 16 there keeps
        # the token-contiguous value loads 16 bytes wide (masked at hi they fell apart into byte loads
        # whenever the length was not a multiple of 16, i.e. in most decode steps); the extra tokens
        # get no weight: their scores are masked and their scales are set to 0
        in_cap = offs_n < CAP
        kraw = tl.load(k_base + offs_n[:, None] * stride_kn + offs_w[None, :], mask=in_cap[:, None], other=0)
        if VBLK:  # tile-blocked values (B, Hkv, cap / VBLK, W, VBLK): each VBLK-token tile is contiguous
            v_off = (offs_n // VBLK) * (W * VBLK) + offs_n % VBLK
            vraw = tl.load(v_base + offs_w[:, None] * VBLK + v_off[None, :], mask=in_cap[None, :], other=0)
        else:
            vraw = tl.load(v_base + offs_w[:, None] * stride_vw + offs_n[None, :], mask=in_cap[None, :], other=0)
        # scores s (G_PAD, BLOCK_N), or s^T (BLOCK_N, G_PAD) when SWAP
        if PT:
            # scales, too, are loaded to CAP (wide, pipelined loads) and zeroed past hi (NaN-safe)
            sk = tl.where(mask_n, tl.load(KS + s_base + offs_n * stride_sn, mask=in_cap, other=0).to(tl.float32), 0.0)
            sv = tl.where(mask_n, tl.load(VS + s_base + offs_n * stride_sn, mask=in_cap, other=0).to(tl.float32), 0.0)
            if BITS == 8:
                if SWAP:
                    if IMMA:
                        st = _idot(kraw, q0, INTERP).to(tl.float32) * (qs[None, :] * sk[:, None])
                    else:
                        st = (tl.dot(_cvt8(kraw, INTERP), q0) - qoff[None, :]) * sk[:, None]
                else:
                    if IMMA:
                        st = _idot(q0, tl.trans(kraw), INTERP).to(tl.float32) * (qs[:, None] * sk[None, :])
                    else:
                        st = (tl.dot(q0, tl.trans(_cvt8(kraw, INTERP))) - qoff[:, None]) * sk[None, :]
            elif IMMA:
                k0, k1 = _nib4i(kraw, INTERP)
                if SWAP:
                    st = ((_idot(k0, q0, INTERP) + _idot(k1, q1, INTERP)).to(tl.float32)
                          - qoff[None, :]) * (qs[None, :] * sk[:, None])
                else:
                    st = ((_idot(q0, tl.trans(k0), INTERP) + _idot(q1, tl.trans(k1), INTERP)).to(tl.float32)
                          - qoff[:, None]) * (qs[:, None] * sk[None, :])
            else:
                k0, k1 = _nib4(kraw, INTERP)
                if SWAP:
                    st = (tl.dot(k1, q1, tl.dot(k0, q0)) - qoff[None, :]) * sk[:, None]
                else:
                    st = (tl.dot(q1, tl.trans(k1), tl.dot(q0, tl.trans(k0))) - qoff[:, None]) * sk[None, :]
        else:
            s_off = s_base + offs_n[:, None] * stride_sn + offs_ng[None, :]
            # (masked at hi: loaded to CAP and zeroed with a select, this path went from 43 to 61 us at
            # (B, S) = (8, 8192) on an H200)
            skg = tl.load(KS + s_off, mask=mask_n[:, None], other=0)  # (BLOCK_N, NG) fp16
            svg = tl.load(VS + s_off, mask=mask_n[:, None], other=0)
            skb = tl.broadcast_to(skg[:, :, None], (BLOCK_N, NG, GW)).reshape(BLOCK_N, W)
            k0, k1 = _cvt4(kraw, skb, INTERP)
            if SWAP:
                st = tl.dot(k1, q1, tl.dot(k0, q0))
            else:
                st = tl.dot(q1, tl.trans(k1), tl.dot(q0, tl.trans(k0)))
        if SWAP:
            ok = valid[:, None]
            if CAUSAL:
                ok = ok & (offs_n[:, None] <= last_key[None, :])
            st = tl.where(ok, st, -1.0e30)
            m_ij = tl.maximum(m_i, tl.max(st, 0))
            p = tl.math.exp2(st - m_ij[None, :])
            alpha = tl.math.exp2(m_i - m_ij)
            l_i = l_i * alpha + tl.sum(p, 0)
            if PT:  # p' = p * sv / mv in fp16 (mv: the tile's largest scale, for fp16's precision)
                mv = tl.maximum(tl.max(sv, 0), 1e-30)
                pv = (p * (sv * (1.0 / mv))[:, None]).to(FT)
                # the accumulators count in units of the latest tile's mv (acc1: 16x, as `_nib4`'s
                # high nibbles): the rescale goes into the tensor cores' accumulator, and the codes'
                # offset times sum(p') comes off right after each product (deferred past the loop,
                # int8's error vs the float cache rose from 1.1e-2 to 2.7e-2 at (32, 4096) on an
                # H200: the offsets' sum grows with the tokens, and fp32 cancels it badly)
                r = alpha * (mv_run / mv)
                psum = tl.sum(pv.to(tl.float32), 0)[None, :]
                mv_run = mv
                if BITS == 8:
                    acc0 = tl.dot(_cvt8(vraw, INTERP), pv, acc0 * r[None, :]) - OFF8 * psum
                else:
                    v0, v1 = _nib4(vraw, INTERP)
                    acc0 = tl.dot(v0, pv, acc0 * r[None, :]) - OFF_LO * psum
                    acc1 = tl.dot(v1, pv, acc1 * r[None, :]) - (OFF_HI / HI_MUL) * psum
            else:
                svb = tl.broadcast_to(tl.trans(svg)[:, None, :], (NG, GW, BLOCK_N)).reshape(W, BLOCK_N)
                v0, v1 = _cvt4(vraw, svb, INTERP)
                pv = p.to(FT)
                acc0 = tl.dot(v0, pv, acc0 * alpha[None, :])
                acc1 = tl.dot(v1, pv, acc1 * alpha[None, :])
        else:
            ok = valid[None, :]
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= last_key[:, None])
            st = tl.where(ok, st, -1.0e30)
            m_ij = tl.maximum(m_i, tl.max(st, 1))
            p = tl.math.exp2(st - m_ij[:, None])
            alpha = tl.math.exp2(m_i - m_ij)
            l_i = l_i * alpha + tl.sum(p, 1)
            if PT:
                mv = tl.maximum(tl.max(sv, 0), 1e-30)
                pv = (p * (sv * (1.0 / mv))[None, :]).to(FT)
                psum = tl.sum(pv.to(tl.float32), 1)[:, None]
                if BITS == 8:
                    acc0 = acc0 * alpha[:, None] + (tl.dot(pv, tl.trans(_cvt8(vraw, INTERP))) - OFF8 * psum) * mv
                else:
                    v0, v1 = _nib4(vraw, INTERP)
                    acc0 = acc0 * alpha[:, None] + (tl.dot(pv, tl.trans(v0)) - OFF_LO * psum) * mv
                    acc1 = acc1 * alpha[:, None] + (tl.dot(pv, tl.trans(v1)) * HI_MUL - OFF_HI * psum) * mv
            else:
                svb = tl.broadcast_to(tl.trans(svg)[:, None, :], (NG, GW, BLOCK_N)).reshape(W, BLOCK_N)
                v0, v1 = _cvt4(vraw, svb, INTERP)
                pv = p.to(FT)
                acc0 = tl.dot(pv, tl.trans(v0), acc0 * alpha[:, None])
                acc1 = tl.dot(pv, tl.trans(v1), acc1 * alpha[:, None])
        m_i = m_ij
    has = hi > tl.maximum(lo, kv_start)
    if SWAP and PT:  # the value accumulators' unit (see the loop)
        acc0 = acc0 * mv_run
        if BITS == 4:
            acc1 = acc1 * (HI_MUL * mv_run)
    if BITS == 8:  # one tile holds all D columns (STEP 1): the helpers' odd-column slot goes unused
        acc1 = acc0
    if DIRECT:  # one chunk per (batch, kv head): the normalized rows are the output (0 without a valid token)
        inv = tl.where(has, 1.0 / tl.maximum(l_i, 1e-30), 0.0)
        if NRB == 1:
            _store_rows(O + b * stride_ob + hk * R * stride_oh, stride_oh, acc0, acc1, inv, R, G_PAD, W, STEP, SWAP)
        else:
            _store_rows(O + b * stride_ob + (hk * R + rb * G_PAD) * stride_oh, stride_oh, acc0, acc1, inv,
                        R - rb * G_PAD, G_PAD, W, STEP, SWAP)
    elif NRB == 1:
        _store_partial(OP, LSEP, acc0, acc1, m_i, l_i, has, (bh * NSPLIT + split) * R, HEAD_D, R, G_PAD, W, STEP, SWAP)
    else:
        _store_partial(OP, LSEP, acc0, acc1, m_i, l_i, has, (bh * NSPLIT + split) * R + rb * G_PAD, HEAD_D,
                       R - rb * G_PAD, G_PAD, W, STEP, SWAP)
    if FUSED and not DIRECT:
        _merge_last(OP, LSEP, O, CNT, bh, b, hk, stride_ob, stride_oh, NSPLIT, HEAD_D, R, G_P2, NS_PAD, NS_STEP)


@triton.jit
def _decode_reduce(OP, LSEP, O, stride_ob, stride_oh, HKV, NSPLIT,
                   HEAD_D: tl.constexpr, G: tl.constexpr, NS_PAD: tl.constexpr):
    pid = tl.program_id(0)  # one per (batch, query head)
    b = pid // (HKV * G)
    h = pid % (HKV * G)
    hk = h // G
    g = h % G
    offs_s = tl.arange(0, NS_PAD)
    offs_d = tl.arange(0, HEAD_D)
    rows = ((b * HKV + hk) * NSPLIT + offs_s) * G + g
    lse = tl.load(LSEP + rows, mask=offs_s < NSPLIT, other=-1.0e30)
    mx = tl.max(lse, 0)
    w = tl.where(lse > -1.0e29, tl.math.exp2(lse - mx), 0.0)
    o = tl.load(OP + rows[:, None] * HEAD_D + offs_d[None, :], mask=offs_s[:, None] < NSPLIT, other=0.0)
    res = tl.sum(o * w[:, None], 0) / tl.maximum(tl.sum(w, 0), 1e-30)
    tl.store(O + b * stride_ob + h * stride_oh + offs_d, res.to(O.dtype.element_ty))


_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    idx = device.index or 0
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


_CNT: dict[tuple, torch.Tensor] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """n zeroed int32 arrival counters for the fused merge, one buffer per (device, stream): each
    call leaves them at zero again (the last program of a group resets its counter), so calls in
    one stream can share them, CUDA-graph replays included. Calls running concurrently on one
    stream's buffer are not supported (they cannot happen in stream order)."""
    key = (str(device), torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    buf = _CNT.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _CNT[key] = buf
    return buf


def token_major(plane: torch.Tensor) -> torch.Tensor:
    """The same logical plane (B, Hkv, cap, W) stored d-major (token stride 1): the layout the fast
    decode path wants for the value codes. Values and indexing are unchanged (a strided view).

    Example:
        >>> t = token_major(torch.arange(6, dtype=torch.int8).reshape(1, 1, 3, 2))
        >>> t.stride(), t.tolist()
        ((6, 6, 1, 3), [[[[0, 1], [2, 3], [4, 5]]]])
    """
    return plane.transpose(-1, -2).contiguous().transpose(-1, -2)


def is_token_major(plane: torch.Tensor) -> bool:
    return plane.stride(-2) == 1 and plane.shape[-2] > 1


def _fast_config(bits: int, per_token: bool, pairs: int, seq_len: int, sms: int, block_n, num_warps, num_stages,
                 programs_per_sm, rows: int = 4) -> tuple[int, int, int, int]:
    """(block_n, num_warps, num_stages, programs_per_sm) of the fast path; arguments given win.

    Defaults: the best of `benchmarks/attention.py --tune` on an H200 at (B, S) = (8, 8192) and
    (32, 4096) (RESULTS.md: int4 per 32 values 1 / 64 / 3 / 8; int8 2 / 128 / 3 / 2 and int4 per token
    1 / 128 / 3 / 4: fewer programs with deeper pipelines). With few (batch, kv head) pairs and a short
    cache those give programs of two tiles and few warps in flight (at (1, 1024) every format was
    slower than SDPA); there 64-token tiles and more programs win (session 21 sweep, B = 1-4: int8
    (1, 8192) 12.7 -> 12.0 us, int4 per token 11.8 -> 10.1, (1, 1024) 8.5 / 9.1 -> 7.1).

    More than 8 rows a program (a few query tokens of each head, `rows` = heads x tokens per kv
    head; the scores and the accumulators grow with them): int8 128-token tiles (64 where fewer
    programs than SMs would have two 128-token tiles each: (1, 1024) 16 tokens 25.8 -> 17.2 us, (1,
    8192) 8 tokens 23.9 with 64 vs 20.7 with 128) and 4 warps, int4 64-token tiles and 2 warps,
    the best of a sweep of four configs at 16-64 rows, (B, S) = (1, 8192) and (8, 8192) on an H200
    (RESULTS.md, sessions 33-34).

    Example:
        >>> _fast_config(8, True, 8, 8192, 132, None, None, None, None)     # B = 1: 8 (batch, kv head) pairs
        (64, 1, 3, 8)
        >>> _fast_config(8, True, 64, 8192, 132, None, None, None, None)    # B = 8
        (128, 2, 3, 2)
    """
    if bits == 8:
        cfg = (128, 2, 3, 2)
        small = (64, 1, 3, 8)
    elif per_token:
        cfg = (128, 1, 3, 4)
        small = (64, 1, 3, 8)
    else:
        cfg = (64, 1, 3, 8)
        small = (64, 2, 3, 8)
    bn, warps, _, pps = cfg
    want = max(1, pps * sms // pairs)
    capped = want > cdiv(seq_len, 2 * bn)  # each program would get the two-tile minimum
    if capped and pairs * min(want, cdiv(seq_len, 2 * bn)) * warps < 6 * sms:
        cfg = small
    if rows > 8:  # int8: 64-token tiles where 128-token ones would leave SMs without a program
        few = pairs * cdiv(seq_len, 2 * 128) < sms
        cfg = ((64 if few else 128, 4) if bits == 8 else (64, 2)) + cfg[2:]
    return (block_n or cfg[0], num_warps or cfg[1], num_stages or cfg[2], programs_per_sm or cfg[3])


def _split_plan(seq_len: int, bn: int, pairs: int, programs_per_sm: int, splits: int | None,
                device: torch.device) -> tuple[int, int]:
    """(splits, chunk): the sequence cut into chunks of whole `bn`-token tiles; `splits` None: enough
    programs per SM (`programs_per_sm`, over the (batch, kv head) `pairs`) to hide the memory latency,
    at least two tiles each.

    Example:
        >>> _split_plan(1000, 64, 8, 8, None, torch.device("cpu"))   # 8 "SMs" off the GPU
        (8, 128)
    """
    if splits is None:
        splits = max(1, min(max(1, programs_per_sm * _num_sms(device) // pairs), cdiv(seq_len, 2 * bn)))
    chunk = cdiv(cdiv(seq_len, splits), bn) * bn
    return cdiv(seq_len, chunk), chunk


def _partials(rows: int, d: int, kv_start, kv_end, batch: int, seq_len: int, device: torch.device):
    """Stage 1's outputs, (rows, d) fp32 partial outputs and (rows,) log-sum-exps, and the key ranges
    as the kernels take them: (op, lse, has_ranges, kv_start, kv_end), int32 (B,) ranges with either
    bound defaulted, or a placeholder tensor for both when neither is given."""
    op = torch.empty(rows, d, dtype=torch.float32, device=device)
    lse = torch.empty(rows, dtype=torch.float32, device=device)
    if kv_start is None and kv_end is None:
        return op, lse, False, lse, lse
    start = kv_start if kv_start is not None else torch.zeros(batch, dtype=torch.int32, device=device)
    end = kv_end if kv_end is not None else torch.full((batch,), seq_len, dtype=torch.int32, device=device)
    return op, lse, True, start.to(device, torch.int32), end.to(device, torch.int32)


def _merge_step(ns_pad: int, num_warps: int, g_p2: int, d: int) -> int:
    """Partial rows `_merge_last` merges per step: about 128 fp32 registers per thread."""
    return min(ns_pad, 1 << max(0, ((4096 * num_warps) // (g_p2 * d)).bit_length() - 1))


def decode_attention_triton(q: torch.Tensor, k_data: torch.Tensor, k_scale: torch.Tensor, v_data: torch.Tensor,
                            v_scale: torch.Tensor, seq_len: int, *, bits: int, scale: float | None = None,
                            kv_start: torch.Tensor | None = None, kv_end: torch.Tensor | None = None,
                            splits: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                            num_stages: int | None = None, programs_per_sm: int | None = None, swap: bool | None = None,
                            int_mma: bool | None = None, g_pad: int | None = None, fused: bool | None = None,
                            late_q: bool | None = None, plans: dict | None = None,
                            causal: bool = False) -> torch.Tensor:
    """Attention of q (B, H, Sq, D) over the first `seq_len` tokens of quantized planes
    (B, Hkv, cap, ...); returns (B, H, Sq, D) in q's dtype. One query token, or a few (Sq * H / Hkv
    <= `DECODE_ROWS`, e.g. speculative decoding's drafts: either kernel's rows are then the (query
    head, token) pairs; `causal` aligned to the end of the `seq_len` keys).

    Two kernels: with fp16 scales and a token-contiguous value plane (tile-blocked (B, Hkv, cap /
    128, W, 128) as `LowbitKVCache` stores it, `reference.block_tokens`; or token-major,
    `token_major`) the fast path `_decode_split_vt`; otherwise (E8M0 scales, d-major values) the
    generic `_decode_split`. Stage 2 is `_decode_reduce`, or, on the fast path with `fused`, the
    last program of each (batch, kv head) inside stage 1 (no second launch; see `_merge_last`).
    `late_q` (fast path): q read in the loop's first trip, after the first tiles' loads are issued
    (default: for int4 with one scale per block of values, where it measured faster; RESULTS.md).
    `plans` (a dict the caller keeps while the planes stay the same tensors, e.g. per cache layer):
    the fast path's launches are remembered there (`kernels.launch.launch_remembered`), which cuts
    Triton's per-call argument binding (~50 us of host time per call on an H200 host) in eager decoding.
    """
    B, H, SQ, D = q.shape
    Hkv = k_data.shape[1]
    if H % Hkv:
        raise ValueError(f"decode_attention: {H} query heads are not a multiple of {Hkv} kv heads")
    if SQ * (H // Hkv) > SPLIT_ROWS or SQ > seq_len:
        raise ValueError(f"decode_attention: {SQ} query tokens of {H // Hkv} heads a kv head exceed the "
                         f"{SPLIT_ROWS} rows of the split kernels (or the {seq_len} keys); use flash_attention")
    if D & (D - 1) or D < 32:
        raise ValueError(f"decode_attention: head dim {D} must be a power of two >= 32 for the fused decode")
    ng = k_scale.shape[-1]
    group = D // ng
    if group & (group - 1) or (bits == 4 and group < 32):
        raise ValueError(f"decode_attention: scale group {group} must be a power of two (>= 32 for int4)")
    G = H // Hkv
    R = G * SQ  # rows per kv head: (query head, token) pairs
    nrb = cdiv(R, DECODE_ROWS)  # row blocks: a program takes at most DECODE_ROWS rows
    vblk = v_data.shape[-1] if v_data.dim() == 5 else 0  # tile-blocked values (see `_decode_split_vt`)
    fast = ((vblk or is_token_major(v_data)) and k_scale.dtype == torch.float16 and v_scale.dtype == torch.float16
            and k_data.stride(-1) == 1 and k_scale.stride() == v_scale.stride() and (bits == 4 or group == D))
    if fast:
        swap = True if swap is None else swap
        bn, num_warps, num_stages, programs_per_sm = _fast_config(
            bits, group == D, B * Hkv, seq_len, _num_sms(q.device), block_n, num_warps, num_stages, programs_per_sm, R)
        if int_mma is None:  # keys on the int8 tensor cores wherever one scale per token allows it (int4 too:
            int_mma = group == D  # 42.4 -> 41.1 us at (32, 4096), 25.8 -> 24.8 at (8, 8192); RESULTS.md, session 21)
        if late_q is None:  # same-run A/B on an H200 (RESULTS.md, session 21): int4 per 32 values 74.5 -> 69.6 us
            late_q = bits == 4 and group < D  # at (32, 4096); int8 and int4 per token 1-9 % slower with it
        if int_mma and group != D:
            raise ValueError("decode_attention: int_mma on the token-major path needs one scale per token")
        g_pad = g_pad or max(8 if swap else 16, next_pow2(min(R, DECODE_ROWS)))
    else:
        swap = bool(swap)
        bn = block_n or 64
        num_warps = num_warps or 4
        num_stages = num_stages or (3 if bits == 8 else 2)
        programs_per_sm = programs_per_sm or 8
        g_pad = max(16, next_pow2(min(R, DECODE_ROWS)))
        if int_mma is None:  # int8 tensor cores for QK^T where the scales allow it (one scale per token)
            int_mma = group == D and not swap
        if int_mma and (group != D or swap):
            raise ValueError("decode_attention: int_mma needs one scale per token per head and swap=False")
    dev = q.device
    if nrb > 1 and g_pad != next_pow2(DECODE_ROWS):
        raise ValueError(f"decode_attention: g_pad {g_pad} for {R} rows in blocks of {DECODE_ROWS}")
    splits, chunk = _split_plan(seq_len, bn, B * Hkv * nrb, programs_per_sm, splits, dev)
    op, lse, has_ranges, kv_start, kv_end = _partials(B * Hkv * splits * R, D, kv_start, kv_end, B, seq_len, dev)
    qk_scale = (scale if scale is not None else D ** -0.5) * math.log2(math.e)
    o = torch.empty(B, H, SQ, D, dtype=q.dtype, device=dev)  # = (B, H * SQ, D): R rows per kv head, stride D
    ns_pad = max(2, next_pow2(splits))
    if fast:
        if fused is None:  # one launch where the partial rows are few (as `run_float_decode`): with
            # more (many splits, or drafts' rows) the separate merge kernel is faster (RESULTS.md;
            # 8 tokens of 4 heads over 4 chunks at (8, 8192): int4 160.1 -> 92.4 us, session 34)
            fused = splits * R <= 64
        direct = splits == 1 and (fused or nrb > 1)  # one chunk: each program stores its rows
        fused = fused and nrb == 1  # the merge in the last program takes one block of rows
        g_p2 = next_pow2(R)
        ns_step = _merge_step(ns_pad, num_warps, g_p2, D)
        grid = (splits * nrb, B * Hkv)
        qst, kst, vst, sst, ost = q.stride(), k_data.stride(), v_data.stride(), k_scale.stride(), o.stride()
        args = (q, k_data, k_scale, v_data, v_scale, op, lse, kv_start, kv_end, o,
                _counters(dev, B * Hkv) if fused else lse,
                qst[0], qst[1], kst[0], kst[1], kst[2], vst[0], vst[1], vst[3] if not vblk else vblk,
                sst[0], sst[1], sst[2], ost[0], D, H, Hkv, seq_len, k_data.shape[2], chunk, splits, qk_scale, qst[2])
        consts = dict(HEAD_D=D, G=G, G_PAD=g_pad, BLOCK_N=bn, BITS=bits, GROUP=group, HAS_RANGES=has_ranges,
                      IMMA=int_mma, SWAP=swap, FUSED=fused, G_P2=g_p2, NS_PAD=ns_pad, NS_STEP=ns_step,
                      INTERP=_INTERPRET, DIRECT=direct, VBLK=vblk, LATE_Q=late_q, SQ=SQ,
                      CAUSAL=causal and SQ > 1, NRB=nrb, num_warps=num_warps, num_stages=num_stages)
        key = None
        if plans is not None and not torch.compiler.is_compiling():
            # what the slots (q, the fresh buffers, the ranges, seq_len, chunk, the scale) specialize
            # on; the planes are pinned by identity, their strides and capacity with them; the fresh
            # buffers come from the caching allocator (512-byte aligned), their strides follow the
            # shapes in the key
            key = (grid, tuple(consts.values()), id(k_data), id(k_scale), id(v_data), id(v_scale), q.dtype, q.shape,
                   qst, q.data_ptr() % 16 == 0, int_class(seq_len), int_class(chunk),
                   has_ranges and (kv_start.data_ptr() % 16 == 0, kv_end.data_ptr() % 16 == 0))
        launch_remembered(plans, key, _decode_split_vt, grid, args, consts,
                          slots=(0, 5, 6, 7, 8, 9, 10, 26, 28, 30))
        if fused or direct:
            return o
    else:
        if _INTERPRET:
            dt = tl.float32
        else:
            dt = tl.bfloat16 if q.dtype == torch.bfloat16 else tl.float16
        if v_data.dim() == 5:  # tile-blocked values off the fast path (e.g. E8M0 scales): the logical plane
            from .reference import unblock_tokens

            v_data = unblock_tokens(v_data)
        if v_data.stride() != k_data.stride():  # e.g. token-major values with E8M0 scales: a d-major copy
            v_data = torch.empty_like(k_data).copy_(v_data)
        if v_scale.stride() != k_scale.stride():
            v_scale = torch.empty_like(k_scale).copy_(v_scale)
        _decode_split[(splits * nrb, B * Hkv)](
            q, k_data, k_scale, v_data, v_scale, op, lse, kv_start, kv_end, o, lse,
            q.stride(0), q.stride(1), q.stride(2), k_data.stride(0), k_data.stride(1), k_data.stride(2),
            k_scale.stride(0), k_scale.stride(1), k_scale.stride(2), o.stride(0), D,
            H, Hkv, seq_len, chunk, splits, qk_scale,
            HEAD_D=D, G=G, G_PAD=g_pad, BLOCK_N=bn, BITS=bits, GROUP=group, E8M0=k_scale.dtype == torch.uint8,
            HAS_RANGES=has_ranges, DT=dt, SWAP=swap, IMMA=int_mma, INTERP=_INTERPRET, SQ=SQ,
            CAUSAL=causal and SQ > 1, NRB=nrb, num_warps=num_warps, num_stages=num_stages)
    _decode_reduce[(B * H * SQ,)](op, lse, o, o.stride(0), D, Hkv, splits,
                                  HEAD_D=D, G=R, NS_PAD=ns_pad, num_warps=4)
    return o


# remembered launches of `decode_attention_float` (both stages), keyed like the prefill's `_PLANS`
_FLOAT_PLANS: dict = {}

# (block_n, num_warps, num_stages, programs_per_sm) of the float-cache decode: of 16 configs swept on
# an H200 (`benchmarks/attention.py --only decode --float-tune`, GQA 32/8, D = 128, (B, S) from (1, 512)
# to (32, 4096) and (1, 32768)), the one within 5 % of each shape's best except (1, 512) (12 %); with
# more than 16 rows (query heads x tokens) a program, 4 warps
FLOAT_DECODE_CONFIG = (64, 2, 3, 8)


def float_decode_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_rows: int = DECODE_ROWS) -> bool:
    """Whether `decode_attention_float` takes these inputs: a few query tokens (the group's query
    heads times the tokens at most `max_rows`), no more than the keys, a power-of-two head
    dim of 32-256 (the kernel's tiles span the head dim), 16-bit floats (fp32 too under the
    interpreter, whose tests run in fp32), unit stride along the head dim."""
    D = q.shape[-1]
    dtypes = (torch.float16, torch.bfloat16, torch.float32) if _INTERPRET else (torch.float16, torch.bfloat16)
    return (q.dim() == 4 and k.dim() == 4 and q.shape[1] % k.shape[1] == 0
            and 1 <= q.shape[2] <= k.shape[2] and q.shape[2] * (q.shape[1] // k.shape[1]) <= max_rows
            and 32 <= D <= 256 and D & (D - 1) == 0 and q.dtype in dtypes and k.dtype == v.dtype == q.dtype
            and all(t.stride(-1) == 1 for t in (q, k, v)))


def decode_attention_float(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                           scale: float | None = None, kv_start: torch.Tensor | None = None,
                           kv_end: torch.Tensor | None = None, config: tuple[int, int, int, int] | None = None,
                           splits: int | None = None, swap: bool = False, fused: bool | None = None) -> torch.Tensor:
    """Flash-decoding over a float (bf16 / fp16) KV cache: q (B, H, Sq, D) against k / v (B, Hkv, Sk, D)
    for one or a few query tokens (Sq * H / Hkv <= `DECODE_ROWS`: decoding, speculative decoding's
    draft tokens; up to `SPLIT_ROWS` in blocks of `DECODE_ROWS`: a prompt continuing a cache);
    returns (B, H, Sq, D) in q's dtype; `causal` aligned to the end of the keys, as `flash_attention`'s.
    (The prefill kernel, which `flash_attention` ran for such calls before, has one program per query
    head over the whole cache: B * H programs, 32 of an H100's 132 SMs for one Llama-3-8B sequence,
    each kv head read once per query head of its group.) Here the cache is
    cut into chunks along the sequence, one program per (chunk, batch, kv head) reads its chunk once
    for the group's query heads (`_decode_split` with BITS 16; its rows are the (query head, token)
    pairs), and the chunks are merged (`_merge_last` or `_decode_reduce`).

    `kv_start` / `kv_end` (B,): each sequence's valid key range (padding; a static cache's filled
    length). `config` (block_n, num_warps, num_stages, programs_per_sm) overrides
    `FLOAT_DECODE_CONFIG`; `splits` the chunk count; `fused` (default: at most 64 partial rows per
    (batch, kv head), e.g. 16 chunks of 4 query heads) merges in the last program of each (batch, kv
    head) instead of a second kernel. Launches are remembered (`kernels.launch`), as the
    prefill's are, so an eager decode step pays Triton's argument binding once per shape.

    Example (GPU):
        >>> o = decode_attention_float(q, k_cache, v_cache)                  # doctest: +SKIP
    """
    if not float_decode_ok(q, k, v, SPLIT_ROWS):
        raise ValueError("decode_attention_float: needs q (B, H, Sq, D) with Sq * H / Hkv <= "
                         f"{SPLIT_ROWS}, Sq <= Sk, D a power of two in 32..256, bf16 / fp16 q, k, v of one "
                         f"dtype and unit stride along D; got q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype}")
    return run_float_decode(q, k, v, causal=causal, scale=scale, kv_start=kv_start, kv_end=kv_end, config=config,
                            splits=splits, swap=swap, fused=fused)


def run_float_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                     scale: float | None = None, kv_start: torch.Tensor | None = None,
                     kv_end: torch.Tensor | None = None, config: tuple[int, int, int, int] | None = None,
                     splits: int | None = None, swap: bool = False, fused: bool | None = None) -> torch.Tensor:
    """`decode_attention_float` for inputs `float_decode_ok` already accepted (`flash_attention`
    checks them to choose the kernel; this skips checking twice on every decode step)."""
    B, H, SQ, D = q.shape
    Hkv, SK = k.shape[1], k.shape[2]
    G = H // Hkv
    R = G * SQ  # rows per kv head; the partials, the merge and the output count these
    nrb = cdiv(R, DECODE_ROWS)  # row blocks: a program takes at most DECODE_ROWS rows
    if v.stride() != k.stride():  # the kernel walks both planes with one set of strides
        v = torch.empty_like(k).copy_(v)
    bn, num_warps, num_stages, pps = config or FLOAT_DECODE_CONFIG
    if config is None and R > 16:  # 8 / 16 draft tokens of 4 heads: 4 warps were 1.0-1.1x / 1.3-1.4x
        num_warps = 4  # faster than 2 (RESULTS.md, session 32)
    dev = q.device
    splits, chunk = _split_plan(SK, bn, B * Hkv * nrb, pps, splits, dev)
    op, lse, has_ranges, kv_start, kv_end = _partials(B * Hkv * splits * R, D, kv_start, kv_end, B, SK, dev)
    o = torch.empty(B, H, SQ, D, dtype=q.dtype, device=dev)  # = (B, H * SQ, D): R rows per kv head, stride D
    dt = tl.float32 if _INTERPRET else (tl.bfloat16 if q.dtype == torch.bfloat16 else tl.float16)
    g_pad = max(8 if swap else 16, next_pow2(min(R, DECODE_ROWS)))
    ns_pad = max(2, next_pow2(splits))
    # the merge inside stage 1 where the partial rows are few (16 chunks of 4 rows, as on the quantized
    # fast path); with 8 tokens of 4 heads in 16 chunks the one merging program took 39.5 us where the
    # prefill kernel took 30 (RESULTS.md, session 32)
    if fused is None:
        fused = splits * R <= 64
    fused = fused and nrb == 1  # the merge in the last program takes one block of rows
    g_p2 = next_pow2(R)
    args = (q, k, k, v, v, op, lse, kv_start, kv_end, o, _counters(dev, B * Hkv) if fused else lse,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), 0, 0, 0, o.stride(0), D,
            H, Hkv, SK, chunk, splits, (scale if scale is not None else D ** -0.5) * math.log2(math.e))
    consts = dict(HEAD_D=D, G=G, G_PAD=g_pad, BLOCK_N=bn, BITS=16, GROUP=D, E8M0=False, HAS_RANGES=has_ranges,
                  DT=dt, SWAP=swap, IMMA=False, INTERP=_INTERPRET, FUSED=fused, G_P2=g_p2, NS_PAD=ns_pad,
                  NS_STEP=_merge_step(ns_pad, num_warps, g_p2, D), SQ=SQ, CAUSAL=causal and SQ > 1, NRB=nrb,
                  num_warps=num_warps, num_stages=num_stages)
    remember = not torch.compiler.is_compiling()
    if remember and len(_FLOAT_PLANS) > 256:  # many cache lengths seen: start over rather than grow without bound
        _FLOAT_PLANS.clear()
    grid = (splits * nrb, B * Hkv)
    key = (dev, grid, tuple(consts.values()), spec_key(args)) if remember else None
    launch_remembered(_FLOAT_PLANS, key, _decode_split, grid, args, consts, slots=tuple(range(len(args))))
    if fused:
        return o
    rargs = (op, lse, o, o.stride(0), D, Hkv, splits)
    rconsts = dict(HEAD_D=D, G=R, NS_PAD=ns_pad, num_warps=4)
    rkey = (dev, (B * H * SQ,), tuple(rconsts.values()), spec_key(rargs)) if remember else None
    launch_remembered(_FLOAT_PLANS, rkey, _decode_reduce, (B * H * SQ,), rargs, rconsts,
                      slots=tuple(range(len(rargs))))
    return o
