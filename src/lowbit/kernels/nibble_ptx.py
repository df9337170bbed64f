"""PTX text of the code decode of the packed-code tensor-core path (`triton_dot4._nibbles`):
4-bit integer nibbles (`asm_nibbles`), e2m1 nibbles (`asm_fp4`), int8 bytes (`asm_bytes`).

Plain Python (no Triton import), so `tests/test_dot4_ptx.py` can run the text through its emulator
without importing Triton before the interpreter tests set TRITON_INTERPRET.
"""

from __future__ import annotations

import functools
import struct


def _half_bits(v: float, f16: bool) -> int:
    """The fp16 / bf16 bits of v (exact for the small constants used here)."""
    if f16:
        return struct.unpack("<H", struct.pack("<e", v))[0]
    return struct.unpack("<I", struct.pack("<f", v))[0] >> 16


@functools.cache  # built once per variant: it is passed to every launch
def asm_nibbles(f16: bool, signed: bool, exact_fma: bool, bits: int = 4) -> str:
    """PTX for `_nibbles`: $0..$3 = nibble i (bits 4i..4i+3 of each 16-bit half of $4) as 16-bit
    weights, two per register; $5 = the two elements' scales, $6 their zero points (unused when
    `signed`). `exact_fma` (bf16 with power-of-two scales): (MAGIC + c) s - (MAGIC + off) s in one
    fma, exact because both products are. `bits` 2: eight 2-bit codes per 16-bit half, $0..$7 the
    positions, $8 the word, $9 / $10 the scales / zero points.

    Example:
        >>> asm_nibbles(False, True, True).count("fma.rn.bf16x2")  # one for -(MAGIC + 8) s, one per nibble
        5
    """
    npos = 16 // bits
    word, scale, zero = f"${npos}", f"${npos + 1}", f"${npos + 2}"
    magic = 1024.0 if f16 else 128.0  # the unit in the last place is 1
    ty = "f16x2" if f16 else "bf16x2"
    neg = _half_bits(-(magic + ((1 << (bits - 1)) if signed else 0)), f16)
    one = 0x3C00 if f16 else 0x3F80
    mask = ((1 << bits) - 1) * 0x10001
    lines = ["{", ".reg .b32 t, v, mg, ng, one, nz, ns;", f"mov.b32 mg, {hex(_half_bits(magic, f16) * 0x10001)};",
             f"mov.b32 ng, {hex(neg * 0x10001)};", f"mov.b32 one, {hex(one * 0x10001)};", "mov.b32 nz, 0x80008000;"]
    if exact_fma:
        lines.append(f"fma.rn.{ty} ns, {scale}, ng, nz;")  # -(MAGIC + off) s, exact
    for i in range(npos):
        src = word
        if i:
            lines.append(f"shr.u32 t, {word}, {bits * i};")
            src = "t"
        lines.append(f"lop3.b32 v, {src}, {hex(mask)}, mg, 0xEA;")  # (src & mask) | magic
        if exact_fma:
            lines.append(f"fma.rn.{ty} ${i}, v, {scale}, ns;")
        else:
            lines.append(f"fma.rn.{ty} v, v, one, ng;")  # c - off, exact
            lines.append(f"fma.rn.{ty} ${i}, v, {scale}, {'nz' if signed else zero};")
    lines.append("}")
    return "\n".join(lines)


# 16-bit float constants (bits), per activation type: (f16, bf16)
_ONE = {True: 0x3C00, False: 0x3F80}


def _pair(h: int) -> str:
    """A 16-bit constant in both halves of a 32-bit register, as PTX hex."""
    return hex(h * 0x10001)


