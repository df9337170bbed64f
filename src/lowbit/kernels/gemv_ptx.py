"""PTX text of the fast GEMV's word dot products (`triton_gemv._words_dot`): one 32-bit word of
codes against its activations, summed to fp32, for 4 / 2-bit integer codes, int8, fp4 e2m1 and
4-bit palettes.

Plain Python (no Triton import), so `tests/test_gemv_ptx.py` can run the text through its emulator
without importing Triton before the interpreter tests set TRITON_INTERPRET. The formats' decode
tricks are described in `triton_gemv.py` and at each builder.

Example:
    >>> word_asm(4, False, False, True).count("lop3.b32")  # one LOP3 per pair of 4-bit codes
    4
"""

from __future__ import annotations

import functools


def _pair_sum_lines(f16: bool, acc: str) -> list[str]:
    """PTX lines ending a word's block: $0 = the fp32 sum of the two 16-bit halves of `acc`, and the
    closing brace (bf16 -> fp32 is the bf16 as the top half of the fp32 bits)."""
    if f16:
        return [".reg .f16 l16, h16;", ".reg .f32 fl, fh;", f"mov.b32 {{l16, h16}}, {acc};", "cvt.f32.f16 fl, l16;",
                "cvt.f32.f16 fh, h16;", "add.f32 fl, fl, fh;", "mov.b32 $0, fl;", "}"]
    return [".reg .b32 fl, fh;", f"shl.b32 fl, {acc}, 16;", f"and.b32 fh, {acc}, 0xFFFF0000;", "add.f32 fl, fl, fh;",
            "mov.b32 $0, fl;", "}"]


def _asm_word(bits: int, f16: bool, off: int) -> str:
    """PTX: $0 (fp32 bits) = sum_i v_i * x_i over the codes of word $1, v = (c - off) / 8;
    $2.. are the activation pairs (x_i, x_{i + P}) as two 16-bit values in an int32."""
    pairs = 4 if bits == 4 else 8
    mask = "0x000F000F" if bits == 4 else "0x00030003"
    ty = "f16x2" if f16 else "bf16x2"
    magic16 = 0x5800 if f16 else 0x4180
    neg16 = (magic16 + off) | 0x8000  # -(MAGIC + off / 8): same exponent, so the bits add
    one16 = 0x3C00 if f16 else 0x3F80
    lines = ["{", ".reg .b32 t, v, a, mg, ng, one;",
             f"mov.b32 mg, {hex(magic16 * 0x10001)};", f"mov.b32 ng, {hex(neg16 * 0x10001)};",
             f"mov.b32 one, {hex(one16 * 0x10001)};"]
    for i in range(pairs):
        src = "$1"
        if i:
            lines.append(f"shr.b32 t, $1, {i * bits};")
            src = "t"
        lines.append(f"lop3.b32 v, {src}, {mask}, mg, 0xEA;")  # (src & mask) | magic
        lines.append(f"fma.rn.{ty} v, v, one, ng;")            # exact: (c - off) / 8
        lines.append(f"mul.rn.{ty} a, v, $2;" if i == 0 else f"fma.rn.{ty} a, v, ${2 + i}, a;")
    return "\n".join(lines + _pair_sum_lines(f16, "a"))


def _fp4_tables(f16: bool) -> tuple[str, str, str, str]:
    """The four 32-bit PRMT tables of `_asm_word_fp4` (hex): low bytes of the 16-bit magnitudes
    0, .5, 1, 1.5 and 2, 3, 4, 6, then their high bytes."""
    return (("0x0", "0x0", "0x3e3c3800", "0x46444240") if f16 else
            ("0xc0800000", "0xc0804000", "0x3f3f3f00", "0x40404040"))


