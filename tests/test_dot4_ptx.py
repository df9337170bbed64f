"""The PTX decode block of the packed-nibble tensor-core path (`nibble_ptx.asm_nibbles`), run by a
small emulator of the instructions it uses, against the decoded weights computed directly.

The interpreter twin of the kernel replaces this PTX by plain Triton, so without this test CI would
never execute the bit tricks (magic-number floats, exact fma); the compiled kernel itself is
checked on the GPU by `benchmarks/matmul.py --check`.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from lowbit.kernels.nibble_ptx import asm_nibbles


def _halves_to_float(word: int, dt: torch.dtype) -> list[float]:
    return torch.tensor([word & 0xFFFF, word >> 16], dtype=torch.int32).to(torch.int16).view(dt).double().tolist()


def _float_to_halves(vals: list[float], dt: torch.dtype) -> int:
    # exact sums (float64) rounded once to the 16-bit type (through fp32, exact for these values)
    h = torch.tensor(vals, dtype=torch.float64).float().to(dt).view(torch.int16).int() & 0xFFFF
    return int(h[0]) | (int(h[1]) << 16)


def run_ptx(text: str, args: dict[str, int], dt: torch.dtype) -> dict[str, int]:
    """Execute the straight-line PTX block `text` (mov, shr.u32, lop3.b32, fma.rn.{b,}f16x2) on 32-bit registers."""
    regs = dict(args)

    def val(tok: str) -> int:
        tok = tok.strip()
        return int(tok, 16) if tok.startswith("0x") else regs[tok]

    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        ops = [o.strip() for o in rest.split(",")]
        if op == "mov.b32":
            regs[ops[0]] = val(ops[1])
        elif op == "shr.u32":
            regs[ops[0]] = val(ops[1]) >> int(ops[2])
        elif op == "lop3.b32":
            a, b, c, lut = val(ops[1]), val(ops[2]), val(ops[3]), int(ops[4], 16)
            out = 0
            for bit in range(32):
                idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
                out |= ((lut >> idx) & 1) << bit
            regs[ops[0]] = out
        elif re.fullmatch(r"fma\.rn\.b?f16x2", op):
            a, b, c = (_halves_to_float(val(o), dt) for o in ops[1:4])
            regs[ops[0]] = _float_to_halves([a[j] * b[j] + c[j] for j in range(2)], dt)
        else:
            raise AssertionError(f"emulator: unknown instruction {op}")
    return regs


@pytest.mark.parametrize("f16,signed,e8m0", [(False, True, True), (False, True, False), (True, True, True),
                                             (False, False, False), (True, False, False)])
def test_nibble_decode_ptx(f16, signed, e8m0):
    dt = torch.float16 if f16 else torch.bfloat16
    text = asm_nibbles(f16, signed, exact_fma=e8m0 and signed and not f16)
    rng = np.random.default_rng(int(f16) * 4 + int(signed) * 2 + int(e8m0))
    for _ in range(200):
        word = int(rng.integers(0, 2**32))
        if e8m0:
            s = [2.0 ** int(rng.integers(-20, 8))] * 2
        else:
            s = torch.tensor(rng.normal(0, 0.05, 2)).to(dt).double().tolist()
        z = torch.tensor(rng.normal(0, 0.2, 2)).to(dt).double().tolist() if not signed else [0.0, 0.0]
        out = run_ptx(text, {"$4": word, "$5": _float_to_halves(s, dt), "$6": _float_to_halves(z, dt)}, dt)
        for i in range(4):
            got = _halves_to_float(out[f"${i}"], dt)
            for half in range(2):
                c = (word >> (16 * half + 4 * i)) & 15
                want = torch.tensor((c - (8 if signed else 0)) * s[half] + z[half], dtype=torch.float64).float().to(dt)
                assert got[half] == want.double().item(), (hex(word), i, half, got[half], want)