@functools.cache
def asm_bytes(f16: bool, scaled: bool) -> str:
    """PTX for the int8 variant of `_nibbles` (two code positions per 16-bit element): $0 / $1 =
    byte 0 / byte 1 of each 16-bit half of $2 (two's complement codes) as 16-bit weights, two per
    register, exact (times the scales $3 when `scaled`, one rounding; per-row scales are applied
    to the accumulator instead). $4 (zero points) is not used.

    fp16: xor 0x80 makes the byte u = c + 128, and byte | 0x6400 read as fp16 is 1024 + u (one PRMT
    per two codes); c = that - 1152, exact. bf16 has 8 significant bits, too few for 1024 + u, so
    the byte is split in nibbles: lo = 128 + (u & 15) and hi = 128 + (u >> 4), each with 128.0's
    unit in the last place of 1 (one LOP3 each; the LOP3 of the high nibble also flips its top bit,
    which is the xor 0x80), then c = (16 hi - 2304) + lo: both steps exact.

    Example:
        >>> asm_bytes(False, False).count("lop3.b32")  # two nibbles of two byte positions
        4
    """
    ty = "f16x2" if f16 else "bf16x2"
    lines = ["{", ".reg .b32 t, l, h, one, c16, cn, mg, mf;", f"mov.b32 one, {_pair(_ONE[f16])};"]
    if f16:
        lines += ["mov.b32 cn, 0xE480E480;",  # -1152.0
                  "mov.b32 mg, 0x64646464;",
                  "xor.b32 t, $2, 0x80808080;",
                  "prmt.b32 l, t, mg, 0x4240;",  # bytes 0 and 2 under 0x64
                  "prmt.b32 h, t, mg, 0x4341;"]  # bytes 1 and 3
        for i, src in enumerate(("l", "h")):
            lines.append(f"fma.rn.{ty} ${i}, {src}, one, cn;")
    else:
        lines += ["mov.b32 c16, 0x41804180;", "mov.b32 cn, 0xC510C510;",  # 16.0, -2304.0
                  "mov.b32 mg, 0x43004300;", "mov.b32 mf, 0x43084308;"]  # 128.0; 128.0 and the flip of bit 3
        for i in range(2):
            lo_src = "$2"
            if i:
                lines.append("shr.u32 l, $2, 8;")
                lo_src = "l"
            lines.append(f"lop3.b32 l, {lo_src}, 0x000F000F, mg, 0xEA;")  # (x & m) | 128.0
            lines.append(f"shr.u32 h, $2, {4 + 8 * i};")
            # ((h ^ 8) & 15) | 128.0: per bit, B ? (C ? ~a : a) : C with B = the mask, C = magic | flip
            lines.append("lop3.b32 h, h, 0x000F000F, mf, 0x6A;")
            lines.append(f"fma.rn.{ty} h, h, c16, cn;")  # 16 hi - 2304 in [-256, -16], exact
            lines.append(f"fma.rn.{ty} ${i}, l, one, h;")  # + lo: the code, exact
    if scaled:
        for i in range(2):
            lines.append(f"mul.rn.{ty} ${i}, ${i}, $3;")
    lines.append("}")
    return "\n".join(lines)


@functools.cache
def asm_fp4(f16: bool) -> str:
    """PTX for the fp4 (e2m1) variant of `_nibbles`: $0..$3 = nibble i of each 16-bit half of $4
    times the scales $5 ($6 unused). Nibble bits s e1 e0 m: the three bits e1 e0 m go to the
    16-bit float's lowest exponent bits and top mantissa bit (bits 6..8 in bf16, 9..11 in fp16),
    the sign to bit 15; read as a float that is the e2m1 value times 2^-126 (bf16) / 2^-14 (fp16),
    subnormal for e = 0 as in e2m1, so one exact multiply by 2^126 / 2^14 gives the value and a
    second the scaled weight (one rounding). The scale is not folded into the first multiply:
    2^126 times a scale above 2 would overflow.

    Example:
        >>> asm_fp4(False).count("mul.rn.bf16x2")  # two per nibble position
        8
    """
    ty = "f16x2" if f16 else "bf16x2"
    pos = 9 if f16 else 6  # where the three low bits go
    mask = (7 << pos) * 0x10001
    lines = ["{", ".reg .b32 t, u, k, sg;", f"mov.b32 k, {_pair(0x7400 if f16 else 0x7E80)};",  # 2^14 / 2^126
             "mov.b32 sg, 0x80008000;"]

    def shift(dst: str, by: int) -> str:
        if by > 0:
            return f"shl.b32 {dst}, $4, {by};"
        return f"shr.u32 {dst}, $4, {-by};"

    for i in range(4):
        lines.append(shift("t", pos - 4 * i))
        lines.append(f"and.b32 t, t, {hex(mask)};")
        sign = "$4"
        if 12 - 4 * i:
            lines.append(shift("u", 12 - 4 * i))
            sign = "u"
        lines.append(f"lop3.b32 t, t, {sign}, sg, 0xF8;")  # t | (sign & 0x80008000)
        lines.append(f"mul.rn.{ty} t, t, k;")  # the e2m1 value, exact
        lines.append(f"mul.rn.{ty} ${i}, t, $5;")
    lines.append("}")
    return "\n".join(lines)