def _asm_word_fp4(f16: bool) -> str:
    """PTX: $0 (fp32 bits) = sum_i v_i * x_i over the 8 fp4 (e2m1) codes of word $1; $2..$5 are the
    activations as they lie in memory, pairs (x_2j, x_2j+1) = the codes of byte j.

    The e2m1 magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 are exact 16-bit floats; a PRMT with the codes'
    3-bit magnitude fields as byte selectors looks up four at once in an 8-byte table, one PRMT for
    the low bytes of the 16-bit values and one for the high bytes (fp16: the low bytes are all 0).
    A third PRMT interleaves them into the pair of byte j, and a fourth, in its sign-replicate mode
    (selector bit 3), turns the two sign bits of byte j (bits 3 and 7; the first after a 4-bit
    shift of the word) into 0x00 / 0xFF bytes at the pair's sign positions: one LOP3 applies them.
    24 instructions for 8 weights, none of them an integer-to-float conversion."""
    ty = "f16x2" if f16 else "bf16x2"
    # 16-bit patterns of the magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6 (index = e2m1 bits without sign)
    vals = [0x0000, 0x3800, 0x3C00, 0x3E00, 0x4000, 0x4200, 0x4400, 0x4600] if f16 else \
        [0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0]
    lo = [v & 0xFF for v in vals]
    hi = [v >> 8 for v in vals]

    def word(bs):  # 4 bytes, byte 0 lowest
        return hex(bs[0] | bs[1] << 8 | bs[2] << 16 | bs[3] << 24)

    # the tables ($6..$9: low bytes 0-3, 4-7, high bytes 0-3, 4-7) come in as operands so that
    # they stay in registers across the loop instead of being rebuilt for every word
    assert [int(t, 16) for t in _fp4_tables(f16)] == [int(word(lo[:4]), 16), int(word(lo[4:]), 16),
                                                       int(word(hi[:4]), 16), int(word(hi[4:]), 16)]
    lines = ["{", ".reg .b32 s0, s1, l0, h0, l1, h1, w4, v, m, a;",
             "and.b32 s0, $1, 0x7777;", "shr.b32 s1, $1, 16;", "and.b32 s1, s1, 0x7777;",
             "prmt.b32 l0, $6, $7, s0;", "prmt.b32 h0, $8, $9, s0;",   # codes 0-3: low / high bytes
             "prmt.b32 l1, $6, $7, s1;", "prmt.b32 h1, $8, $9, s1;",   # codes 4-7
             "shl.b32 w4, $1, 4;"]                                     # low-nibble signs to bit 7
    for j in range(4):
        src_l, src_h = ("l0", "h0") if j < 2 else ("l1", "h1")
        pair_sel = "0x5140" if j % 2 == 0 else "0x7362"
        sign_sel = hex(j | (8 | j) << 4 | j << 8 | (8 | (4 + j)) << 12)
        lines += [f"prmt.b32 v, {src_l}, {src_h}, {pair_sel};",   # |code 2j|, |code 2j+1|
                  f"prmt.b32 m, w4, $1, {sign_sel};",             # their signs as 0x00 / 0xFF bytes
                  "lop3.b32 v, v, m, 0x80008000, 0x78;",           # v ^ (m & sign bits)
                  f"mul.rn.{ty} a, v, $2;" if j == 0 else f"fma.rn.{ty} a, v, ${2 + j}, a;"]
    return "\n".join(lines + _pair_sum_lines(f16, "a"))



