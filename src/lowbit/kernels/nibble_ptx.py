"""PTX text of the nibble decode used by the packed-nibble tensor-core path (`triton_dot4._nibbles`).

Plain Python (no Triton import), so `tests/test_dot4_ptx.py` can run the text through its emulator
without importing Triton before the interpreter tests set TRITON_INTERPRET.
"""

from __future__ import annotations

import functools


@functools.cache  # built once per variant: it is passed to every launch
def asm_nibbles(f16: bool, signed: bool, exact_fma: bool) -> str:
    """PTX for `_nibbles`: $0..$3 = nibble i (bits 4i..4i+3 of each 16-bit half of $4) as 16-bit
    weights, two per register; $5 = the two elements' scales, $6 their zero points (unused when
    `signed`). `exact_fma` (bf16 with power-of-two scales): (MAGIC + c) s - (MAGIC + 8) s in one fma,
    exact because both products are.

    Example:
        >>> asm_nibbles(False, True, True).count("fma.rn.bf16x2")  # one for -(MAGIC + 8) s, one per nibble
        5
    """
    magic = 0x6400 if f16 else 0x4300  # 1024.0 / 128.0
    ty = "f16x2" if f16 else "bf16x2"
    off = (1024 if f16 else 128) + (8 if signed else 0)
    neg = {(True, 1032): 0xE408, (True, 1024): 0xE400, (False, 136): 0xC308, (False, 128): 0xC300}[(f16, off)]
    one = 0x3C00 if f16 else 0x3F80
    lines = ["{", ".reg .b32 t, v, mg, ng, one, nz, ns;", f"mov.b32 mg, {hex(magic * 0x10001)};",
             f"mov.b32 ng, {hex(neg * 0x10001)};", f"mov.b32 one, {hex(one * 0x10001)};", "mov.b32 nz, 0x80008000;"]
    if exact_fma:
        lines.append(f"fma.rn.{ty} ns, $5, ng, nz;")  # -(MAGIC + 8) s, exact
    for i in range(4):
        src = "$4"
        if i:
            lines.append(f"shr.u32 t, $4, {4 * i};")
            src = "t"
        lines.append(f"lop3.b32 v, {src}, 0x000F000F, mg, 0xEA;")  # (src & mask) | magic
        if exact_fma:
            lines.append(f"fma.rn.{ty} ${i}, v, $5, ns;")
        else:
            lines.append(f"fma.rn.{ty} v, v, one, ng;")  # c - off, exact
            lines.append(f"fma.rn.{ty} ${i}, v, $5, {'nz' if signed else '$6'};")
    lines.append("}")
    return "\n".join(lines)