@functools.cache
def asm_fp8(f16: bool, e5m2: bool) -> str:
    """PTX for the fp8 variant of `_nibbles` (two code positions per 16-bit element, as `asm_bytes`):
    $0 / $1 = byte 0 / byte 1 of each 16-bit half of $2 (e4m3 or e5m2) times the scales $3 ($4
    unused). As `asm_fp4`: the seven exponent and mantissa bits go to the 16-bit float's lowest
    exponent bits and top mantissa bits, the sign bit to bit 15, then an exact multiply by the bias
    difference (e4m3: 2^120 in bf16, 2^8 in fp16; e5m2: 2^112, none in fp16, where e5m2 is the top
    byte of an fp16) and one by the scale. Subnormal codes map to subnormal 16-bit floats.

    Example:
        >>> asm_fp8(True, True).count("mul.rn.f16x2")  # only the scale: e5m2 is fp16's top byte
        2
    """
    ty = "f16x2" if f16 else "bf16x2"
    pos = {(False, False): 4, (False, True): 5, (True, False): 7, (True, True): 8}[(f16, e5m2)]
    factor = {(False, False): 0x7B80, (False, True): 0x7780, (True, False): 0x5C00, (True, True): None}[(f16, e5m2)]
    mask = (0x7F << pos) * 0x10001
    lines = ["{", ".reg .b32 t, u, k, sg;", "mov.b32 sg, 0x80008000;"]
    if factor is not None:
        lines.append(f"mov.b32 k, {_pair(factor)};")
    for j in range(2):
        by = pos - 8 * j
        lines.append(f"shl.b32 t, $2, {by};" if by > 0 else f"shr.u32 t, $2, {-by};")
        lines.append(f"and.b32 t, t, {hex(mask)};")
        sign = "$2"
        if j == 0:
            lines.append("shl.b32 u, $2, 8;")
            sign = "u"
        lines.append(f"lop3.b32 t, t, {sign}, sg, 0xF8;")  # t | (sign & 0x80008000)
        if factor is not None:
            lines.append(f"mul.rn.{ty} t, t, k;")  # the fp8 value, exact
        lines.append(f"mul.rn.{ty} ${j}, t, $3;")
    lines.append("}")
    return "\n".join(lines)


@functools.cache
def asm_words(f16: bool, scaled: bool = False) -> str:
    """PTX for the Hopper int4 kernel's decode (`gluon_w4._decode`): $0..$7 = the eight codes c of the
    32-bit word $8 as 16-bit values c - 8 (exact), ordered nibble position i = 0..3 (bits 4i..4i+3 of
    the low half, then of the high half): MAGIC | c (MAGIC = 1024 in fp16, 128 in bf16, where the
    unit in the last place is 1), then one FMA by 1 minus (MAGIC + 8). `scaled`: each pair is then
    multiplied (rounded once) by the 16-bit pair $9 (positions 0, 2) or $10 (positions 1, 3): the
    scales of the fragment's two rows.

    Example:
        >>> asm_words(False).count("lop3.b32")
        4
    """
    magic, one, ty = (1024.0, 0x3C00, "f16x2") if f16 else (128.0, 0x3F80, "bf16x2")
    lines = ["{", ".reg .b32 t, v, mg, ng, one;", f"mov.b32 mg, {hex(_half_bits(magic, f16) * 0x10001)};",
             f"mov.b32 ng, {hex(_half_bits(-(magic + 8), f16) * 0x10001)};", f"mov.b32 one, {hex(one * 0x10001)};"]
    for i in range(4):
        src = "$8"
        if i:
            lines.append(f"shr.u32 t, $8, {4 * i};")
            src = "t"
        lines.append(f"lop3.b32 v, {src}, 0x000F000F, mg, 0xEA;")  # (src & mask) | magic
        lines.append(f"fma.rn.{ty} v, v, one, ng;")  # c - 8, exact
        if scaled:  # nibble positions 0, 2 are the fragment's row g, 1, 3 its row g + 8
            lines.append(f"mul.rn.{ty} v, v, {'$9' if i % 2 == 0 else '$10'};")
        lines.append(f"mov.b32 {{${2 * i}, ${2 * i + 1}}}, v;")
    lines.append("}")
    return "\n".join(lines)
