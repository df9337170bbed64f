"""A small emulator of the straight-line PTX blocks lowbit's kernels inline (`nibble_ptx`, the
GEMV's `word_asm`), so that CI executes their bit tricks although the Triton interpreter cannot run
inline assembly. Registers are 32-bit ints; 16-bit float pairs and fp32 values are their bits.

Float results are computed exactly in float64 and rounded once to the destination type (through
fp32 for the 16-bit types: a double rounding that can differ from the hardware by one unit in
rare ties; the tests compare with tolerances that allow it, except where the values are exact).
"""

from __future__ import annotations

import re

import numpy as np
import torch


def halves_to_float(word: int, dt: torch.dtype) -> list[float]:
    """The two 16-bit floats (low half first) of a 32-bit word, as Python floats."""
    halves = torch.tensor([word & 0xFFFF, (word >> 16) & 0xFFFF], dtype=torch.int32).to(torch.int16)
    return halves.view(dt).double().tolist()


def float_to_halves(vals: list[float], dt: torch.dtype) -> int:
    """Two values rounded to the 16-bit type `dt`, packed low half first."""
    h = torch.tensor(vals, dtype=torch.float64).float().to(dt).view(torch.int16).int() & 0xFFFF
    return int(h[0]) | (int(h[1]) << 16)


def f32_bits(v: float) -> int:
    return int(np.array([v], dtype=np.float32).view(np.uint32)[0])


def bits_f32(b: int) -> float:
    return float(np.array([b & 0xFFFFFFFF], dtype=np.uint32).view(np.float32)[0])


def _prmt(a: int, b: int, sel: int) -> int:
    """prmt.b32 (default mode): bytes 0-3 of a, 4-7 of b; selector nibble i picks result byte i,
    its bit 3 replicating the picked byte's top bit instead."""
    src = (a & 0xFFFFFFFF) | ((b & 0xFFFFFFFF) << 32)
    out = 0
    for i in range(4):
        nib = (sel >> (4 * i)) & 0xF
        byte = (src >> (8 * (nib & 7))) & 0xFF
        if nib & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for bit in range(32):
        idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        out |= ((lut >> idx) & 1) << bit
    return out


def run_ptx(text: str, args: dict[str, int], dt: torch.dtype) -> dict[str, int]:
    """Execute the PTX block `text` on 32-bit registers; `args` binds the operands ($0, $1, ...)
    and the result is every register at the end. `dt` is the 16-bit type of the .f16x2 / .bf16x2
    instructions (each instruction's own suffix says which; `dt` is checked against it)."""
    regs = dict(args)

    def val(tok: str) -> int:
        tok = tok.strip()
        if tok.startswith("0f"):
            return int(tok[2:], 16)
        if tok.startswith("0x") or tok.startswith("-0x"):
            return int(tok, 16) & 0xFFFFFFFF
        if re.fullmatch(r"-?\d+", tok):
            return int(tok) & 0xFFFFFFFF
        return regs[tok]

    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op == "mov.b32" and rest.lstrip().startswith("{"):  # unpack: mov.b32 {lo, hi}, r
            lo, hi = re.match(r"\{\s*([\w$]+)\s*,\s*([\w$]+)\s*\}\s*,\s*(\S+)", rest).groups()[:2]
            src = val(rest.rsplit(",", 1)[1])
            regs[lo], regs[hi] = src & 0xFFFF, (src >> 16) & 0xFFFF
            continue
        ops = [o.strip() for o in rest.split(",")]
        d = ops[0]
        if op == "mov.b32":
            regs[d] = val(ops[1])
        elif op in ("shr.u32", "shr.b32"):
            regs[d] = val(ops[1]) >> int(ops[2])
        elif op == "shl.b32":
            regs[d] = (val(ops[1]) << int(ops[2])) & 0xFFFFFFFF
        elif op == "and.b32":
            regs[d] = val(ops[1]) & val(ops[2])
        elif op == "xor.b32":
            regs[d] = val(ops[1]) ^ val(ops[2])
        elif op == "lop3.b32":
            regs[d] = _lop3(val(ops[1]), val(ops[2]), val(ops[3]), int(ops[4], 16))
        elif op == "prmt.b32":
            regs[d] = _prmt(val(ops[1]), val(ops[2]), val(ops[3]))
        elif m := re.fullmatch(r"(fma|mul)\.rn\.(b?f16)x2", op):
            assert (m.group(2) == "f16") == (dt == torch.float16), f"emulator: {op} run with {dt}"
            a, b = halves_to_float(val(ops[1]), dt), halves_to_float(val(ops[2]), dt)
            c = halves_to_float(val(ops[3]), dt) if m.group(1) == "fma" else [0.0, 0.0]
            regs[d] = float_to_halves([a[j] * b[j] + c[j] for j in range(2)], dt)
        elif op == "cvt.f32.f16":
            regs[d] = f32_bits(halves_to_float(val(ops[1]), torch.float16)[0])
        elif op in ("add.f32", "sub.f32", "mul.f32", "fma.rn.f32"):
            a, b = bits_f32(val(ops[1])), bits_f32(val(ops[2]))
            r = {"add.f32": lambda: a + b, "sub.f32": lambda: a - b, "mul.f32": lambda: a * b,
                 "fma.rn.f32": lambda: a * b + bits_f32(val(ops[3]))}[op]()
            regs[d] = f32_bits(r)
        else:
            raise AssertionError(f"emulator: unknown instruction {op}")
    return regs
