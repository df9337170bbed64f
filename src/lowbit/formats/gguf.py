"""llama.cpp block types with llama.cpp's own rounding: `q8_0`, `q4_0`, `q4_1`, `gguf-mxfp4`.

Each encoder repeats, operation for operation in fp32, what ggml's reference quantizer does
(and gguf-py's `gguf.quants` mirrors), so the dequantized values are bit-identical to
`gguf.quants.dequantize(gguf.quants.quantize(x, T), T)`. The planes reuse the layouts of the
linear and MX families, so their decoders are shared:

    q8_0   data = int8 value (two's-complement byte), scale fp16 d   w = int8(code) * d
    q4_0   data = nibble q in 0..15, scale fp16 d          w = (q - 8) * d
    q4_1   data = nibble q,          scale fp16 d, zero fp16 m   w = q * d + m
    mxfp4  data = E2M1 code,         scale E8M0            w = e2m1(code) * 2^(e - 127)

(The GGUF byte order inside a block differs from lowbit's per-row packing; the GGUF exporter
rearranges bytes, it never re-rounds.)
"""

from __future__ import annotations

import torch

from . import linear, mx, scales
from .format import Format
from .packing import pack

# E2M1 value of each code, doubled, in code order: the table ggml's MXFP4 quantizer searches
_KVALUES_DOUBLED = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C roundf (half away from zero), as gguf-py's np_roundf computes it."""
    a = x.abs()
    f = torch.floor(a)
    return torch.sign(x) * (f + torch.floor(2 * (a - f)))


def _to_fp16(d: torch.Tensor) -> torch.Tensor:
    return scales.encode_float(d, "fp16")


def encode(w: torch.Tensor, fmt: Format, **_: object) -> dict[str, torch.Tensor]:
    rows, cols = w.shape
    blocks = w.reshape(rows, cols // 32, 32)
    if fmt.element == "q8_0":
        d = blocks.abs().amax(-1, keepdim=True) / 127
        q = _roundf(blocks * _inverse(d))
        codes, planes = linear.signed_to_codes(q, 8), {"scale": _to_fp16(d.squeeze(-1))}
    elif fmt.element == "q4_0":
        imax = blocks.abs().argmax(-1, keepdim=True)  # first index of the largest magnitude
        d = torch.gather(blocks, -1, imax) / -8
        codes = torch.trunc(blocks * _inverse(d) + 8.5).clamp(0, 15)
        planes = {"scale": _to_fp16(d.squeeze(-1))}
    elif fmt.element == "q4_1":
        hi = blocks.amax(-1, keepdim=True)
        lo = blocks.amin(-1, keepdim=True)
        d = (hi - lo) / 15
        codes = torch.trunc((blocks - lo) * _inverse(d) + 0.5).clamp(0, 15)
        planes = {"scale": _to_fp16(d.squeeze(-1)), "zero": _to_fp16(lo.squeeze(-1))}
    elif fmt.element == "mxfp4":
        amax = blocks.abs().amax(-1)
        # ggml: e = floor(log2f(amax)) - 2 + 127 in a byte (all-zero blocks: e = 0). log2 is taken
        # in fp32 as ggml does (not the exact frexp exponent): just below a power of two, fp32
        # log2 may round up to the integer, and the reference follows that rounding.
        safe = torch.where(amax > 0, amax, torch.ones_like(amax))
        e = torch.where(amax > 0, torch.floor(torch.log2(safe)) - 2 + 127, 0).clamp(0, 254)
        half = scales.e8m0_to_fp32(e) * 0.5  # the table holds doubled values
        kvalues = torch.tensor(_KVALUES_DOUBLED, dtype=torch.float32, device=w.device)
        codes = torch.empty(blocks.shape, dtype=torch.uint8, device=w.device)
        step = max(1, (1 << 22) // max(1, cols))  # bound the (rows, cols, 16) error tensor
        for r in range(0, rows, step):
            err = (half[r:r + step, :, None, None] * kvalues - blocks[r:r + step, :, :, None]).abs()
            codes[r:r + step] = err.argmin(-1).to(torch.uint8)  # ties: first (smaller magnitude)
        planes = {"scale": e.to(torch.uint8)}
    else:  # pragma: no cover - Format validation makes this unreachable
        raise ValueError(f"unknown gguf element {fmt.element!r}")
    planes["data"] = pack(codes.reshape(rows, cols).to(torch.uint8), fmt.bits)
    return planes


def decode(planes: dict[str, torch.Tensor], fmt: Format, rows: int, cols: int) -> torch.Tensor:
    if fmt.element == "mxfp4":
        return mx.decode(planes, _MX_VIEW, rows, cols)
    view = _Q4_1_VIEW if fmt.element == "q4_1" else (_Q8_0_VIEW if fmt.element == "q8_0" else _Q4_0_VIEW)
    return linear.decode(planes, view, rows, cols)


# The same planes read through the shared decoders
_Q8_0_VIEW = Format(family="int", element="int8", block_size=32, scale_dtype="fp16", name="q8_0")
_Q4_0_VIEW = Format(family="int", element="int4", block_size=32, scale_dtype="fp16", name="q4_0")
_Q4_1_VIEW = Format(family="int", element="int4", block_size=32, scale_dtype="fp16", zero="float", name="q4_1")
_MX_VIEW = Format(family="mx", element="fp4_e2m1", block_size=32, scale_dtype="e8m0", name="gguf-mxfp4")

