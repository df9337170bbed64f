"""The fast GEMV's word dot products (`gemv_ptx.word_asm`: 4 / 2-bit integers, int8, fp4 e2m1,
4-bit palettes) run by the PTX emulator (`ptx_emulator.py`) on random words and activations,
against the dot product of the decoded values computed directly in float64.

The kernel's interpreter twin replaces this PTX by plain Triton, so without this test CI would
never execute the bit tricks (magic-number floats, PRMT table lookups, sign-replicate masks); the
compiled kernel is checked on the GPU by `benchmarks/matmul.py --check`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ptx_emulator import bits_f32, f32_bits, float_to_halves, run_ptx

from lowbit.kernels import gemv_ptx

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _lut_tables(entries: list[float], dt: torch.dtype) -> list[int]:
    """The eight byte tables of a 16-entry palette (low bytes of entries 0-3, 4-7, 8-11, 12-15,
    then the high bytes), built here independently of the kernel's `_lut_tables`."""
    h = (torch.tensor(entries, dtype=torch.float32).to(dt).view(torch.int16).int() & 0xFFFF).tolist()
    lo = [v & 0xFF for v in h]
    hi = [v >> 8 for v in h]
    word = lambda bs: bs[0] | bs[1] << 8 | bs[2] << 16 | bs[3] << 24  # noqa: E731
    return [word(t[4 * i:4 * i + 4]) for t in (lo, hi) for i in range(4)]


def _case(kind: str, dt: torch.dtype, rng) -> tuple[str, dict[str, int], float, float]:
    """(ptx, operands, want, scale of the sum) for one random word of this kind."""
    word = int(rng.integers(0, 2**32))
    f16 = dt == torch.float16
    bits = 2 if kind.startswith("int2") else (8 if kind == "int8" else 4)
    cpw = 32 // bits
    codes = [(word >> (bits * i)) & ((1 << bits) - 1) for i in range(cpw)]
    x = torch.tensor(rng.normal(0, 1, cpw)).to(dt).double().tolist()
    args = {"$1": word}
    if kind == "int8":
        vals = [c - 256 if c >= 128 else c for c in codes]
        for i in range(4):
            args[f"${2 + i}"] = f32_bits(x[i])
        ptx = gemv_ptx.word_asm(8, False, f16, True)
    elif kind in ("fp4", "lut4"):
        for j in range(4):  # pairs as they lie in memory: (x_2j, x_2j+1)
            args[f"${2 + j}"] = float_to_halves([x[2 * j], x[2 * j + 1]], dt)
        if kind == "fp4":
            vals = [(-1 if c & 8 else 1) * E2M1[c & 7] for c in codes]
            tables = [t & 0xFFFFFFFF for t in gemv_ptx._FP4_OPERANDS[int(f16)]]
        else:
            palette = torch.tensor(rng.uniform(-1.9, 1.9, 16)).to(dt).double().tolist()
            vals = [palette[c] for c in codes]
            tables = _lut_tables(palette, dt)
        for i, t in enumerate(tables):
            args[f"${6 + i}"] = t
        ptx = gemv_ptx.word_asm(4, kind == "fp4", f16, False, lut=kind == "lut4")
    else:  # 4 / 2-bit integers: pairs (x_i, x_{i + P}), values (c - off) / 8
        signed = kind.endswith("s")
        off = (1 << (bits - 1)) if signed else 0
        vals = [(c - off) / 8 for c in codes]
        half = cpw // 2
        for i in range(half):
            args[f"${2 + i}"] = float_to_halves([x[i], x[i + half]], dt)
        ptx = gemv_ptx.word_asm(bits, False, f16, signed)
    want = sum(v * xi for v, xi in zip(vals, x))
    return ptx, args, want, sum(abs(v * xi) for v, xi in zip(vals, x))


@pytest.mark.parametrize("kind", ["int4s", "int4u", "int2s", "int2u", "int8", "fp4", "lut4"])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_word_dot_ptx(kind, dt):
    rng = np.random.default_rng(len(kind) * 7 + int(dt == torch.float16))
    # the products are summed in the 16-bit type (4 or 8 roundings), then widened: a few units
    # in the last place of the 16-bit type, relative to the sum of magnitudes; int8 works in fp32
    tol = 1e-6 if kind == "int8" else (2.0**-6 if dt == torch.bfloat16 else 2.0**-9)
    for _ in range(300):
        ptx, args, want, mag = _case(kind, dt, rng)
        got = bits_f32(run_ptx(ptx, args, dt)["$0"])
        assert abs(got - want) <= tol * max(mag, 1e-30), (kind, hex(args["$1"]), got, want)


def test_lut_ptx_picks_every_entry():
    """Each code 0..15 at each of the 8 positions returns its own palette entry (a one-hot word of
    activations: x = 1 at the position, 0 elsewhere), fp16 palette, exact."""
    dt = torch.float16
    palette = [float(v) for v in range(-8, 8)]
    palette[3] = 0.375
    tables = _lut_tables(palette, dt)
    ptx = gemv_ptx.word_asm(4, False, True, False, lut=True)
    for pos in range(8):
        x = [0.0] * 8
        x[pos] = 1.0
        for c in range(16):
            word = (c << (4 * pos)) | (0x5 << (4 * ((pos + 1) % 8)))  # a neighbour code, times x = 0
            args = {"$1": word, **{f"${2 + j}": float_to_halves([x[2 * j], x[2 * j + 1]], dt) for j in range(4)},
                    **{f"${6 + i}": t for i, t in enumerate(tables)}}
            assert bits_f32(run_ptx(ptx, args, dt)["$0"]) == palette[c], (pos, c)
