"""The PTX decode block of the packed-nibble tensor-core path (`nibble_ptx.asm_nibbles`), run by a
small emulator of the instructions it uses (`ptx_emulator.py`), against the decoded weights computed directly.

The interpreter twin of the kernel replaces this PTX by plain Triton, so without this test CI would
never execute the bit tricks (magic-number floats, exact fma); the compiled kernel itself is
checked on the GPU by `benchmarks/matmul.py --check`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ptx_emulator import float_to_halves as _float_to_halves
from ptx_emulator import halves_to_float as _halves_to_float
from ptx_emulator import run_ptx

from lowbit.kernels.nibble_ptx import asm_bytes, asm_fp4, asm_fp8, asm_nibbles


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


def _random_scales(rng, e8m0: bool, dt) -> list[float]:
    if e8m0:  # powers of two, up to 2^10: 2^126 times such a scale would overflow (see asm_fp4)
        return [2.0 ** int(rng.integers(-20, 11)) for _ in range(2)]
    return torch.tensor(rng.normal(0, 0.05, 2)).to(dt).double().tolist()


@pytest.mark.parametrize("f16,scaled", [(False, False), (False, True), (True, False), (True, True)])
def test_int8_byte_decode_ptx(f16, scaled):
    """`asm_bytes`: byte j of each 16-bit half (two's complement) -> the code exactly (times the
    scale with one rounding when `scaled`); every byte value occurs."""
    dt = torch.float16 if f16 else torch.bfloat16
    text = asm_bytes(f16, scaled)
    rng = np.random.default_rng(20 + 2 * int(f16) + int(scaled))
    words = [int(w) for w in rng.integers(0, 2**32, 200)] + [0x80FF7F00, 0x017F80FE]
    for word in words:
        s = _random_scales(rng, False, dt) if scaled else [1.0, 1.0]
        out = run_ptx(text, {"$2": word, "$3": _float_to_halves(s, dt), "$4": 0}, dt)
        for j in range(2):
            got = _halves_to_float(out[f"${j}"], dt)
            for half in range(2):
                c = (word >> (16 * half + 8 * j)) & 0xFF
                c -= 256 if c >= 128 else 0
                want = torch.tensor(c * s[half], dtype=torch.float64).float().to(dt).double().item()
                assert got[half] == want, (hex(word), j, half, got[half], want)


E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


@pytest.mark.parametrize("f16,e8m0", [(False, True), (False, False), (True, True), (True, False)])
def test_fp4_nibble_decode_ptx(f16, e8m0):
    """`asm_fp4`: nibble i (sign, e1, e0, m) of each 16-bit half -> its e2m1 value times the scale,
    one rounding; the subnormal code 0.5 and both zeros included (every nibble value occurs)."""
    dt = torch.float16 if f16 else torch.bfloat16
    text = asm_fp4(f16)
    rng = np.random.default_rng(30 + 2 * int(f16) + int(e8m0))
    words = [int(w) for w in rng.integers(0, 2**32, 200)] + [0x76543210, 0xFEDCBA98]
    for word in words:
        s = _random_scales(rng, e8m0, dt)
        if f16 and e8m0:
            s = [min(v, 2.0**4) for v in s]  # fp16's range: 6 * 2^4 < 65504
        out = run_ptx(text, {"$4": word, "$5": _float_to_halves(s, dt), "$6": 0}, dt)
        for i in range(4):
            got = _halves_to_float(out[f"${i}"], dt)
            for half in range(2):
                c = (word >> (16 * half + 4 * i)) & 15
                v = (-1.0 if c & 8 else 1.0) * E2M1[c & 7]
                want = torch.tensor(v * s[half], dtype=torch.float64).float().to(dt).double().item()
                assert got[half] == want, (hex(word), i, half, got[half], want)


def _fp8_value(c: int, e5m2: bool) -> float:
    """The value of fp8 byte c (e4m3 or e5m2; the patterns for inf / NaN are not used by MX scales)."""
    mb, bias = (2, 15) if e5m2 else (3, 7)
    e, m = (c >> mb) & ((1 << (7 - mb)) - 1), c & ((1 << mb) - 1)
    mag = (m / 2**mb) * 2.0 ** (1 - bias) if e == 0 else (1 + m / 2**mb) * 2.0 ** (e - bias)
    return -mag if c & 0x80 else mag


@pytest.mark.parametrize("f16,e5m2", [(False, False), (False, True), (True, False), (True, True)])
def test_fp8_byte_decode_ptx(f16, e5m2):
    """`asm_fp8`: byte j of each 16-bit half (e4m3 / e5m2, subnormals included) -> its value times
    the scale, one rounding; inf / NaN patterns are skipped."""
    dt = torch.float16 if f16 else torch.bfloat16
    text = asm_fp8(f16, e5m2)
    rng = np.random.default_rng(40 + 2 * int(f16) + int(e5m2))
    special = (lambda c: (c & 0x7C) == 0x7C) if e5m2 else (lambda c: (c & 0x7F) == 0x7F)
    for word in [int(w) for w in rng.integers(0, 2**32, 300)] + [0x01800081, 0x7E0380FE]:
        s = _random_scales(rng, True, dt)
        if f16:
            s = [min(v, 1.0) for v in s]  # fp16's range: e5m2 reaches 57344
        out = run_ptx(text, {"$2": word, "$3": _float_to_halves(s, dt), "$4": 0}, dt)
        for j in range(2):
            got = _halves_to_float(out[f"${j}"], dt)
            for half in range(2):
                c = (word >> (16 * half + 8 * j)) & 0xFF
                if special(c):
                    continue
                want = torch.tensor(_fp8_value(c, e5m2) * s[half], dtype=torch.float64).float().to(dt).double().item()
                assert got[half] == want, (hex(word), j, half, got[half], want)


@pytest.mark.parametrize("f16,e8m0", [(False, True), (False, False), (True, True)])
def test_int2_decode_ptx(f16, e8m0):
    """`asm_nibbles(bits=2)`: the eight 2-bit codes of each 16-bit half -> (c - 2) s (exact with
    E8M0 scales in bf16, one rounding otherwise)."""
    dt = torch.float16 if f16 else torch.bfloat16
    text = asm_nibbles(f16, True, exact_fma=e8m0 and not f16, bits=2)
    rng = np.random.default_rng(50 + 2 * int(f16) + int(e8m0))
    for word in [int(w) for w in rng.integers(0, 2**32, 200)] + [0x1B1BE4E4]:
        s = _random_scales(rng, e8m0, dt)
        out = run_ptx(text, {"$8": word, "$9": _float_to_halves(s, dt), "$10": 0}, dt)
        for p in range(8):
            got = _halves_to_float(out[f"${p}"], dt)
            for half in range(2):
                c = (word >> (16 * half + 2 * p)) & 3
                want = torch.tensor((c - 2) * s[half], dtype=torch.float64).float().to(dt).double().item()
                assert got[half] == want, (hex(word), p, half, got[half], want)
