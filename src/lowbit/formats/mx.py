"""OCP Microscaling v1.0 formats: MXFP8 (E4M3, E5M2), MXFP6 (E3M2, E2M3), MXFP4 (E2M1), MXINT8.

Planes for a (rows, cols) weight with block size B (32 in the spec):
    data   uint8 (rows, packed_len(cols, bits))   element codes (elements.py), packed per row
    scale  uint8 (rows, cols / B)                 E8M0 shared exponent X + 127

w = element_value(code) * 2^X. The spec (section 6.3) picks X = floor(log2(amax)) - emax_elem and
saturates elements to the largest finite value; `scale_rounding` selects other libraries' rules.
"""

from __future__ import annotations

import torch

from . import elements, scales
from .format import Format
from .packing import pack, unpack


def encode(w: torch.Tensor, fmt: Format, **_: object) -> dict[str, torch.Tensor]:
    et = elements.ELEMENT_TYPES[fmt.element]
    rows, cols = w.shape
    b = fmt.block_size
    blocks = w.reshape(rows, cols // b, b)
    x = scales.e8m0_exponent(blocks.abs().amax(-1), et.emax, et.max_value, fmt.scale_rounding)
    scaled = torch.ldexp(blocks, -x.unsqueeze(-1).to(torch.float32))  # exact: power-of-two scaling
    codes = elements.encode(scaled, fmt.element, fmt.element_rounding)
    return {"data": pack(codes.reshape(rows, cols), et.bits), "scale": scales.e8m0_encode(x)}


def decode(planes: dict[str, torch.Tensor], fmt: Format, rows: int, cols: int) -> torch.Tensor:
    et = elements.ELEMENT_TYPES[fmt.element]
    b = fmt.block_size
    codes = unpack(planes["data"], et.bits, cols).reshape(rows, cols // b, b)
    values = elements.decode(codes, fmt.element)
    return (values * scales.e8m0_to_fp32(planes["scale"]).unsqueeze(-1)).reshape(rows, cols)