def _asm_word_lut4(f16: bool) -> str:
    """PTX: $0 (fp32 bits) = sum_i T[c_i] * x_i over the 8 4-bit palette codes of word $1; $2..$5
    are the activations as they lie in memory (pairs (x_2j, x_2j+1) = the codes of byte j, as for
    fp4); $6..$13 the 16-entry table T of 16-bit floats as eight byte tables (`lut_tables`): the low
    bytes of entries 0-3, 4-7, 8-11, 12-15, then their high bytes.

    A PRMT looks up four bytes at once in an 8-byte table, the codes' low 3 bits as selectors (bit
    3 of a selector nibble would mean sign-replicate, so it is cleared), once for entries 0-7 and
    once for 8-15, for the low and for the high bytes: four PRMTs per four codes. A fifth PRMT in
    sign-replicate mode turns each code's bit 3 (the top bit of a byte of the word, or of the word
    shifted left by 4) into a 0x00 / 0xFF byte, and one LOP3 per byte plane picks the entry from
    0-7 or 8-15 by it; two PRMTs interleave low and high bytes into the pairs of bytes 2j and
    2j+1. 28 instructions for 8 weights (int4: 18, fp4: 24), no conversion."""
    ty = "f16x2" if f16 else "bf16x2"
    lines = ["{", ".reg .b32 s0, s1, w4, a, b, c, d, m, l, h, v, acc;",
             "and.b32 s0, $1, 0x7777;", "shr.b32 s1, $1, 16;", "and.b32 s1, s1, 0x7777;",
             "shl.b32 w4, $1, 4;"]                                      # low-nibble bit 3 to bit 7
    # sign-replicate selectors: byte i of the mask from code i's bit 3 (codes 0-3: w4 byte 0, w byte
    # 0, w4 byte 1, w byte 1; codes 4-7: the same from bytes 2 and 3); w4 is bytes 0-3, w 4-7
    for half, (sel, msel) in enumerate((("s0", "0xD9C8"), ("s1", "0xFBEA"))):
        lines += [f"prmt.b32 a, $6, $7, {sel};", f"prmt.b32 b, $8, $9, {sel};",     # low bytes, 0-7 / 8-15
                  f"prmt.b32 c, $10, $11, {sel};", f"prmt.b32 d, $12, $13, {sel};",  # high bytes
                  f"prmt.b32 m, w4, $1, {msel};",
                  "lop3.b32 l, a, b, m, 0xD8;",  # m ? b : a, per bit
                  "lop3.b32 h, c, d, m, 0xD8;"]
        for jj, pair_sel in enumerate(("0x5140", "0x7362")):
            j = 2 * half + jj
            lines += [f"prmt.b32 v, l, h, {pair_sel};",
                      f"mul.rn.{ty} acc, v, $2;" if j == 0 else f"fma.rn.{ty} acc, v, ${2 + j}, acc;"]
    return "\n".join(lines + _pair_sum_lines(f16, "acc"))

# int8: PRMT builds the fp32 bits 0x4B0000cc = 2^23 + c from byte c of the (offset-binary) word:
# selector nibbles, low to high: byte c, bytes 4 and 4 (zeros of the magic register), byte 7 (0x4B).
_ASM_INT8 = """{
.reg .b32 u, f, acc, mg;
mov.b32 mg, 0x4B000000;
xor.b32 u, $1, 0x80808080;
prmt.b32 f, u, mg, 0x7440;
sub.f32 f, f, 0f4B000080;
mul.f32 acc, f, $2;
prmt.b32 f, u, mg, 0x7441;
sub.f32 f, f, 0f4B000080;
fma.rn.f32 acc, f, $3, acc;
prmt.b32 f, u, mg, 0x7442;
sub.f32 f, f, 0f4B000080;
fma.rn.f32 acc, f, $4, acc;
prmt.b32 f, u, mg, 0x7443;
sub.f32 f, f, 0f4B000080;
fma.rn.f32 $0, f, $5, acc;
}"""

# the tables as the int32 operands `_words_dot` passes (bf16, fp16)
_FP4_OPERANDS = ((-1065353216, -1065336832, 0x3F3F3F00, 0x40404040), (0, 0, 0x3E3C3800, 0x46444240))
assert all([v & 0xFFFFFFFF for v in ops] == [int(t, 16) for t in _fp4_tables(f16)]
           for ops, f16 in zip(_FP4_OPERANDS, (False, True)))


@functools.cache  # built once per variant: it is passed to every launch
def word_asm(bits: int, fp4: bool, f16: bool, signed: bool, lut: bool = False) -> str:
    """The PTX of one word's dot product for these codes and activations (the host picks it and
    passes it as the kernel's WORD_ASM constexpr): int8, fp4, a 4-bit palette, or 4 / 2-bit
    integers with their offset (8 / 2 when signed)."""
    if bits == 8:
        return _ASM_INT8
    if lut:
        return _asm_word_lut4(f16)
    if fp4:
        return _asm_word_fp4(f16)
    return _asm_word(bits, f16, (1 << (bits - 1)) if signed else 0)
