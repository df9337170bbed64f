"""Linear integer formats: `int8` per channel, `int4`/`int2` blocks with float or E8M0 scales.

Planes for a (rows, cols) weight with block size B (B = cols for per-channel formats):
    data   uint8 (rows, packed_len(cols_padded, bits))  codes, packed per row (packing.py)
    scale  (rows, cols_padded / B)                       fp32/fp16/bf16, or uint8 E8M0
    zero   (rows, cols_padded / B), scale's float dtype  affine formats only

Symmetric: q in [-qmax, qmax], qmax = 2^(bits-1) - 1, and w = q * scale. Sub-byte codes are
    offset binary, code = q + 2^(bits-1) (llama.cpp's nibble convention); 8-bit codes are q's
    two's-complement byte, so the data plane *is* an int8 matrix (`data.view(torch.int8)`), as
    llama.cpp's q8_0 and PyTorch's int8 matmul kernels expect.   (An int2 symmetric grid is ternary {-1, 0, 1}; `int2` is affine for that reason.)
Affine (zero="float"): code in [0, 2^bits - 1] and w = code * scale + zero, zero = block min
    (the MLX convention, so the planes export to MLX without re-rounding).
"""

from __future__ import annotations

import torch

from . import elements, scales
from .format import Format
from .packing import pack, unpack


def qmax_symmetric(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def encode(w: torch.Tensor, fmt: Format, **_: object) -> dict[str, torch.Tensor]:
    """Planes for fp32 `w` of shape (rows, nblocks * B), B = block size."""
    bits = fmt.bits
    rows, cols = w.shape
    b = fmt.block_size or cols
    blocks = w.reshape(rows, cols // b, b)
    if fmt.zero == "float":
        lo = blocks.amin(-1)
        hi = blocks.amax(-1)
        qmax = (1 << bits) - 1
        scale = scales.encode_float((hi - lo) / qmax, fmt.scale_dtype)
        zero = scales.encode_float(lo, fmt.scale_dtype, what="zero point")
        z = scales.decode_float(zero).unsqueeze(-1)
        # as for symmetric codes below: where a (subnormal) scale rounded up so far that the block's
        # top no longer reaches qmax, the next stored value below keeps it reachable, so that
        # re-quantizing the output finds the same scale
        top = elements.round_magnitude(_divide(hi - z.squeeze(-1), scales.decode_float(scale)), fmt.element_rounding)
        lower = scales.step_down(scale, fmt.scale_dtype)
        scale = torch.where((top < qmax) & (hi > lo) & (scales.decode_float(lower) > 0), lower, scale)
        s = scales.decode_float(scale).unsqueeze(-1)
        q = _divide(blocks - z, s)
        codes = elements.round_magnitude(q.clamp(min=0), fmt.element_rounding).clamp(0, qmax)
        planes = {"scale": scale, "zero": zero}
    else:
        qmax = qmax_symmetric(bits)
        amax = blocks.abs().amax(-1)
        if fmt.scale_dtype == "e8m0":
            emax = int(qmax).bit_length() - 1
            scale = scales.e8m0_encode(scales.e8m0_exponent(amax, emax, float(qmax), fmt.scale_rounding))
        else:
            scale = scales.encode_float(amax / qmax, fmt.scale_dtype)
            # Where rounding moved the scale up by so much that the largest value no longer reaches
            # qmax (fp16 subnormals below 6.1e-5 are steps of 2^-24), re-quantizing the output
            # would pick another scale; the next stored value below keeps qmax reachable (the
            # largest value saturates by less than one step). Normal scales never take this branch.
            s0 = scales.decode_float(scale)
            short = elements.round_magnitude(_divide(amax, s0), fmt.element_rounding) < qmax
            lower = scales.step_down(scale, fmt.scale_dtype)
            scale = torch.where(short & (amax > 0) & (scales.decode_float(lower) > 0), lower, scale)
        s = scales.decode_scale(scale, fmt.scale_dtype).unsqueeze(-1)
        q = _divide(blocks, s)
        mag = elements.round_magnitude(q.abs(), fmt.element_rounding).clamp(max=qmax)
        codes = signed_to_codes(torch.where(q < 0, -mag, mag), bits)
        planes = {"scale": scale}
    planes["data"] = pack(codes.reshape(rows, cols).to(torch.uint8), bits)
    return planes


def decode(planes: dict[str, torch.Tensor], fmt: Format, rows: int, cols: int) -> torch.Tensor:
    """fp32 (rows, cols) values of the planes; `cols` is the padded column count."""
    bits = fmt.bits
    b = fmt.block_size or cols
    codes = unpack(planes["data"], bits, cols).reshape(rows, cols // b, b)
    s = scales.decode_scale(planes["scale"], fmt.scale_dtype).unsqueeze(-1)
    if fmt.zero == "float":
        w = codes.to(torch.float32) * s + scales.decode_float(planes["zero"]).unsqueeze(-1)
    elif bits == 8:  # int8 * fp32 promotes in one pass (no separate fp32 copy of the codes)
        w = codes.view(torch.int8) * s
    else:  # offset binary: the signed codes in int8 (exact), then one promoting multiply
        w = (codes.view(torch.int8) - (1 << (bits - 1))) * s
    return w.reshape(rows, cols)


def signed_to_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric ints -> stored codes: two's-complement byte for 8 bits, offset binary below."""
    if bits == 8:
        return q.to(torch.int16).to(torch.uint8)
    return (q + (1 << (bits - 1))).to(torch.uint8)


def codes_to_signed(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored codes (uint8) -> symmetric ints."""
    if bits == 8:
        return codes.view(torch.int8)
    return codes.to(torch.int16) - (1 << (bits - 1))


def _divide(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x / s with 0 where the scale is 0 (all-zero or underflowed blocks give exact zeros)."""
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return torch.where(s > 0, x / safe, torch.zeros_like(x))
