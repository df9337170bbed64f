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

from lowbit.kernels.nibble_ptx import asm_nibbles


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
